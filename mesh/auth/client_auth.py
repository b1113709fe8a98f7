"""Client side of every hop, as grpc.aio interceptors (the CLI, agents calling the router).

:class:`HopAuth` (behind four per-kind interceptors) exchanges the incoming user
token (``mesh.context.current_token``) for the next hop's audience through
:class:`~mesh.auth.tokens.HopTokens`, or asks a :class:`~mesh.auth.tokens.TokenSource`
when there is no incoming call; it forwards hop path, conversation id, request id,
trace context and the remaining deadline. A failed exchange fails the call with the
mapped status (UNAVAILABLE when the identity provider is unreachable,
PERMISSION_DENIED when policy forbids the audience, UNAUTHENTICATED when refused).

Callers that build metadata themselves (the router's agent calls) use
:func:`mesh.auth.exchange.hop_tokens` directly instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc.aio import ClientCallDetails, Metadata

from mesh import context as ctx
from mesh.auth.exchange import exchanger_for
from mesh.auth.server_auth import HEALTH_PREFIX, current_deadline, current_traceparent
from mesh.auth.tokens import HopTokens, TokenExchanger, TokenSource, describe_error
from mesh.config import MeshConfig
from mesh.errors import MeshError, Unavailable

log = logging.getLogger("mesh.auth")


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


class ServiceTokenSource:
    """A service's own client-credentials token for ``audience`` (policy-checked, cached)."""

    def __init__(self, tokens: HopTokens, audience: str) -> None:
        self.tokens = tokens
        self.audience = audience

    async def token(self) -> str:
        return await self.tokens.service_token(self.audience)


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
    own = ServiceTokenSource(exchanger, audience)
    return hop_interceptors(HopAuth(audience, exchanger, own))


__all__ = [
    "HopAuth",
    "ServiceTokenSource",
    "client_interceptors",
    "hop_interceptors",
    "service_interceptors",
]
