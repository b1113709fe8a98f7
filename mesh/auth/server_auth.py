"""Server side of every hop: authenticate and authorize each incoming call.

:class:`AuthServerInterceptor` reads ``authorization: Bearer``, validates it with
:class:`~mesh.auth.jwt.TokenValidator` (access tokens only: ID tokens are refused),
checks the required scopes/roles (any of), the kind of token each method takes
(:class:`CallerPolicy`: an agent's Chat/Handoff need a user's token delegated through
the router), fills :mod:`mesh.context`'s contextvars for the servicer and writes one
audit line per call. Health is always exempt; reflection when configured.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc

from mesh import context as ctx
from mesh import telemetry
from mesh.auth import audit
from mesh.auth.jwks import JwksCache
from mesh.auth.jwt import TokenProfile, TokenValidator, is_app_only, principal_from_claims
from mesh.auth.policy import acting_client
from mesh.auth.runtime import resolve_issuer
from mesh.auth.runtime import ssl_context as make_ssl_context
from mesh.config import MeshConfig
from mesh.errors import MeshError, PermissionDenied, Unauthenticated
from mesh.interceptors import rejecting_handler
from mesh.logs import guard_library_loggers
from mesh.v1 import agent_pb2, router_pb2

log = logging.getLogger("mesh.auth")
guard_library_loggers()  # grpc quotes raw metadata values it cannot decode

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
#: Absolute deadline (``time.monotonic()``) of the incoming call, if it has one.
current_deadline: ContextVar[float | None] = ContextVar("mesh_deadline", default=None)
#: W3C trace context of the incoming call, forwarded to the next hop.
current_traceparent: ContextVar[str] = ContextVar("mesh_traceparent", default="")


def _status(value: object) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        for code in grpc.StatusCode:
            if code.value[0] == value:
                return code
    return grpc.StatusCode.UNKNOWN


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> list[str]:
    out: list[str] = []
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            out.append(v.decode("latin-1") if isinstance(v, bytes) else str(v))
    return out


def bearer_token(metadata: Iterable[Any] | None) -> str:
    """The bearer token of a call's metadata, or Unauthenticated saying what is wrong."""
    values = _metadata_value(metadata, ctx.MD_AUTHORIZATION)
    if not values:
        raise Unauthenticated("missing bearer token (authorization metadata)")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    return token.strip()


