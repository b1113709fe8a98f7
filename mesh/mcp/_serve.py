"""``mesh mcp``: the mesh as an MCP server.

One tool per routable agent and sequence, ``ask_<name>``, answering through the
router's Chat stream (so the hop rules, the budget and the token exchange apply) with
the caller's identity, and streaming a progress notification per delta while the
agent answers. Two transports: stdio (desktop and IDE clients; the caller is the local
user, ``$MESH_TOKEN`` or a token minted from the embedded STS) and stateless
streamable HTTP (remote clients; each request's bearer token, for this server's
audience, is exchanged on behalf of its user for the router: never passed through).

The caller's W3C trace context (``params._meta``, else the HTTP request's headers;
malformed values dropped) goes with the router call, so the turn continues the caller's
trace. Each tool call counts in ``mesh_mcp_tool_calls_total`` and
``mesh_mcp_tool_call_duration_seconds``, served with ``--metrics-port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import AnyHttpUrl

from mesh import trace_context
from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.convert import error_code_name
from mesh.errors import ConfigError, MeshError
from mesh.telemetry import metrics
from mesh.version import __version__

log = logging.getLogger("mesh.mcp")

ENV_TOKEN = "MESH_TOKEN"  # noqa: S105 - the variable's name, not a token
MCP_SERVICE = "mcp"
"""The service name of ``mesh mcp`` (its audience is ``auth.audience_for("mcp")``)."""

#: Returns the router's bearer token for the current call (None: auth is off).
Identity = Callable[[], Awaitable[str | None]]
#: Reports progress: (count so far, message).
Progress = Callable[[float, str], Awaitable[None]]


def routable(config: MeshConfig) -> dict[str, str]:
    """name -> description of every agent and sequence the router can route to."""
    out = {name: agent.description for name, agent in config.agents.items()}
    for name, seq in config.router.sequences.items():
        out[name] = seq.description or f"sequence of {', '.join(seq.steps)}"
    return out


@dataclass
class MeshAsker:
    """Asks the router one question as the caller, reporting deltas as progress."""

    router: str
    identity: Identity
    credentials: grpc.ChannelCredentials | None = None
    timeout_s: float = 300.0
    _channel: grpc.aio.Channel | None = None

    def _client(self) -> AgentClient:
        if self._channel is None:  # one long-lived channel per process
            self._channel = create_channel(self.router, credentials=self.credentials)
        return AgentClient(self._channel, router=True)

    async def ask(
        self,
        target: str,
        message: str,
        conversation_id: str,
        progress: Progress,
        trace: Mapping[str, str] | None = None,
    ) -> str:
        """The agent's answer; ``trace`` (the caller's W3C trace context) goes with the
        router call, so the turn continues the caller's trace."""
        started = time.monotonic()
        outcome = "UNKNOWN"
        try:
            text = await self._turn(target, message, conversation_id, progress, trace or {})
            outcome = "ok"
            return text
        except _Failed as err:
            outcome = err.code
            raise
        except MeshError as err:
            outcome = err.code.name
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.mcp_tool_calls.labels(target, outcome).inc()
            metrics.mcp_tool_call_duration.labels(target).observe(time.monotonic() - started)

    async def _turn(
        self,
        target: str,
        message: str,
        conversation_id: str,
        progress: Progress,
        trace: Mapping[str, str],
    ) -> str:
        try:
            token = await self.identity()
        except ToolError as err:
            raise _Failed("UNAUTHENTICATED", str(err)) from None
        metadata = [("authorization", f"Bearer {token}")] if token else []
        metadata.extend(trace.items())
        stream = self._client().open(metadata=metadata, timeout=self.timeout_s)
        text = ""
        count = 0
        try:
            request = turn_request(message, conversation_id=conversation_id, agent=target)
            async for event in stream.turn(request):
                kind = event.WhichOneof("kind")
                note = ""
                if kind == "delta":
                    text += event.delta.text
                    note = event.delta.text
                elif kind == "tool_call":
                    note = f"[{event.agent} calls {event.tool_call.name}]"
                elif kind == "handoff":
                    note = f"[{event.agent} hands over to {event.handoff.target}]"
                elif kind == "error":
                    code = error_code_name(event.error.code)
                    raise _Failed(code, f"{code}: {event.error.message}")
                elif kind == "final":
                    text = event.final.content or text
                if note:
                    count += 1
                    await progress(count, note)
            await stream.close()  # half-close: the router ends the call OK, not CANCELLED
            async with asyncio.timeout(10):
                await stream.call.code()
        except MeshError as err:
            raise _Failed(err.code.name, f"{err.code.name}: {err.message}") from None
        finally:
            stream.cancel()  # no-op once the call has ended
        return text

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class _Failed(ToolError):
    """A failed ask: the tool error the caller sees, and its gRPC code for the metrics."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def _tool(asker: MeshAsker, target: str) -> Callable[..., Awaitable[str]]:
    async def ask(ctx: Context, message: str, conversation_id: str = "") -> str:
        async def progress(count: float, note: str) -> None:
            await ctx.report_progress(count, None, note)

        trace = trace_context.incoming(ctx.request_context.meta, ctx.headers)
        return await asker.ask(target, message, conversation_id, progress, trace)

    ask.__doc__ = f"Ask {target}."
    return ask


class MeshTokenVerifier:
    """Validates the bearer of a ``mesh mcp`` HTTP request (audience: this server)."""

    def __init__(self, config: MeshConfig) -> None:
        from mesh.auth.interceptors import make_validator

        self._validator = make_validator(config, MCP_SERVICE)
        self.audience = config.auth.audience_for(MCP_SERVICE)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = await self._validator.validate(token)
        except MeshError:
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("azp") or claims.get("client_id") or ""),
            scopes=[],
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=str(claims.get("sub", "")),
        )


def build_mcp_server(
    config: MeshConfig,
    asker: MeshAsker,
    *,
    auth: AuthSettings | None = None,
    verifier: MeshTokenVerifier | None = None,
) -> MCPServer:
    """An MCP server with one ``ask_<name>`` tool per routable agent and sequence."""
    server: MCPServer = MCPServer(
        config.name,
        instructions="Each tool asks one agent of the mesh and returns its answer.",
        version=__version__,
        auth=auth,
        token_verifier=verifier,
        log_level="WARNING",
    )
    for name, about in routable(config).items():
        server.add_tool(
            _tool(asker, name),
            name=f"ask_{name}",
            description=f"Ask the {name} agent: {about}".strip(),
        )
    return server


def stdio_identity(config: MeshConfig, user: str) -> Identity:
    """The local user: ``$MESH_TOKEN``, else a token minted from the embedded STS."""

    async def identity() -> str | None:
        token = os.environ.get(ENV_TOKEN, "").strip()
        if token or not config.auth.enabled:
            return token or None
        if config.auth.exchanger != "embedded" or config.auth.issuer:
            raise ToolError(f"auth is on: set ${ENV_TOKEN} to a user token for the router")
        from mesh.auth.exchange import StsUserTokenSource

        audience = config.auth.audience_for("router")
        return await StsUserTokenSource(config, user, audience=audience).token()

    return identity


def http_identity(config: MeshConfig) -> Identity:
    """The HTTP caller, exchanged on its behalf for the router (never passed through)."""

    async def identity() -> str | None:
        if not config.auth.enabled:
            return None
        access = get_access_token()
        if access is None:
            raise ToolError("no bearer token on this request")
        from mesh.auth.exchange import exchanger_for

        exchanger = exchanger_for(config, MCP_SERVICE)
        return await exchanger.token_for(access.token, config.auth.audience_for("router"))

    return identity


@contextlib.asynccontextmanager
async def serve_metrics(
    host: str, port: int | None, ready: Callable[[], bool], on_bound: Callable[[str], None]
) -> AsyncIterator[None]:
    """Prometheus ``/metrics`` (and ``/healthz``, ``/readyz``) on ``port`` while inside
    (0: any free port, reported to ``on_bound`` as HOST:PORT); None: no endpoint."""
    if port is None:
        yield
        return
    from mesh.telemetry import MetricsServer

    server = MetricsServer(ready)
    bound = await server.start(host, port)
    on_bound(f"{host}:{bound}")
    try:
        yield
    finally:
        await server.stop()


async def serve_stdio(
    config: MeshConfig,
    router: str,
    *,
    user: str,
    timeout_s: float,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    on_metrics: Callable[[str], None] = lambda address: None,
) -> None:
    asker = MeshAsker(router, stdio_identity(config, user), _credentials(config), timeout_s)
    try:
        async with serve_metrics(metrics_host, metrics_port, lambda: True, on_metrics):
            await build_mcp_server(config, asker).run_stdio_async()
    finally:
        await asker.aclose()


async def serve_http(
    config: MeshConfig,
    router: str,
    *,
    host: str,
    port: int,
    timeout_s: float,
    on_bound: Callable[[str], None] = lambda url: None,
    metrics_port: int | None = None,
    on_metrics: Callable[[str], None] = lambda address: None,
) -> None:
    import uvicorn

    server_class = _uvicorn_server()
    if host not in ("127.0.0.1", "localhost", "::1") and not config.auth.enabled:
        raise ConfigError("serving MCP beyond loopback needs auth.enabled")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # Accepted connections inherit it: without it Nagle holds each SSE event ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            from mesh.cli._common import port_in_use

            raise port_in_use("mesh mcp", f"{host}:{port}", "--port 0 picks a free one") from None
        raise
    sock.listen(128)
    bound = sock.getsockname()[1]
    url = f"http://{host}:{bound}/mcp"
    auth = verifier = None
    if config.auth.enabled:
        from mesh.auth.runtime import resolve_issuer

        verifier = MeshTokenVerifier(config)
        auth = AuthSettings(
            issuer_url=AnyHttpUrl(resolve_issuer(config)),
            resource_server_url=AnyHttpUrl(url),
            validate_token_resource=False,  # the verifier checks aud = auth.audience_for("mcp")
        )
    asker = MeshAsker(router, http_identity(config), _credentials(config), timeout_s)
    server = build_mcp_server(config, asker, auth=auth, verifier=verifier)
    app = server.streamable_http_app(stateless_http=True, host=host)
    web = server_class(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        async with serve_metrics(host, metrics_port, lambda: not web.should_exit, on_metrics):
            on_bound(url)
            await web.serve(sockets=[sock])
    finally:
        sock.close()
        await asker.aclose()


def _uvicorn_server() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn that stops gracefully on SIGTERM/SIGINT and then exits 0 (uvicorn's own
        handler re-raises the signal after shutdown, killing the process)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            try:
                yield
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        def _stop(self) -> None:
            self.force_exit = self.should_exit  # a second signal: stop now
            self.should_exit = True

    return Server


def _credentials(config: MeshConfig) -> grpc.ChannelCredentials | None:
    tls = getattr(config.auth, "tls", None)
    if tls is None or not getattr(tls, "enabled", False):
        return None
    from mesh.auth.interceptors import channel_credentials

    creds: grpc.ChannelCredentials | None = channel_credentials(config)
    return creds


__all__ = [
    "MCP_SERVICE",
    "MeshAsker",
    "MeshTokenVerifier",
    "build_mcp_server",
    "http_identity",
    "routable",
    "serve_http",
    "serve_metrics",
    "serve_stdio",
    "stdio_identity",
]
