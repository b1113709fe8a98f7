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
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from a2a.auth.user import User
from a2a.extensions.common import HTTP_EXTENSION_HEADER, get_requested_extensions
from a2a.helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    ServerCallContextBuilder,
    create_agent_card_routes,
    create_jsonrpc_routes,
)
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    ClientCredentialsOAuthFlow,
    Message,
    OAuth2SecurityScheme,
    OAuthFlows,
    OpenIdConnectSecurityScheme,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    StringList,
    TaskState,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, TransportProtocol
from google.protobuf.json_format import ParseDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.a2a._errors import HTTP_STATUS, task_state_for
from mesh.client import AgentClient, ChatStream, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.errors import MeshError, Unauthenticated
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2
from mesh.version import __version__

log = logging.getLogger("mesh.a2a")

A2A_SERVICE = "a2a"
"""The service name of the A2A edge (its audience is ``auth.audience_for("a2a")``)."""
SCHEME = "mesh"
_STATE_TOKEN = "mesh_token"  # noqa: S105 - a state key, not a token
_DESCRIBE_TIMEOUT_S = 5.0

#: (the caller's validated token or None) -> the router's bearer (None: auth is off).
Identity = Callable[[str | None], Awaitable[str | None]]


def routable(config: MeshConfig) -> dict[str, str]:
    """name -> description of every agent and sequence the router can route to."""
    out = {name: agent.description for name, agent in config.agents.items()}
    for name, seq in config.router.sequences.items():
        out[name] = seq.description or f"sequence of {', '.join(seq.steps)}"
    return out


# -- identity ----------------------------------------------------------------------------


class MeshUser(User):
    """The caller, as its validated token names it (tasks are scoped to it)."""

    def __init__(self, subject: str) -> None:
        self._subject = subject

    @property
    def is_authenticated(self) -> bool:
        return bool(self._subject)

    @property
    def user_name(self) -> str:
        return self._subject


class _CallContexts(ServerCallContextBuilder):
    """The SDK's call context: the user, the validated token and the headers but the
    token's (the SDK reads the ``A2A-Version`` header from them)."""

    def build(self, request: Request) -> ServerCallContext:
        scope = request.scope
        return ServerCallContext(
            user=MeshUser(str(scope.get("mesh_subject", ""))),
            state={
                _STATE_TOKEN: scope.get("mesh_token"),
                "headers": {k: v for k, v in request.headers.items() if k != "authorization"},
            },
            requested_extensions=get_requested_extensions(
                request.headers.getlist(HTTP_EXTENSION_HEADER)
            ),
        )


class BearerAuth:
    """ASGI middleware: every A2A call needs a valid bearer for the edge's audience.

    Agent cards are public (they say how to authenticate). A refusal is one JSON line
    with HTTP 401 (or 403) and a ``WWW-Authenticate`` challenge, and nothing else
    happens: the server stays up.
    """

    def __init__(self, app: ASGIApp, config: MeshConfig) -> None:
        from mesh.auth.interceptors import make_validator

        self.app = app
        self.enabled = config.auth.enabled
        self._validator = make_validator(config, A2A_SERVICE) if self.enabled else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if scope.get("method") == "GET" and path.endswith(AGENT_CARD_WELL_KNOWN_PATH):
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("an A2A call needs `Authorization: Bearer <token>`")
            assert self._validator is not None
            claims = await self._validator.validate(token.strip())
        except MeshError as err:
            await _refuse(send, err, bool(header))
            return
        scope["mesh_token"] = token.strip()
        scope["mesh_subject"] = str(claims.get("sub", ""))
        await self.app(scope, receive, send)


async def _refuse(send: Send, err: MeshError, had_token: bool) -> None:
    status = HTTP_STATUS.get(err.code, 401)
    challenge = f'Bearer realm="{SCHEME}"'
    if had_token:
        kind = "insufficient_scope" if status == 403 else "invalid_token"
        challenge += f', error="{kind}"'
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32000 - status,  # an implementation-defined server error
                "message": err.message,
                "data": {"reason": err.reason, "http_status": status},
            },
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def router_identity(config: MeshConfig) -> Identity:
    """The caller's token exchanged on its behalf for the router (never passed through)."""

    async def identity(token: str | None) -> str | None:
        if not config.auth.enabled:
            return None
        if not token:
            raise Unauthenticated("no bearer token on this call")
        from mesh.auth.exchange import exchanger_for

        exchanger = exchanger_for(config, A2A_SERVICE)
        return await exchanger.token_for(token, config.auth.audience_for("router"))

    return identity


# -- the router --------------------------------------------------------------------------


