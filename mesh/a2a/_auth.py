"""Who calls the A2A edge: the bearer check (HTTP 401 + ``WWW-Authenticate`` when it
fails), the SDK call context (the user, the validated token, never the token's header),
and the exchange of the caller's token for the router."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from a2a.auth.user import User
from a2a.extensions.common import HTTP_EXTENSION_HEADER, get_requested_extensions
from a2a.server.context import ServerCallContext
from a2a.server.routes import (
    ServerCallContextBuilder,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.a2a._errors import HTTP_STATUS
from mesh.config import MeshConfig
from mesh.context import TRACE_KEYS
from mesh.errors import MeshError, Unauthenticated

log = logging.getLogger("mesh.a2a")

A2A_SERVICE = "a2a"
"""The service name of the A2A edge (its audience is ``auth.audience_for("a2a")``)."""
SCHEME = "mesh"
_STATE_TOKEN = "mesh_token"  # noqa: S105 - a state key, not a token


class Bearer:
    """The caller's validated token in the SDK's call state: the SDK logs that state at
    DEBUG, so its repr never shows the token."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Bearer(<redacted>)" if self.value else "Bearer(None)"


def bearer_of(state: Mapping[str, object]) -> str | None:
    """The validated token a call context carries (None: none, or auth is off)."""
    held = state.get(_STATE_TOKEN)
    return held.value if isinstance(held, Bearer) else None


def trace_of(state: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    """The caller's W3C trace context (``traceparent``, ``tracestate``, ``baggage``)
    from its HTTP headers, for the router call: the A2A caller's trace continues
    through the mesh. The router bounds and checks the values it takes."""
    headers = state.get("headers")
    if not isinstance(headers, Mapping):
        return ()
    return tuple((k, str(headers[k])) for k in TRACE_KEYS if headers.get(k))


#: (the caller's validated token or None) -> the router's bearer (None: auth is off).
Identity = Callable[[str | None], Awaitable[str | None]]


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
                _STATE_TOKEN: Bearer(scope.get("mesh_token")),
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