@dataclass(frozen=True)
class _CallState:
    principal: ctx.Principal
    token: str
    hop_path: tuple[str, ...]
    conversation_id: str
    request_id: str
    traceparent: str

    def apply(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        ctx.current_principal.set(self.principal)
        ctx.current_token.set(self.token)
        ctx.current_hop_path.set(self.hop_path)
        ctx.current_conversation_id.set(self.conversation_id)
        ctx.current_request_id.set(self.request_id)
        current_traceparent.set(self.traceparent)
        remaining = context.time_remaining()
        current_deadline.set(None if remaining is None else time.monotonic() + remaining)


def _final_code(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    code = context.code()
    if code is not None and _status(code) != grpc.StatusCode.OK:
        return _status(code)
    if error is None:
        return grpc.StatusCode.OK if code is None else _status(code)
    if isinstance(error, MeshError):
        return error.code
    if isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED  # the caller's deadline ended the call
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _rebuild(handler: Handler, behavior: Callable[..., Any]) -> Handler:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)


def _original(handler: Handler) -> Callable[..., Any]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream  # type: ignore[return-value]
    if handler.request_streaming:
        return handler.stream_unary  # type: ignore[return-value]
    if handler.response_streaming:
        return handler.unary_stream  # type: ignore[return-value]
    return handler.unary_unary  # type: ignore[return-value]


@dataclass(frozen=True)
class CallerPolicy:
    """Which kind of token each method of a service takes (beyond a valid one)."""

    user_methods: frozenset[str] = frozenset()
    """Methods that act for a user: they need a user's token (delegated by one of
    ``delegates``, when that is set), never an app-only one."""
    delegates: frozenset[str] | None = None
    """Client ids that may present a user's token on ``user_methods`` (the acting client);
    None: any client (the router's Chat takes the user's own token, or one an edge or a
    tool obtained for the user)."""
    service_callers: frozenset[str] = frozenset()
    """Client ids whose own (app) tokens may call ``user_methods`` too."""
    role_methods: Mapping[str, str] = field(default_factory=dict)
    """method -> app role (or scope) the caller's token must carry."""

    def check(self, method: str, claims: Mapping[str, Any], principal: ctx.Principal) -> None:
        role = self.role_methods.get(method)
        if role is not None and role not in principal.scopes:
            raise PermissionDenied(f"this method needs the {role} role")
        if method not in self.user_methods:
            return
        if is_app_only(claims):
            caller = claims.get("azp") or claims.get("appid") or principal.subject
            if caller in self.service_callers:
                return
            raise PermissionDenied("this method needs a user's token, not a service's own")
        if self.delegates is not None and acting_client(claims) not in self.delegates:
            raise PermissionDenied("a user's token must reach this service through the router")


_AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
_ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
#: The router's method that acts for a user (a turn): an app-only token cannot be
#: exchanged on a user's behalf, so it is refused here rather than at the first hop.
ROUTER_USER_METHODS = frozenset({f"/{_ROUTER_SERVICE}/Chat"})
#: The agent methods that act for a user (a turn), as opposed to ``Info``.
AGENT_USER_METHODS = frozenset({f"/{_AGENT_SERVICE}/Chat", f"/{_AGENT_SERVICE}/Handoff"})


class AuthServerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call of one service, and audits it."""

    def __init__(
        self,
        *,
        service: str,
        validator: TokenValidator,
        required_scopes: Sequence[str] = (),
        allow_unauthenticated_reflection: bool = False,
        callers: CallerPolicy | None = None,
    ) -> None:
        self.service = service
        self.validator = validator
        self.required_scopes = frozenset(required_scopes)
        self.allow_reflection = allow_unauthenticated_reflection
        self.callers = callers or CallerPolicy()

    def exempt(self, method: str) -> bool:
        return method.startswith(HEALTH_PREFIX) or (
            self.allow_reflection and method.startswith(REFLECTION_PREFIX)
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.exempt(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        hop_path = ctx.parse_hop_path(",".join(_metadata_value(metadata, ctx.MD_HOP_PATH)))
        conversation = next(iter(_metadata_value(metadata, ctx.MD_CONVERSATION_ID)), "")
        request_id = next(iter(_metadata_value(metadata, ctx.MD_REQUEST_ID)), "")
        traceparent = next(iter(_metadata_value(metadata, ctx.MD_TRACEPARENT)), "")
        principal: ctx.Principal | None = None
        try:
            token = bearer_token(metadata)
            claims = await self.validator.validate(token)
            principal = principal_from_claims(claims, self.validator.audience)
            if self.required_scopes and not self.required_scopes & principal.scopes:
                raise PermissionDenied(
                    "missing a required scope or role (any of: {})".format(
                        ", ".join(sorted(self.required_scopes))
                    )
                )
            self.callers.check(method, claims, principal)
        except MeshError as err:
            telemetry.metrics.auth_refusals.labels(self.service, err.code.name).inc()
            audit.log_call(
                service=self.service,
                method=method,
                code=err.code,
                principal=principal,
                hop_path=hop_path,
                conversation_id=conversation,
                request_id=request_id,
                reason=err.message,
            )
            return self._refuse(handler, err)
        state = _CallState(principal, token, hop_path, conversation, request_id, traceparent)
        return self._wrap(handler, state, method)

    @staticmethod
    def _refuse(handler: Handler, err: MeshError) -> Handler:
        return rejecting_handler(handler, err)

    def _wrap(self, handler: Handler, state: _CallState, method: str) -> Handler:
        behavior = _original(handler)

        def done(
            context: grpc.aio.ServicerContext[Any, Any], started: float, error: BaseException | None
        ) -> None:
            audit.log_call(
                service=self.service,
                method=method,
                code=_final_code(context, error),
                principal=state.principal,
                hop_path=state.hop_path,
                conversation_id=state.conversation_id,
                request_id=state.request_id,
                duration_ms=(time.monotonic() - started) * 1000,
            )

        if inspect.isasyncgenfunction(behavior):

            async def streamed(
                request: Any,
                context: grpc.aio.ServicerContext[Any, Any],
            ) -> AsyncIterator[Any]:
                state.apply(context)
                started, error = time.monotonic(), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    done(context, started, error)

            return _rebuild(handler, streamed)

        async def called(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            state.apply(context)
            started, error = time.monotonic(), None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                done(context, started, error)

        return _rebuild(handler, called)


# -- factories --------------------------------------------------------------------------------


def make_validator(config: MeshConfig, service: str) -> TokenValidator:
    """A validator for ``service``'s audience with a JWKS cache of the configured issuer."""
    issuer = resolve_issuer(config)
    jwks = jwks_cache(config, issuer)
    return _validator(config, service, issuer, jwks)


def jwks_cache(config: MeshConfig, issuer: str) -> JwksCache:
    """A JWKS cache of ``issuer`` with the configured limits."""
    auth = config.auth
    return JwksCache(
        issuer=issuer,
        jwks_url=auth.jwks_url,
        verify=lambda: make_ssl_context(config),
        timeout_s=auth.http_timeout_s,
        refresh_window_s=auth.jwks_refresh_window_s,
        max_age_s=auth.jwks_max_age_s,
    )


def _validator(config: MeshConfig, service: str, issuer: str, jwks: JwksCache) -> TokenValidator:
    auth = config.auth
    return TokenValidator(
        issuer=issuer,
        audience=auth.audience_for(service),
        keys=jwks,
        algorithms=auth.algorithms,
        leeway_s=auth.leeway_s,
        max_token_bytes=auth.max_token_bytes,
        profile=TokenProfile(typ=auth.token_typ, require_scope_claim=auth.require_scope_claim),
    )


def caller_policy(config: MeshConfig, service: str) -> CallerPolicy:
    """An agent's Chat/Handoff take a user's token delegated through ``auth.delegates``
    (the router), or the own tokens of ``auth.service_callers[agent]``; the router's Chat
    takes a user's token, never an app-only one. (The router's
    ``Register`` checks ``router.discovery.register_role`` and the caller's identity in
    its servicer.)"""
    auth = config.auth
    if service == "router":
        return CallerPolicy(user_methods=ROUTER_USER_METHODS)
    if service not in config.agents:
        return CallerPolicy()
    return CallerPolicy(
        user_methods=AGENT_USER_METHODS,
        delegates=frozenset(auth.client_id_for(s) for s in auth.delegates),
        service_callers=frozenset(
            auth.client_id_for(s) for s in auth.service_callers.get(service, [])
        ),
    )


def server_interceptors(config: MeshConfig, service: str) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for ``service`` ("router" or an agent name); put them first (outermost).

    Empty when ``auth.enabled`` is false.
    """
    if not config.auth.enabled:
        return []
    required = config.agents[service].required_scopes if service in config.agents else []
    return [
        AuthServerInterceptor(
            service=service,
            validator=make_validator(config, service),
            required_scopes=required,
            allow_unauthenticated_reflection=config.auth.allow_unauthenticated_reflection,
            callers=caller_policy(config, service),
        )
    ]


__all__ = [
    "AGENT_USER_METHODS",
    "HEALTH_PREFIX",
    "REFLECTION_PREFIX",
    "AuthServerInterceptor",
    "CallerPolicy",
    "bearer_token",
    "caller_policy",
    "current_deadline",
    "current_traceparent",
    "make_validator",
    "server_interceptors",
]
