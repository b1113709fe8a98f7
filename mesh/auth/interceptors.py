"""gRPC interceptors: authenticate every incoming call, exchange tokens on every hop.

Server side (:class:`AuthServerInterceptor`): reads ``authorization: Bearer``,
validates it with :class:`~mesh.auth.jwt.TokenValidator`, checks the required
scopes/roles (any of), fills :mod:`mesh.context`'s contextvars for the servicer and
writes one audit line per call. Health is always exempt; reflection when configured.

Client side (:class:`HopAuth` behind four per-kind interceptors): exchanges the
incoming user token (``mesh.context.current_token``) for the next hop's audience,
or asks a :class:`~mesh.auth.exchange.TokenSource` when there is no incoming call;
forwards hop path, conversation id, request id, trace context and the remaining
deadline. A failed exchange fails the call with the mapped status (UNAVAILABLE when
the identity provider is unreachable, UNAUTHENTICATED when it refuses).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc.aio import ClientCallDetails, Metadata

from mesh import context as ctx
from mesh.auth import audit
from mesh.auth.exchange import (
    ClientCredentialsSource,
    TokenExchanger,
    TokenSource,
    describe_error,
    exchanger_for,
)
from mesh.auth.jwks import JwksCache
from mesh.auth.jwt import TokenValidator, principal_from_claims
from mesh.auth.runtime import resolve_issuer
from mesh.auth.runtime import ssl_context as make_ssl_context
from mesh.config import MeshConfig
from mesh.errors import MeshError, PermissionDenied, Unauthenticated, Unavailable
from mesh.interceptors import rejecting_handler

log = logging.getLogger("mesh.auth")

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


class AuthServerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call of one service, and audits it."""

    def __init__(
        self,
        *,
        service: str,
        validator: TokenValidator,
        required_scopes: Sequence[str] = (),
        allow_unauthenticated_reflection: bool = False,
    ) -> None:
        self.service = service
        self.validator = validator
        self.required_scopes = frozenset(required_scopes)
        self.allow_reflection = allow_unauthenticated_reflection

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
        except MeshError as err:
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


# -- client side --------------------------------------------------------------------------


class HopAuth:
    """Attaches a token for ``audience`` and forwards the call context to the next hop.

    grpc.aio files an interceptor object under one call kind only (the first
    interface it implements), so :func:`client_interceptors` wraps one ``HopAuth``
    in four thin interceptors, one per kind.
    """

    def __init__(
        self,
        audience: str,
        exchanger: TokenExchanger | None,
        token_source: TokenSource | None = None,
    ) -> None:
        self.audience = audience
        self.exchanger = exchanger
        self.token_source = token_source

    async def _token(self) -> str | None:
        incoming = ctx.current_token.get()
        if incoming is not None and self.exchanger is not None:
            return await self.exchanger.token_for(incoming, self.audience)
        if self.token_source is not None:
            return await self.token_source.token()
        return None

    async def prepare(self, details: ClientCallDetails) -> ClientCallDetails:
        """The call details with authorization, forwarded metadata and deadline."""
        method: Any = details.method  # bytes at run time, str in the stubs
        name = method.decode() if isinstance(method, bytes) else str(method)
        metadata = Metadata()
        for key, value in details.metadata or ():
            metadata.add(key, value)
        if not name.startswith(HEALTH_PREFIX) and metadata.get(ctx.MD_AUTHORIZATION) is None:
            try:
                token = await self._token()
            except MeshError as err:
                log.warning("token exchange for %s failed: %s", self.audience, describe_error(err))
                raise _rpc_error(err) from None
            except Exception as err:  # noqa: BLE001 - map, never leak library text
                log.warning("token exchange for %s failed: %s", self.audience, describe_error(err))
                raise _rpc_error(
                    Unavailable(f"token exchange failed: {type(err).__name__}")
                ) from None
            if token is not None:
                metadata.add(ctx.MD_AUTHORIZATION, f"Bearer {token}")
        forwarded = {
            ctx.MD_CONVERSATION_ID: ctx.current_conversation_id.get(),
            ctx.MD_REQUEST_ID: ctx.current_request_id.get(),
            ctx.MD_HOP_PATH: ctx.format_hop_path(ctx.current_hop_path.get()),
            ctx.MD_TRACEPARENT: current_traceparent.get(),
        }
        for key, value in forwarded.items():
            if value and metadata.get(key) is None:
                metadata.add(key, value)
        timeout = details.timeout
        deadline = current_deadline.get()
        if deadline is not None:
            remaining = max(deadline - time.monotonic(), 0.0)
            timeout = remaining if timeout is None else min(timeout, remaining)
        return ClientCallDetails(
            method, timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, hop: HopAuth) -> None:
        self.hop = hop

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(await self.hop.prepare(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, hop: HopAuth) -> None:
        self.hop = hop

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(await self.hop.prepare(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, hop: HopAuth) -> None:
        self.hop = hop

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self.hop.prepare(client_call_details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, hop: HopAuth) -> None:
        self.hop = hop

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self.hop.prepare(client_call_details), request_iterator)


def hop_interceptors(hop: HopAuth) -> list[grpc.aio.ClientInterceptor]:
    """The four per-kind interceptors sharing one :class:`HopAuth`."""
    return [_UnaryUnary(hop), _UnaryStream(hop), _StreamUnary(hop), _StreamStream(hop)]


def _rpc_error(err: MeshError) -> grpc.aio.AioRpcError:
    """A client-side status for a failure before the call left this process."""
    return grpc.aio.AioRpcError(
        err.code,
        Metadata(),
        Metadata(*err.trailing_metadata()),
        details=err.message,
    )


# -- factories the lead wires in ----------------------------------------------------------


def make_validator(config: MeshConfig, service: str) -> TokenValidator:
    """A validator for ``service``'s audience with a JWKS cache of the configured issuer."""
    auth = config.auth
    issuer = resolve_issuer(config)
    jwks = JwksCache(
        issuer=issuer,
        jwks_url=auth.jwks_url,
        verify=lambda: make_ssl_context(config),
        timeout_s=auth.http_timeout_s,
        refresh_window_s=auth.jwks_refresh_window_s,
        max_age_s=auth.jwks_max_age_s,
    )
    return TokenValidator(
        issuer=issuer,
        audience=auth.audience_for(service),
        keys=jwks,
        algorithms=auth.algorithms,
        leeway_s=auth.leeway_s,
        max_token_bytes=auth.max_token_bytes,
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
        )
    ]


