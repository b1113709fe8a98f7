"""A stdio MCP server whose tools/list answer breaks the MCP schema (``properties`` is
not an object), written by hand: the SDK's servers cannot send it."""

from __future__ import annotations

import json
import sys


def _send(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    bad = {"type": "object", "properties": "oops"}
    for line in sys.stdin:
        message = json.loads(line)
        method, ident = message.get("method"), message.get("id")
        if method == "initialize":
            version = message["params"].get("protocolVersion", "2025-06-18")
            info = {"name": "bad", "version": "0"}
            result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info}
            _send({"jsonrpc": "2.0", "id": ident, "result": result})
        elif method == "tools/list":
            tools = [{"name": "broken", "inputSchema": bad}]
            _send({"jsonrpc": "2.0", "id": ident, "result": {"tools": tools}})
        elif ident is not None:
            _send({"jsonrpc": "2.0", "id": ident, "result": {}})


if __name__ == "__main__":
    main()