@dataclass
class RouterLink:
    """One long-lived channel to the router, and the turns running on it by task id."""

    address: str
    credentials: grpc.ChannelCredentials | None = None
    timeout_s: float = 300.0
    running: dict[str, ChatStream] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    _channel: grpc.aio.Channel | None = None

    def client(self) -> AgentClient:
        if self._channel is None:
            self._channel = create_channel(self.address, credentials=self.credentials)
        return AgentClient(self._channel, router=True)

    async def describe(self, name: str, token: str | None) -> types_pb2.AgentInfo | None:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        stub = router_pb2_grpc.RouterServiceStub(self.client().channel)
        try:
            response = await stub.DescribeAgent(
                router_pb2.DescribeAgentRequest(name=name),
                metadata=metadata,
                timeout=_DESCRIBE_TIMEOUT_S,
            )
        except grpc.RpcError:
            return None
        return response.info

    def cancel(self, task_id: str) -> bool:
        stream = self.running.get(task_id)
        if stream is None:
            return False
        self.cancelled.add(task_id)
        stream.cancel()
        return True

    async def aclose(self) -> None:
        for stream in self.running.values():
            stream.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# -- the executor ------------------------------------------------------------------------


def _agent_message(text: str, task_id: str, context_id: str, meta: dict[str, Any]) -> Message:
    message = Message(
        message_id=uuid.uuid4().hex,
        role=Role.ROLE_AGENT,
        parts=[Part(text=text)],
        task_id=task_id,
        context_id=context_id,
    )
    ParseDict({"mesh": meta}, message.metadata)
    return message