def client_interceptors(
    config: MeshConfig,
    audience: str,
    *,
    service: str = "router",
    token_source: TokenSource | None = None,
    exchanger: TokenExchanger | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a channel to the service with ``audience``.

    ``service`` is who is calling (whose client credentials exchange tokens; the
    router by default). ``token_source`` gives a token when there is no incoming call
    (``mesh chat``). Empty when ``auth.enabled`` is false and no token source is given.
    """
    if not config.auth.enabled:
        if token_source is None:
            return []
        return hop_interceptors(HopAuth(audience, None, token_source))
    return hop_interceptors(
        HopAuth(audience, exchanger or exchanger_for(config, service), token_source)
    )


def service_interceptors(
    config: MeshConfig, audience: str, *, service: str = "router"
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for calls ``service`` makes as itself (e.g. an agent registering with
    the router): the incoming user token is exchanged when there is one, otherwise the
    service's own client-credentials token for ``audience`` is sent. Pass the agent's
    name as ``service``. Empty when auth is disabled."""
    if not config.auth.enabled:
        return []
    exchanger = exchanger_for(config, service)
    own = ClientCredentialsSource(exchanger.inner, audience, config.auth.exchange_skew_s)
    return hop_interceptors(HopAuth(audience, exchanger, own))


# -- TLS for the gRPC hops ------------------------------------------------------------------


def _tls_files(config: MeshConfig) -> tuple[bytes, bytes, bytes]:
    """(certificate chain, private key, CA bundle) for the gRPC hops."""
    from mesh.auth.devca import ensure_dev_tls
    from mesh.auth.runtime import sts_dir

    tls = config.auth.tls
    base = config.base_dir
    if tls.cert_file:
        cert = (base / tls.cert_file).read_bytes()
        key = (base / tls.key_file).read_bytes()
    else:
        dev = ensure_dev_tls(sts_dir(config) / "tls", extra_hosts=tuple(tls.hosts))
        cert, key = dev.server_cert.read_bytes(), dev.server_key.read_bytes()
    if tls.ca_file:
        ca = (base / tls.ca_file).read_bytes()
    else:
        ca = (sts_dir(config) / "tls" / "ca.pem").read_bytes() if not tls.cert_file else b""
    return cert, key, ca


def server_credentials(config: MeshConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials (requiring client certificates with ``client_auth``), or
    None when ``auth.tls.enabled`` is false."""
    tls = config.auth.tls
    if not tls.enabled:
        return None
    cert, key, ca = _tls_files(config)
    if tls.client_auth and not ca:
        from mesh.errors import ConfigError

        raise ConfigError("auth.tls.client_auth: needs auth.tls.ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca if tls.client_auth else None,
        require_client_auth=tls.client_auth,
    )


def channel_credentials(config: MeshConfig) -> grpc.ChannelCredentials | None:
    """TLS channel credentials trusting ``ca_file`` (presenting this service's
    certificate with ``client_auth``), or None when ``auth.tls.enabled`` is false."""
    tls = config.auth.tls
    if not tls.enabled:
        return None
    cert, key, ca = _tls_files(config)
    if tls.client_auth:
        return grpc.ssl_channel_credentials(ca or None, private_key=key, certificate_chain=cert)
    return grpc.ssl_channel_credentials(ca or None)
