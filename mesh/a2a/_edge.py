"""``mesh a2a``: the router's agents served over the Agent2Agent protocol (JSON-RPC).

One A2A agent per routable agent and sequence, at ``/agents/<name>`` (its card at
``/agents/<name>/.well-known/agent-card.json``), and the mesh itself at ``/`` (routed
by the router's rules and default agent). Each is the ``a2a-sdk``'s request handler
over :class:`MeshExecutor`, which runs one router ``Chat`` turn per A2A task:

- task id = turn id, context id = conversation id (a second message in the same
  context continues the conversation with its history, kept by the router);
- the router's deltas stream as chunks of the task's ``answer`` artifact; tool calls,
  tool results and handoffs as ``working`` status messages (text plus ``mesh``
  metadata); the final answer completes the task;
- cancelling the task cancels the router call, which cancels every hop of the turn;
- the caller's bearer token (audience ``auth.audience_for("a2a")``) is validated with
  the mesh's JWT wrapper and exchanged on the user's behalf for the router: it is never
  passed through. A missing or bad token is refused with HTTP 401 and a
  ``WWW-Authenticate: Bearer`` challenge (the spec leaves authentication to the
  transport); an exchange refused mid-task ends the task ``auth-required``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    create_agent_card_routes,
    create_jsonrpc_routes,
)
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import AgentCard, Message, SendMessageRequest
from a2a.utils.errors import InvalidParamsError
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from mesh.a2a._auth import A2A_SERVICE, BearerAuth, _CallContexts, router_identity
from mesh.a2a._cards import CardBook, routable
from mesh.a2a._executor import MeshExecutor, RouterLink
from mesh.config import MeshConfig

log = logging.getLogger("mesh.a2a")


# -- the app -----------------------------------------------------------------------------


@dataclass
class A2aEdge:
    """The ASGI app of ``mesh a2a`` and what it holds."""

    app: ASGIApp
    link: RouterLink
    cards: CardBook
    handlers: dict[str, DefaultRequestHandler]

    async def aclose(self) -> None:
        for handler in self.handlers.values():
            await handler.aclose()
        await self.link.aclose()


class _Handler(DefaultRequestHandler):
    """The SDK's handler, refusing a message no task can start from (no parts, an
    empty text part) as invalid params before a task exists; past that point the SDK
    reports it as an internal error with a traceback in the log."""

    async def on_message_send(self, params: SendMessageRequest, context: Any) -> Any:
        _check_message(params.message)
        return await super().on_message_send(params, context)

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: Any
    ) -> AsyncGenerator[Any]:
        _check_message(params.message)
        async for event in super().on_message_send_stream(params, context):
            yield event


def _check_message(message: Message) -> None:
    if not message.parts:
        raise InvalidParamsError("a message needs at least one part")
    if any(part.HasField("text") and not part.text for part in message.parts):
        raise InvalidParamsError("a message's text part must not be empty")


def build_edge(config: MeshConfig, router: str, base_url: str, *, timeout_s: float) -> A2aEdge:
    """The edge's app: one A2A agent per routable agent and sequence, and the mesh at /."""
    link = RouterLink(router, _credentials(config), timeout_s)
    cards = CardBook(config, base_url, link)
    identity = router_identity(config)
    contexts = _CallContexts()
    handlers: dict[str, DefaultRequestHandler] = {}
    mounts: list[Any] = []
    for name in [*routable(config), ""]:
        card = cards.card(name)
        handler = _Handler(
            agent_executor=MeshExecutor(name, link, identity, cards),
            task_store=InMemoryTaskStore(),
            agent_card=card,
        )
        handlers[name] = handler

        async def current(_card: AgentCard, name: str = name) -> AgentCard:
            return cards.card(name)

        routes = [
            *create_agent_card_routes(card, card_modifier=current),
            *create_jsonrpc_routes(handler, "/", context_builder=contexts),
        ]
        mounts.append(Mount(f"/agents/{name}", routes=routes) if name else Mount("", routes=routes))
    app = BearerAuth(Starlette(routes=mounts), config)
    return A2aEdge(app, link, cards, handlers)


def _credentials(config: MeshConfig) -> grpc.ChannelCredentials | None:
    tls = getattr(config.auth, "tls", None)
    if tls is None or not getattr(tls, "enabled", False):
        return None
    from mesh.auth.interceptors import channel_credentials

    creds: grpc.ChannelCredentials | None = channel_credentials(config)
    return creds


async def serve_edge(
    config: MeshConfig,
    router: str,
    *,
    host: str,
    port: int,
    timeout_s: float,
    public_url: str = "",
    grpc_port: int | None = None,
    on_bound: Callable[[str], None] = lambda url: None,
) -> None:
    """Serve the edge until SIGTERM/SIGINT (then stop gracefully and return)."""
    import socket

    import uvicorn

    from mesh.errors import ConfigError
    from mesh.mcp._serve import _uvicorn_server

    if host not in ("127.0.0.1", "localhost", "::1") and not config.auth.enabled:
        raise ConfigError("serving A2A beyond loopback needs auth.enabled")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # SSE events go out at once
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    url = (public_url or f"http://{host}:{bound}").rstrip("/")
    edge = build_edge(config, router, url, timeout_s=timeout_s)
    await edge.cards.discover_issuer()
    if not config.auth.enabled:
        await asyncio.gather(*(edge.cards.describe(n, None) for n in config.agents))
    grpc_server = None
    if grpc_port is not None:
        from mesh.a2a._grpc import build_grpc_server

        grpc_server = build_grpc_server(config, edge.handlers)
        bound_grpc = await grpc_server.start(host, grpc_port)
        edge.cards.grpc_address = f"{host}:{bound_grpc}"
    server_class = _uvicorn_server()
    web = server_class(uvicorn.Config(edge.app, log_level="warning", lifespan="off"))
    on_bound(url)
    if grpc_server is not None:
        on_bound(f"grpc://{edge.cards.grpc_address}")
    try:
        await web.serve(sockets=[sock])
    finally:
        sock.close()
        if grpc_server is not None:
            await grpc_server.stop(config.server.grace_period_s)
        await edge.aclose()


__all__ = [
    "A2A_SERVICE",
    "A2aEdge",
    "BearerAuth",
    "CardBook",
    "MeshExecutor",
    "RouterLink",
    "build_edge",
    "routable",
    "router_identity",
    "serve_edge",
]
