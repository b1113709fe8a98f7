"""``python -m mcp_glossary``: serve the glossary over stdio."""

from mcp_glossary import main

main()
