"""Server interceptors that are not about auth: call context from metadata."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from mesh import trace_context
from mesh.context import (
    MD_CONVERSATION_ID,
    MD_HOP_PATH,
    MD_REQUEST_ID,
    current_conversation_id,
    current_hop_path,
    current_request_id,
    current_trace_context,
    parse_hop_path,
)
from mesh.errors import InvalidArgument, MeshError

if TYPE_CHECKING:
    from mesh.config import MeshConfig

MAX_PATH = 100
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]


def rejecting_handler(handler: Handler, err: MeshError) -> Handler:
    """A handler of the same shape as ``handler`` that ends the call with ``err``.

    For request-streaming methods it reads the first request before refusing (for at
    most a second): a client that writes first and reads after would otherwise see
    its write fail rather than the status (grpc/grpc#36066).
    """

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(err.code, err.message, err.trailing_metadata())

    async def unary_in(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(context)

    async def stream_in(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                async for _request in requests:
                    break
        await refuse(context)

    behavior = stream_in if handler.request_streaming else unary_in
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, des, ser)
    return grpc.unary_unary_rpc_method_handler(behavior, des, ser)


class _Undecodable:
    """What a request that does not parse as its message type deserializes to."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guard(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _Undecodable(err)

    return parse


def _undecodable(method: str) -> InvalidArgument:
    return InvalidArgument(f"the request to {method} is not a valid protobuf message")


def guard_requests(handler: Handler, method: str) -> Handler:
    """``handler`` with requests that fail to parse refused as INVALID_ARGUMENT.

    grpc.aio ends such a call UNKNOWN ("Unexpected DecodeError"); a client sending
    garbage deserves a status that says it is at fault.
    """
    des, ser = _guard(handler.request_deserializer), handler.response_serializer
    err = _undecodable(method)

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(err.code, err.message, err.trailing_metadata())

    if handler.request_streaming:
        return _guard_streaming(handler, refuse, des, ser)
    return _guard_unary(handler, refuse, des, ser)


Refuse = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
Codec = Callable[..., Any] | None


def _guard_unary(handler: Handler, refuse: Refuse, des: Codec, ser: Codec) -> Handler:
    if handler.unary_unary is not None:
        uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(context)
            return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    us: Any = handler.unary_stream
    if inspect.isasyncgenfunction(us):

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await refuse(context)
            async for response in us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)

    async def unary_stream_writer(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if isinstance(request, _Undecodable):
            await refuse(context)
        await us(request, context)

    return grpc.unary_stream_rpc_method_handler(unary_stream_writer, des, ser)


def _guard_streaming(handler: Handler, refuse: Refuse, des: Codec, ser: Codec) -> Handler:
    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await refuse(context)
            yield request

    if handler.stream_unary is not None:
        su: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await su(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    ss: Any = handler.stream_stream
    if inspect.isasyncgenfunction(ss):

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for response in ss(checked(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)

    async def stream_stream_writer(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await ss(checked(requests, context), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream_writer, des, ser)


def text_metadata(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """A call's text metadata (binary ``-bin`` values are left out)."""
    return {key: value for key, value in pairs or () if isinstance(value, str)}


class RequestGuardInterceptor(grpc.aio.ServerInterceptor):
    """Refuses requests that do not parse as INVALID_ARGUMENT (:func:`guard_requests`).

    The server installs it innermost, so the handler it sees is the registered one,
    the same object on every call: the guard is built once per method, never per call
    (its closures would cost every idle stream about 1 KiB). Outer interceptors (auth)
    wrap the guarded handler with each caller's identity.
    """

    def __init__(self) -> None:
        self._guards: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: Any = handler_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        cached = self._guards.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_requests(handler, name)
        self._guards[name] = (handler, guarded)  # one entry per method the server has
        return guarded


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Reads the hop path, conversation id and request id into context variables.

    A hop path from outside is checked, never trusted: at most 100 entries, each
    a valid agent name; anything else is INVALID_ARGUMENT.
    """

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metadata = text_metadata(handler_call_details.invocation_metadata)
        path = parse_hop_path(metadata.get(MD_HOP_PATH, ""))
        if len(path) > MAX_PATH or not all(_NAME.match(p) for p in path):
            return rejecting_handler(
                handler,
                InvalidArgument(
                    f"{MD_HOP_PATH} must list at most {MAX_PATH} agent names", field=MD_HOP_PATH
                ),
            )
        current_hop_path.set(path)
        current_conversation_id.set(metadata.get(MD_CONVERSATION_ID, ""))
        current_request_id.set(_bounded(metadata.get(MD_REQUEST_ID)) or uuid.uuid4().hex[:16])
        current_trace_context.set(trace_context.checked(metadata))
        return handler


_SAFE = re.compile(r"^[\x21-\x7e]+$")


def _bounded(value: str | None, limit: int = 128) -> str:
    """A caller-controlled header value, kept only when short and printable ASCII."""
    if not value or len(value) > limit or not _SAFE.match(value):
        return ""
    return value


def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """``details`` with the current call context added to its metadata."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    present = {key for key, _value in metadata}
    values = {
        MD_REQUEST_ID: current_request_id.get(),
        MD_CONVERSATION_ID: current_conversation_id.get(),
        MD_HOP_PATH: ",".join(current_hop_path.get()),
        **current_trace_context.get({}),
    }
    for key, value in values.items():
        if value and key not in present:
            metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _ContextUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_context(client_call_details), request)


class _ContextUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_context(client_call_details), request)


class _ContextStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(_with_context(client_call_details), requests)


class _ContextStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(_with_context(client_call_details), requests)


def context_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that write the current call context into outgoing metadata,
    auth on or off: the request id, conversation id, hop path and W3C trace context of
    the call being served travel to the next hop (a tool calling the router through the
    mesh client). One object per call kind: grpc.aio files an interceptor under one."""
    return [
        _ContextUnaryUnary(),
        _ContextUnaryStream(),
        _ContextStreamUnary(),
        _ContextStreamStream(),
    ]


def server_interceptors(config: MeshConfig, service: str) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptor chain of a mesh service: call context, then auth when
    enabled (one place for agents, the router and the edges)."""
    chain: list[grpc.aio.ServerInterceptor] = [CallContextInterceptor()]
    if config.auth.enabled:
        from mesh.auth.interceptors import server_interceptors as auth_interceptors

        chain.extend(auth_interceptors(config, service))
    return chain


def service_credentials(config: MeshConfig, service: str) -> grpc.ServerCredentials | None:
    """TLS server credentials of ``service`` (its own certificate), or None without TLS."""
    if not config.auth.tls.enabled:
        return None
    from mesh.auth.tls import server_credentials

    return server_credentials(config, service)
