"""Real MCP servers for the tests, built with the SDK's server side.

``python -m tests.mcp.servers notes|bad`` serves over stdio; :func:`serve_http` runs
one in-process over streamable HTTP or SSE on 127.0.0.1:0. A server reports what
happened to it (a tool started, was cancelled, ...) as lines on the Unix socket named
by ``$MCP_EVENTS`` so that the test can await them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import mcp_types as types
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

EVENTS_ENV = "MCP_EVENTS"


def report(line: str) -> None:
    """Tell the test something happened (no-op without ``$MCP_EVENTS``)."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")


def notes_server(name: str = "notes", *, auth: Any = None, verifier: Any = None) -> MCPServer:
    server = MCPServer(name, auth=auth, token_verifier=verifier, log_level="WARNING")

    @server.tool()
    def lookup(key: str) -> str:
        """Look a note up by key."""
        return f"note {key}: remember the milk"

    @server.tool()
    def pid() -> str:
        """The server's process id."""
        report(f"pid {os.getpid()}")
        return str(os.getpid())

    @server.tool()
    async def slow(seconds: float) -> str:
        """Wait, then answer."""
        report("started slow")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            report("cancelled slow")
            raise
        report("finished slow")
        return "slow done"

    @server.tool()
    def grow() -> str:
        """Add a tool named fresh to this server."""
        server.add_tool(lambda: "fresh answer", name="fresh", description="Added at run time.")
        return "grown"

    @server.tool()
    def whoami() -> str:
        """The claims of the bearer token of this call."""
        token = get_access_token()
        if token is None:
            return "anonymous"
        return json.dumps({"sub": token.subject, "aud": token.resource, **(token.claims or {})})

    return server


def bad_server() -> Server[Any]:
    """A server whose tools misbehave: a malformed schema, an oversized result."""

    async def list_tools(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name="broken",
                    description="has a malformed schema",
                    input_schema={"type": "object", "properties": {"x": {"type": "no-such"}}},
                ),
                types.Tool(
                    name="huge",
                    description="returns far too much",
                    input_schema={"type": "object", "properties": {}},
                ),
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        report(f"called {params.name}")
        text = "x" * (2 * 1024 * 1024) if params.name == "huge" else "should never run"
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    return Server("bad", on_list_tools=list_tools, on_call_tool=call_tool)


class JwtVerifier:
    """Validates the mesh's JWTs the way a resource server would: signature by the
    STS's keys, issuer, and audience = this server; records every token it saw."""

    def __init__(self, validator: Any, resource: str) -> None:
        self.validator = validator
        self.resource = resource
        self.seen: list[str] = []

    async def verify_token(self, token: str) -> AccessToken | None:
        self.seen.append(token)
        try:
            claims = await self.validator.validate(token)
        except Exception:  # noqa: BLE001 - an invalid token is simply refused
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("azp") or claims.get("client_id") or ""),
            scopes=[],
            expires_at=int(claims["exp"]),
            resource=claims["aud"] if isinstance(claims["aud"], str) else self.resource,
            subject=str(claims.get("sub")),
            claims={k: v for k, v in claims.items() if k in ("act", "iss")},
        )


def bound_socket(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (``port`` 0: any free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


@contextlib.asynccontextmanager
async def serve_http(
    server: MCPServer, kind: Literal["streamable_http", "sse"], sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serve ``server`` on 127.0.0.1 (a listening socket: clients may connect at once)."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    if kind == "sse":
        app = server.sse_app()
        url = f"http://127.0.0.1:{port}/sse"
    else:
        app = server.streamable_http_app(stateless_http=True)
        url = f"http://127.0.0.1:{port}/mcp"
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)
    task = asyncio.ensure_future(web.serve(sockets=[sock]))
    try:
        yield url
    finally:
        web.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
        sock.close()


class Events:
    """Lines reported by the servers (``$MCP_EVENTS``), awaited in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Events:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async for raw in reader:
                self.lines.put_nowait(raw.decode().strip())
            writer.close()

        self._server = await asyncio.start_unix_server(handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The next line starting with ``prefix`` (others before it are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line.startswith(prefix):
                    return line


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "notes"
    if kind == "bad":
        low = bad_server()

        async def run() -> None:
            async with stdio_server() as (read, write):
                await low.run(read, write, low.create_initialization_options())

        anyio.run(run)
    else:
        report(f"started {os.getpid()}")
        notes_server(kind).run("stdio")


if __name__ == "__main__":
    main()
