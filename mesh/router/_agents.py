"""The gRPC adapter of the agent-stream port (``mesh.router._port``).

The engine asks for "a stream to agent X carrying this first request" and gets an
:class:`AgentCall` plus its first event; it never sees a channel, a stub or a status.
The adapter picks a replica, reuses a pooled long-lived ``Agent/Chat`` stream when
one is idle (any conversation: every request carries its own conversation and hop
context), opens a new one otherwise, and fails over to another replica when a
replica refuses or dies before its first event.

Identity survives pooling: a stream is reused only for the same delegated token
(the bearer the agent validated when the stream opened), so a turn never runs at
the agent under another user's token.

A turn's (or handoff's) history is filled in for the stream it goes on: an agent that keeps
the histories sent on a stream (``mesh.kept``) gets only what it does not keep, and
a conversation's next turn prefers the replica and idle stream that keep its history.

Events are relayed as the agent serialized them: the engine peeks at the kind
(``mesh.router._wire.peek_kind``) and parses only finals, handoffs and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh import telemetry
from mesh.convert import message_to_pb
from mesh.errors import HistoryNotKept, MeshError, Unavailable, decode_details, from_status
from mesh.kept import HEADER, HEADER_VALUE, ROUTER_BYTES, KeptHistories, overlap
from mesh.providers.base import ChatMessage
from mesh.router._pool import AgentPool, Endpoint
from mesh.router._port import AgentCall, HopCall, history_body
from mesh.v1 import types_pb2

log = logging.getLogger("mesh.router")

CHAT_METHOD = "/mesh.v1.AgentService/Chat"
OPEN_ATTEMPTS = 3


@dataclass(eq=False)
class _Stream:
    """A gRPC ``Agent/Chat`` call and where it goes."""

    call: Any
    endpoint: Endpoint
    key: str
    pool: StreamPool
    idle_since: float = 0.0
    agent: str = field(init=False)
    address: str = field(init=False)
    kept: KeptHistories | None = field(default_factory=lambda: KeptHistories(ROUTER_BYTES))
    """What the agent keeps of the histories sent on this stream (``mesh.kept``): recorded
    from the first turn, named in a turn once the agent's response headers (read with the
    first event) say it keeps them, None when they say it does not."""
    headers_read: bool = False
    writing: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    """One write at a time: the answers of CONSULTs run in parallel (and approval
    answers) reach the same stream concurrently, and grpc core refuses a second
    pending write (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS: the answer would be lost)."""

    def __post_init__(self) -> None:
        self.agent = self.endpoint.agent
        self.address = self.endpoint.address

    def fill(self, request: types_pb2.ChatRequest, history: Sequence[ChatMessage]) -> None:
        """Put the turn's history in ``request``: only what the agent does not keep for
        the conversation on this stream, then record it as kept."""
        turn = history_body(request)
        del turn.history[:]
        turn.ClearField("kept")
        kept, conversation, count = self.kept, turn.conversation_id, 0
        if kept is not None and conversation:
            prior = kept.get(conversation) if self.headers_read else None
            if prior:
                skip, count = overlap(prior, history)
                if count:
                    turn.kept.skip = skip
                    turn.kept.count = count
                    telemetry.metrics.history_messages.labels(self.agent, "kept").inc(count)
            kept.put(conversation, history)
        if len(history) > count:
            turn.history.extend(message_to_pb(m) for m in history[count:])
            sent = len(history) - count
            telemetry.metrics.history_messages.labels(self.agent, "sent").inc(sent)

    async def send(self, request: types_pb2.ChatRequest) -> None:
        async with self.writing:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.call.write(request)  # a failure's status comes with the next read

    async def read(self) -> bytes | None:
        try:
            data = await self.call.read()
        except grpc.aio.AioRpcError as err:
            trailing = list(err.trailing_metadata() or ())
            raise self.pool.status_error(err.code(), err.details(), trailing, self) from None
        if data is grpc.aio.EOF:
            code = await self.call.code()
            if code == grpc.StatusCode.OK:
                return None
            trailing = list(await self.call.trailing_metadata() or ())
            raise self.pool.status_error(code, await self.call.details(), trailing, self)
        assert isinstance(data, bytes)
        if not self.headers_read:
            self.headers_read = True
            headers = await self.call.initial_metadata()
            if (HEADER, HEADER_VALUE) not in tuple(headers or ()):
                self.kept = None
        return data

    def finish(self, reusable: bool) -> None:
        self.endpoint.active -= 1
        if reusable and not self.call.done():
            self.pool.give_back(self)
        else:
            self.call.cancel()


def _token_key(token: str | None) -> str:
    return hashlib.blake2b(token.encode(), digest_size=16).hexdigest() if token else ""


_closing: set[asyncio.Task[None]] = set()


async def _close(call: Any) -> None:
    """Half-close an idle stream so the agent ends it cleanly (OK), then drop it."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
        async with asyncio.timeout(1.0):
            await call.done_writing()
            await call.read()
    call.cancel()