class MeshExecutor(AgentExecutor):
    """Runs an A2A task as one router turn to ``target`` ("" = the router's choice)."""

    def __init__(self, target: str, link: RouterLink, identity: Identity, cards: CardBook):
        self.target = target
        self.link = link
        self.identity = identity
        self.cards = cards

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        if context.current_task is None and context.message is not None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        updater = TaskUpdater(event_queue, task_id, context_id)
        await updater.start_work()

        def say(text: str, **meta: Any) -> Message:
            return _agent_message(text, task_id, context_id, meta)

        try:
            token = await self.identity(context.call_context.state.get(_STATE_TOKEN))
            if self.target:
                await self.cards.describe(self.target, token)
            await self._turn(context, updater, token, say)
        except MeshError as err:
            if task_id in self.link.cancelled:
                return  # cancel() reports the task canceled
            state = task_state_for(err)
            meta = {"code": err.code.name, "reason": err.reason}
            await updater.update_status(state, say(f"{err.code.name}: {err.message}", **meta))
        finally:
            self.link.running.pop(task_id, None)
            self.link.cancelled.discard(task_id)

    async def _turn(
        self,
        context: RequestContext,
        updater: TaskUpdater,
        token: str | None,
        say: Callable[..., Message],
    ) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        stream = self.link.client().open(metadata=metadata, timeout=self.link.timeout_s)
        self.link.running[task_id] = stream
        answer = f"{task_id}-answer"
        chunks = 0
        request = turn_request(
            context.get_user_input(),
            conversation_id=context_id,
            agent=self.target,
        )
        request.turn.turn_id = task_id
        try:
            async for event in stream.turn(request):
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    await updater.add_artifact(
                        [Part(text=event.delta.text)],
                        artifact_id=answer,
                        name="answer",
                        append=chunks > 0,
                        metadata={"agent": event.agent},
                    )
                    chunks += 1
                elif kind == "tool_call":
                    call = event.tool_call
                    note = f"[{event.agent} calls {call.name}]"
                    meta: dict[str, Any] = {
                        "kind": "tool_call",
                        "agent": event.agent,
                        "tool": call.name,
                    }
                    await updater.update_status(TaskState.TASK_STATE_WORKING, say(note, **meta))
                elif kind == "tool_result":
                    result = event.tool_result
                    note = f"[{result.name} answered {event.agent}]"
                    meta = {"kind": "tool_result", "agent": event.agent, "tool": result.name}
                    await updater.update_status(TaskState.TASK_STATE_WORKING, say(note, **meta))
                elif kind == "handoff":
                    handoff = event.handoff
                    mode = types_pb2.HandoffMode.Name(handoff.mode)
                    note = f"[{event.agent} hands over to {handoff.target} ({mode})]"
                    meta = {
                        "kind": "handoff",
                        "agent": event.agent,
                        "target": handoff.target,
                        "mode": mode,
                        "reason": handoff.reason,
                    }
                    await updater.update_status(TaskState.TASK_STATE_WORKING, say(note, **meta))
                elif kind == "final":
                    final = event.final
                    if chunks:
                        await updater.add_artifact(
                            [], artifact_id=answer, name="answer", append=True, last_chunk=True
                        )
                    else:
                        await updater.add_artifact(
                            [Part(text=final.content)], artifact_id=answer, name="answer"
                        )
                    meta = {
                        "kind": "final",
                        "agent": event.agent,
                        "hop_path": list(final.hop_path),
                        "input_tokens": final.usage.input_tokens,
                        "output_tokens": final.usage.output_tokens,
                    }
                    await updater.complete(say(final.content, **meta))
                    await stream.close()  # half-close: the router ends the call OK
                    return
        finally:
            stream.cancel()  # a no-op once the call has ended

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the router call (every hop of the turn stops), then the task."""
        task_id = context.task_id or ""
        self.link.cancel(task_id)
        updater = TaskUpdater(event_queue, task_id, context.context_id or "")
        await updater.cancel()


# -- cards -------------------------------------------------------------------------------


class CardBook:
    """The agent cards, with skills from each agent's Info once the router described it."""

    def __init__(self, config: MeshConfig, base_url: str, link: RouterLink) -> None:
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.link = link
        self.infos: dict[str, types_pb2.AgentInfo] = {}
        self.token_url = ""
        self.issuer = ""

    async def describe(self, name: str, token: str | None) -> None:
        if name in self.infos or name not in self.config.agents:
            return
        info = await self.link.describe(name, token)
        if info is not None and info.name:
            self.infos[name] = info

    async def discover_issuer(self) -> None:
        if not self.config.auth.enabled:
            return
        from mesh.auth.jwks import discover
        from mesh.auth.runtime import ca_path, resolve_issuer

        self.issuer = resolve_issuer(self.config)
        ca = ca_path(self.config)
        import httpx

        verify: Any = str(ca) if ca else True
        try:
            async with httpx.AsyncClient(verify=verify, timeout=5.0, trust_env=False) as http:
                self.token_url = await discover(http, self.issuer, "token_endpoint")
        except (MeshError, httpx.HTTPError) as err:
            log.info("A2A cards: no token endpoint from %s (%s)", self.issuer, err)

    def url(self, name: str) -> str:
        return f"{self.base_url}/agents/{name}/" if name else f"{self.base_url}/"

    def card(self, name: str) -> AgentCard:
        about = routable(self.config)
        if name:
            description = about.get(name, "")
        else:
            description = f"The {self.config.name} mesh: routes each message to its agents"
        skills = self._skills(name, description)
        card = AgentCard(
            name=name or self.config.name,
            description=description or name,
            version=__version__,
            supported_interfaces=[
                AgentInterface(
                    url=self.url(name),
                    protocol_binding=TransportProtocol.JSONRPC.value,
                    protocol_version="1.0",
                )
            ],
            capabilities=AgentCapabilities(streaming=True, push_notifications=False),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
            skills=skills,
        )
        if self.config.auth.enabled:
            self._security(card)
        return card

    def _skills(self, name: str, description: str) -> list[AgentSkill]:
        names = [name] if name else sorted(routable(self.config))
        out: list[AgentSkill] = []
        for agent in names:
            info = self.infos.get(agent)
            configured = self.config.agents.get(agent)
            pairs: list[tuple[str, str]]
            if info is not None and info.skills:
                pairs = [(s.name, s.description) for s in info.skills]
            elif configured is not None and configured.skills:
                pairs = [(s.name, s.description) for s in configured.skills]
            else:
                pairs = [(agent, routable(self.config).get(agent, description))]
            for skill, about in pairs:
                out.append(
                    AgentSkill(
                        id=f"{agent}.{skill}" if not name else skill,
                        name=skill,
                        description=about or skill,
                        tags=[agent],
                    )
                )
        return out

    def _security(self, card: AgentCard) -> None:
        audience = self.config.auth.audience_for(A2A_SERVICE)
        about = f"a bearer JWT from the mesh's issuer with audience {audience}"
        if self.issuer:
            card.security_schemes[SCHEME].CopyFrom(
                SecurityScheme(
                    open_id_connect_security_scheme=OpenIdConnectSecurityScheme(
                        description=about,
                        open_id_connect_url=self.issuer.rstrip("/")
                        + "/.well-known/openid-configuration",
                    )
                )
            )
        if self.token_url:
            flow = ClientCredentialsOAuthFlow(token_url=self.token_url, scopes={})
            card.security_schemes[f"{SCHEME}-oauth2"].CopyFrom(
                SecurityScheme(
                    oauth2_security_scheme=OAuth2SecurityScheme(
                        description=about, flows=OAuthFlows(client_credentials=flow)
                    )
                )
            )
        for scheme in card.security_schemes:
            card.security_requirements.append(
                SecurityRequirement(schemes={scheme: StringList(list=[])})
            )


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
        handler = DefaultRequestHandler(
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
    server_class = _uvicorn_server()
    web = server_class(uvicorn.Config(edge.app, log_level="warning", lifespan="off"))
    on_bound(url)
    try:
        await web.serve(sockets=[sock])
    finally:
        sock.close()
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
