"""A stdio MCP server whose tools/list answer breaks the MCP schema, written by hand:
the SDK's servers cannot send it. ``bad_listing.py`` lists one tool whose
``properties`` is not an object; ``bad_listing.py mixed`` lists that one, a tool
without a name, and a good tool ``echo`` that answers with the arguments it got."""

from __future__ import annotations

import json
import sys


def _send(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _tools(mixed: bool) -> list[dict[str, object]]:
    broken: dict[str, object] = {
        "name": "broken",
        "inputSchema": {"type": "object", "properties": "oops"},
    }
    if not mixed:
        return [broken]
    echo: dict[str, object] = {
        "name": "echo",
        "description": "Say the text back.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
    }
    return [broken, echo, {"description": "no name", "inputSchema": {"type": "object"}}]


def main() -> None:
    mixed = sys.argv[1:] == ["mixed"]
    for line in sys.stdin:
        message = json.loads(line)
        method, ident = message.get("method"), message.get("id")
        params = message.get("params") or {}
        if method == "initialize":
            version = params.get("protocolVersion", "2025-06-18")
            info = {"name": "bad", "version": "0"}
            result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info}
            _send({"jsonrpc": "2.0", "id": ident, "result": result})
        elif method == "tools/list":
            _send({"jsonrpc": "2.0", "id": ident, "result": {"tools": _tools(mixed)}})
        elif method == "tools/call" and mixed and params.get("name") == "echo":
            text = "echo got " + json.dumps(params.get("arguments"), sort_keys=True)
            content = [{"type": "text", "text": text}]
            _send({"jsonrpc": "2.0", "id": ident, "result": {"content": content}})
        elif ident is not None:
            _send({"jsonrpc": "2.0", "id": ident, "result": {}})


if __name__ == "__main__":
    main()