def _close_later(call: Any) -> None:
    task = asyncio.ensure_future(_close(call))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class StreamPool:
    """Idle long-lived agent streams per replica and delegated token, bounded.

    A stream idle longer than ``keep_s`` is closed by one sweeper per pool (no timer
    per stream); at most ``max_idle`` idle streams per replica are kept.
    """

    def __init__(
        self,
        pool: AgentPool,
        *,
        keep_s: float,
        max_idle: int,
        connect_timeout: float,
    ) -> None:
        self.pool = pool
        self.keep_s = keep_s
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: dict[Endpoint, dict[str, list[_Stream]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        telemetry.metrics.watch_pool(pool)
        self.opened = 0
        """Agent calls opened (a counter for tests and metrics)."""
        self.reused = 0
        """Turns sent on a pooled stream."""

    # -- the pool ----------------------------------------------------------------------

    def _keeper(self, endpoint: Endpoint, key: str, conversation: str) -> int:
        """The index of an idle stream that keeps ``conversation``'s history, or -1."""
        streams = self._idle.get(endpoint, {}).get(key, ())
        for index in range(len(streams) - 1, -1, -1):
            kept = streams[index].kept
            if kept is not None and conversation in kept:
                return index
        return -1

    def _take(self, endpoint: Endpoint, key: str, conversation: str = "") -> _Stream | None:
        """An idle stream; one that keeps ``conversation``'s history when there is one."""
        streams = self._idle.get(endpoint, {}).get(key)
        if streams and conversation:
            index = self._keeper(endpoint, key, conversation)
            if index >= 0:
                streams.append(streams.pop(index))
        while streams:
            stream = streams.pop()
            if not stream.call.done():
                telemetry.metrics.agent_streams.labels(endpoint.agent, "reused").inc()
                return stream
        return None

    def give_back(self, stream: _Stream) -> None:
        if self.keep_s <= 0 or not stream.endpoint.healthy:
            _close_later(stream.call)
            return
        by_key = self._idle.setdefault(stream.endpoint, {})
        if sum(len(v) for v in by_key.values()) >= self.max_idle:
            _close_later(stream.call)
            return
        stream.idle_since = asyncio.get_running_loop().time()
        by_key.setdefault(stream.key, []).append(stream)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    def evict(self, endpoint: Endpoint) -> bool:
        """Close every idle stream to ``endpoint``; True when there were any."""
        by_key = self._idle.pop(endpoint, {})
        streams = [s for v in by_key.values() for s in v]
        for stream in streams:
            _close_later(stream.call)
        return bool(streams)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self._idle:
            await asyncio.sleep(max(self.keep_s / 4, 0.05))
            cutoff = loop.time() - self.keep_s
            for endpoint in list(self._idle):
                by_key = self._idle[endpoint]
                for key in list(by_key):
                    keep = []
                    for stream in by_key[key]:
                        if stream.idle_since < cutoff or stream.call.done():
                            _close_later(stream.call)
                        else:
                            keep.append(stream)
                    if keep:
                        by_key[key] = keep
                    else:
                        del by_key[key]
                if not by_key:
                    del self._idle[endpoint]

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        calls = [s.call for by_key in self._idle.values() for v in by_key.values() for s in v]
        self._idle.clear()
        await asyncio.gather(*(_close(c) for c in calls), return_exceptions=True)

    # -- statuses ----------------------------------------------------------------------

    def status_error(
        self,
        code: grpc.StatusCode,
        details: str | None,
        trailing: Sequence[tuple[str, str | bytes]] | None,
        stream: _Stream | None = None,
    ) -> MeshError:
        pairs = [(str(k), v) for k, v in (trailing or ())]
        err = from_status(code, details or "", pairs)
        if stream is not None and _replica_down(code, pairs):
            self.pool.mark_failed(stream.endpoint)
        return err

    # -- opening -----------------------------------------------------------------------

    def _new_call(self, endpoint: Endpoint, hop: HopCall) -> Any:
        metadata: list[tuple[str, str]] = [("x-request-id", hop.request_id)]
        if hop.token:
            metadata.append(("authorization", f"Bearer {hop.token}"))
        if hop.traceparent:
            metadata.append(("traceparent", hop.traceparent))
        method: Any = endpoint.channel.stream_stream(
            CHAT_METHOD,
            request_serializer=types_pb2.ChatRequest.SerializeToString,
            response_deserializer=None,
        )
        self.opened += 1
        telemetry.metrics.agent_streams.labels(endpoint.agent, "new").inc()
        return method(metadata=tuple(metadata))

    async def _first(
        self,
        stream: _Stream,
        request: types_pb2.ChatRequest,
        history: Sequence[ChatMessage] | None,
    ) -> bytes | None:
        """Send the request and read the first event; None when the stream ended first."""
        if history is not None:
            stream.fill(request, history)
        await stream.send(request)
        return await stream.read()

    async def open(
        self, agent: str, request: types_pb2.ChatRequest, hop: HopCall
    ) -> tuple[AgentCall, bytes]:
        """A stream to ``agent`` that has taken ``request``, and its first event.

        A pooled stream that turns out closed is dropped and the turn sent again
        (nothing reached the agent's model). A replica that refuses a new stream as
        down or draining is skipped and another tried; nothing has reached the client
        yet, so nothing is replayed.
        """
        key = _token_key(hop.token)
        history = hop.history
        conversation = history_body(request).conversation_id if history is not None else ""
        tried: set[str] = set()
        evicted = False
        last: MeshError | None = None
        for _attempt in range(OPEN_ATTEMPTS):
            endpoint = await self._pick(agent, tried, hop, conversation)
            if endpoint is None:
                break
            endpoint.active += 1
            reused = await self._reuse(endpoint, key, conversation, request, history)
            if reused is not None:
                return reused
            stream = _Stream(self._new_call(endpoint, hop), endpoint, key, self)
            try:
                first = await self._first(stream, request, history)
                if first is not None:
                    return stream, first
                err: MeshError = Unavailable(f"agent {agent} ended the stream without an event")
                down = False
            except MeshError as mapped:
                err = mapped
                down = _replica_down(err.code, [], err.reason)
            endpoint.active -= 1
            stream.call.cancel()
            tried.add(endpoint.address)
            if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not evicted:
                # The agent is out of streams: give back the idle ones kept there.
                evicted = True
                if self.evict(endpoint):
                    tried.discard(endpoint.address)
                    continue
            if not down:
                raise err
            log.info(
                "replica %s of %s unavailable before its first event (%s); trying another",
                endpoint.address,
                agent,
                err.reason or err.code.name,
            )
            last = err
        detail = f": {last.message}" if last else ""
        raise Unavailable(f"no healthy replica of agent {agent!r}{detail}")

    async def _reuse(
        self,
        endpoint: Endpoint,
        key: str,
        conversation: str,
        request: types_pb2.ChatRequest,
        history: Sequence[ChatMessage] | None,
    ) -> tuple[_Stream, bytes] | None:
        """The request sent on an idle stream, and its first event; None when there is
        none that still works (each one found closed is dropped)."""
        stream = self._take(endpoint, key, conversation)
        while stream is not None:
            self.reused += 1
            try:
                first = await self._first(stream, request, history)
            except MeshError as err:
                if isinstance(err, HistoryNotKept):  # sent again, whole, on another stream
                    log.info("%s at %s: %s", endpoint.agent, endpoint.address, err.message)
                first = None
            if first is not None:
                return stream, first
            stream.call.cancel()
            stream = self._take(endpoint, key, conversation)
        return None

    def _keeps(self, key: str, conversation: str) -> Callable[[Endpoint], bool] | None:
        """Whether an endpoint has an idle stream that keeps ``conversation``'s history."""
        if not conversation:
            return None

        return lambda endpoint: self._keeper(endpoint, key, conversation) >= 0

    async def _pick(
        self, agent: str, tried: set[str], hop: HopCall, conversation: str = ""
    ) -> Endpoint | None:
        endpoint = self.pool.pick(agent, tried, self._keeps(_token_key(hop.token), conversation))
        if endpoint is None and not tried and agent in self.pool.endpoints:
            # Give a starting (or re-probed) replica up to the connect timeout.
            wait = self.connect_timeout
            if hop.timeout is not None:
                wait = min(wait, hop.timeout)
            if await self.pool.wait_healthy(agent, wait):
                endpoint = self.pool.pick(agent, tried)
        return endpoint


def _replica_down(
    code: grpc.StatusCode, trailing: Sequence[tuple[str, str | bytes]], reason: str | None = None
) -> bool:
    """A status that says the replica (not the turn) failed: transport loss or a drain."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return False
    if reason is None:
        reason = decode_details(trailing)[0]
    return reason in ("", "DRAINING")
