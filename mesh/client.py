"""Client side: channels made in one place, and a small Chat client.

Channels are long-lived (a unary call costs about 2.4 times a message on an open
stream): make one per target and keep it. Errors come back as the
:class:`~mesh.errors.MeshError` the server raised (:func:`mesh.errors.from_rpc_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh.config import ServerSettings
from mesh.errors import MeshError, from_rpc_error, from_status
from mesh.v1 import agent_pb2, agent_pb2_grpc, router_pb2_grpc, types_pb2


def channel_options(settings: ServerSettings | None = None) -> list[tuple[str, Any]]:
    s = settings or ServerSettings()
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
    ]


def create_channel(
    target: str,
    *,
    settings: ServerSettings | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
    own_connection: bool = False,
    options: Sequence[tuple[str, Any]] = (),
    forward_context: bool = True,
) -> grpc.aio.Channel:
    """One channel to ``target`` with the mesh's limits (and interceptors, e.g. token exchange).

    The call context of the call being served (request id, conversation id, hop path,
    W3C trace context) is written into every outgoing call's metadata, auth on or off
    (:func:`~mesh.interceptors.context_interceptors`); the router's agent
    channels turn that off (``forward_context=False``): each turn carries its context
    in the request.

    Channels to the same target share one HTTP/2 connection unless ``own_connection``;
    a client holding more streams than the server allows per connection
    (``server.http2_max_streams_per_connection``) needs several channels that each own one.
    """
    from mesh.interceptors import context_interceptors

    all_options = [*channel_options(settings), *options]
    if own_connection:
        all_options.append(("grpc.use_local_subchannel_pool", 1))
    chain = [*context_interceptors(), *interceptors] if forward_context else list(interceptors)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=all_options, interceptors=chain)
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=chain)


@dataclass
class TurnResult:
    """Everything one turn produced."""

    events: list[types_pb2.ChatEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.delta.text for e in self.events if e.WhichOneof("kind") == "delta")

    @property
    def final(self) -> types_pb2.ChatEvent | None:
        for event in reversed(self.events):
            if event.WhichOneof("kind") == "final":
                return event
        return None


def turn_request(
    message: str,
    *,
    conversation_id: str = "",
    agent: str = "",
    context: Mapping[str, str] | None = None,
    history: Sequence[types_pb2.Message] = (),
    turn_id: str = "",
) -> types_pb2.ChatRequest:
    return types_pb2.ChatRequest(
        turn=types_pb2.Turn(
            conversation_id=conversation_id,
            message=message,
            agent=agent,
            context=dict(context or {}),
            history=list(history),
            turn_id=turn_id,
        )
    )


class ChatStream:
    """One open Chat call; several turns can go through it, one after the other."""

    def __init__(self, call: grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent]):
        self.call = call
        self._writing = asyncio.Lock()
        """One write at a time (a cancel and an approval answer may race): grpc core
        refuses a second pending write."""

    async def send(self, request: types_pb2.ChatRequest) -> None:
        async with self._writing:
            await self.call.write(request)

    async def turn(self, request: types_pb2.ChatRequest) -> AsyncIterator[types_pb2.ChatEvent]:
        """Send a turn and yield its events until its final (or error) event."""
        await self.send(request)
        async for event in self.events():
            yield event

    async def events(self) -> AsyncIterator[types_pb2.ChatEvent]:
        """The events of the turn in flight, until its final (or error) event."""
        while True:
            try:
                event = await self.call.read()
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            if event is grpc.aio.EOF:
                failure = await self.status_error()
                if failure is not None:
                    raise failure
                return
            assert isinstance(event, types_pb2.ChatEvent)
            yield event
            if event.WhichOneof("kind") in ("final", "error"):
                return

    async def status_error(self) -> MeshError | None:
        """The error the call's status stands for (None when it ended OK); waits for
        the status when the call has not ended yet."""
        code = await self.call.code()
        if code == grpc.StatusCode.OK:
            return None
        trailing = await self.call.trailing_metadata()
        return from_status(code, await self.call.details() or "", list(trailing or ()))

    async def request_cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the server to cancel the turn in flight; it ends it with a final
        event (``stop_reason`` ``cancelled``) and the stream stays usable."""
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self.send(types_pb2.ChatRequest(cancel=types_pb2.Cancel(reason=reason)))

    async def close(self) -> None:
        """Half-close: no more requests from this side."""
        async with self._writing:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self.call.done_writing()

    async def finish(self, timeout: float = 10.0) -> grpc.StatusCode:
        """End the call cleanly: half-close, then read to the end so that the server
        finishes it with OK (a cancel would be audited as CANCELLED). Cancels only
        when the server does not end it within ``timeout``."""
        await self.close()
        try:
            async with asyncio.timeout(timeout):
                while await self.call.read() is not grpc.aio.EOF:
                    pass
                return await self.call.code()
        except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError):
            self.call.cancel()
            return grpc.StatusCode.CANCELLED

    def cancel(self) -> None:
        self.call.cancel()


class AgentClient:
    """Calls ``mesh.v1.AgentService`` (or ``mesh.v1.RouterService``, which has the same Chat)."""

    def __init__(self, channel: grpc.aio.Channel, *, router: bool = False) -> None:
        self.channel = channel
        self._router = router
        self._agent = agent_pb2_grpc.AgentServiceStub(channel)
        self._router_stub = router_pb2_grpc.RouterServiceStub(channel)

    def open(
        self,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> ChatStream:
        stub = self._router_stub if self._router else self._agent
        return ChatStream(stub.Chat(metadata=tuple(metadata), timeout=timeout))

    async def chat(
        self,
        message: str,
        *,
        conversation_id: str = "",
        agent: str = "",
        context: Mapping[str, str] | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 300.0,
    ) -> TurnResult:
        """One turn on a new stream; returns all its events."""
        stream = self.open(metadata=metadata, timeout=timeout)
        result = TurnResult()
        try:
            request = turn_request(
                message, conversation_id=conversation_id, agent=agent, context=context
            )
            async for event in stream.turn(request):
                result.events.append(event)
        except BaseException:
            stream.cancel()
            raise
        await stream.finish()
        return result

    async def info(self, *, timeout: float = 10.0) -> types_pb2.AgentInfo:
        try:
            response = await self._agent.Info(agent_pb2.InfoRequest(), timeout=timeout)
            return response.info
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
