"""A small MCP server shipped with the default mesh: the mesh's glossary.

The researcher agent starts it over stdio (``python -m mcp_glossary``) and offers its
``define`` tool to its model beside its function tools. Any MCP client can use it too.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

GLOSSARY = {
    "handoff": "An agent passes the conversation (TRANSFER) or a question (CONSULT) to "
    "another agent through the router.",
    "hop budget": "The most handoffs one turn may take (max_hops, default 10); the router "
    "ends the turn with a status naming the path when it is spent.",
    "consult": "A handoff whose answer comes back to the asking agent, which finishes its "
    "turn with it.",
    "transfer": "A handoff after which the other agent answers the user from then on.",
    "sequence": "A configured chain of agents where each one's output feeds the next.",
    "mcp": "Model Context Protocol: agents use tools from MCP servers, and `mesh mcp` "
    "serves the mesh's agents as MCP tools.",
}

server = MCPServer("glossary", instructions="Definitions of the mesh's terms.", log_level="WARNING")


@server.tool()
def define(term: str) -> str:
    """Define a term of the agent mesh.

    Args:
        term: The term, like "handoff" or "hop budget".
    """
    key = " ".join(term.lower().replace("_", " ").split())
    found = GLOSSARY.get(key)
    if found is None:
        known = ", ".join(sorted(GLOSSARY))
        return f"no entry for {term!r}; known terms: {known}"
    return f"{key}: {found}"


def main() -> None:
    server.run("stdio")
