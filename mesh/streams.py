"""The bidirectional turn stream, written once for the agent and router servicers.

A Chat-like stream carries turns one after another. One reader task per stream
takes requests off the wire (new turns, cancels, CONSULT answers); the stream's
own generator runs each turn as a task and relays its events, stamped with a
sequence number. A cancel stops the turn in flight and answers with a cancelled
final; the stream stays open for the next turn.

Drain: a stream refused because the server drains reads its first request before
the refusal (grpc/grpc#36066: a client still writing would see INTERNAL instead of
UNAVAILABLE); a turn in flight when the drain starts finishes and the stream then
ends OK, as does an idle stream that has carried turns (a router's pooled stream);
a stream that never carried a turn ends UNAVAILABLE (``DRAINING``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from mesh.errors import Draining, MeshError, ResourceExhausted
from mesh.lifecycle import Lifecycle, Mailbox, next_request

log = logging.getLogger("mesh.streams")

Req = TypeVar("Req")
TurnT = TypeVar("TurnT")
Event = Any
"""A ChatEvent message, or its serialized bytes when a relay passes it through."""

_EOF = object()
_SETTLE_S = 0.25
"""How long a failing stream waits for the client's writes in flight before aborting."""


@dataclass(frozen=True)
class TurnEnd:
    """The last item a turn puts on the stream's queue."""

    error: MeshError | None = None
    final: Event = None
    """An event sent after the turn's own (e.g. the router's stamped final)."""
    last: bool = False
    """End the stream after this turn (END_CONVERSATION, one-turn Handoff)."""


class Emitter:
    """What a running turn uses to send events: ``emit(event)`` then ``done(...)``."""

    __slots__ = ("_queue",)

    def __init__(self, queue: Mailbox) -> None:
        self._queue = queue

    def emit(self, event: Event) -> None:
        self._queue.put_nowait(event)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: MeshError) -> None:
    """End the call with the error's status and rich details."""
    await context.abort(err.code, err.message, err.trailing_metadata())


async def refuse_after_first(requests: AsyncIterator[Any], timeout: float = 1.0) -> None:
    """Read (at most) the first request, so a refusal reaches a writing client intact."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            async for _request in requests:
                break


class TurnStream(Generic[Req, TurnT]):
    """One bidi call carrying turns; subclasses say how requests and turns are handled.

    ``accept`` turns a request into a turn to queue (or handles it and returns None);
    ``produce`` runs one turn, emitting events; ``cancelled`` and ``failed`` give the
    events that end a cancelled or failed turn; ``stamp`` numbers outgoing events.
    """

    one_turn = False
    max_waiting = 8
    """Turns a client may send ahead of the one in flight (they run in order)."""

    def __init__(
        self, lifecycle: Lifecycle, idle_timeout: float, waiting_bytes: int = 4 << 20
    ) -> None:
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout
        self.waiting_bytes = waiting_bytes
        """The most bytes of turns waiting behind the one in flight (a server's largest
        message): a client that writes turns without reading cannot grow memory."""
        self._waiting: collections.deque[int] = collections.deque()
        self.inbox = Mailbox()
        self.out = Mailbox()
        self.emitter = Emitter(self.out)
        self.turn_task: asyncio.Task[None] | None = None
        self._cancel_requested = False
        self.seq = 0

    # -- to implement ------------------------------------------------------------------

    def accept(self, request: Req, first: bool) -> TurnT | None:
        raise NotImplementedError

    async def produce(self, turn: TurnT, emitter: Emitter) -> TurnEnd:
        raise NotImplementedError

    def cancelled(self, turn: TurnT) -> Event:
        raise NotImplementedError

    def failed(self, turn: TurnT, err: MeshError) -> Event | None:
        return None

    def stamp(self, event: Event, turn: TurnT) -> Event:
        return event

    # -- mechanics ---------------------------------------------------------------------

    def cancel_turn(self) -> None:
        if self.turn_task is not None and not self.turn_task.done():
            self._cancel_requested = True
            self.turn_task.cancel()

    @staticmethod
    async def _fail(
        err: MeshError,
        context: grpc.aio.ServicerContext[Any, Any] | None,
        reader: asyncio.Task[None] | None = None,
    ) -> None:
        """End the call with ``err``. A client may still be writing (a turn right behind
        the failed one): aborting under an in-flight write makes grpc report INTERNAL to
        it instead of the status (grpc/grpc#36066), so let the reader take what is on
        the wire first, for a moment at most."""
        if reader is not None and not reader.done():
            await asyncio.wait({reader}, timeout=_SETTLE_S)
        if context is not None:
            await abort_with(context, err)
        raise err

    def requests_ended(self) -> None:
        """The client half-closed: no request (a cancel, an answer) can come any more."""

    def _hold(self, request: Req) -> None:
        """Count a turn that waits in the inbox; refuse one past the stream's limits."""
        size = request.ByteSize() if isinstance(request, Message) else 0
        waiting = len(self._waiting)
        if waiting >= self.max_waiting or sum(self._waiting) + size > self.waiting_bytes:
            raise ResourceExhausted(
                f"{waiting} turns already wait on this stream; send the next turn after "
                "the previous one's final event"
            )
        self._waiting.append(size)

    async def _read(self, requests: AsyncIterator[Req]) -> None:
        first = True
        try:
            async for request in requests:
                turn = self.accept(request, first)
                first = False
                if turn is not None:
                    self._hold(request)
                    self.inbox.put_nowait(turn)
                del request, turn  # not kept alive while the stream waits idle
            self.requests_ended()
        except MeshError as err:
            self.inbox.put_nowait(err)
        finally:
            self.inbox.put_nowait(_EOF)

    def _turn_done(self, turn: TurnT, task: asyncio.Task[None]) -> None:
        """A turn task cancelled before it ever ran (a cancel right behind its turn)
        never reaches its own handler: end the turn here so the stream goes on."""
        if task.cancelled() and self._cancel_requested:
            self._cancel_requested = False
            self.out.put_nowait(TurnEnd(final=self.cancelled(turn)))

    async def _turn(self, turn: TurnT) -> None:
        try:
            end = await self.produce(turn, self.emitter)
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            self._cancel_requested = False
            self.out.put_nowait(TurnEnd(final=self.cancelled(turn)))
            return
        except MeshError as err:
            end = TurnEnd(error=err)
        except Exception:
            log.exception("turn failed")
            end = TurnEnd(error=MeshError("internal error"))
        self.out.put_nowait(end)

    async def run(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
    ) -> AsyncIterator[Event]:
        """The stream's events; a failure ends the call with its status (``context``),
        sent while the reader still reads: cancelling a server-side read in flight can
        lose the status (the client would wait out its deadline)."""
        reader = asyncio.ensure_future(self._read(requests))
        served = False
        try:
            while True:
                if served and self.lifecycle.draining.is_set():
                    return  # the turn in flight at the drain is done: end OK
                try:
                    item = await next_request(self.inbox, self.lifecycle, self.idle_timeout)
                except Draining:
                    if served:
                        return  # every turn it carried is done: end OK, nothing was lost
                    raise
                if item is _EOF:
                    return
                if isinstance(item, MeshError):
                    await self._fail(item, context, reader)
                turn: TurnT = item  # type: ignore[assignment]  # the inbox holds accepted turns
                self._waiting.popleft()
                self.lifecycle.turn_started()
                try:
                    self.turn_task = asyncio.ensure_future(self._turn(turn))
                    self.turn_task.add_done_callback(partial(self._turn_done, turn))
                    while True:
                        event = await self.out.get()
                        if isinstance(event, TurnEnd):
                            break
                        yield self.stamp(event, turn)
                    self.turn_task = None
                finally:
                    self.lifecycle.turn_ended()
                served = True
                if event.error is not None:
                    failure = self.failed(turn, event.error)
                    if failure is not None:
                        yield self.stamp(failure, turn)
                    await self._fail(event.error, context, reader)
                if event.final is not None:
                    yield self.stamp(event.final, turn)
                if event.last or self.one_turn:
                    return
                del item, turn, event  # an idle stream keeps nothing of its last turn
        finally:
            reader.cancel()
            task = self.turn_task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def serve_stream(
    stream: TurnStream[Any, Any],
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
    on_error: Callable[[MeshError], None] | None = None,
) -> AsyncIterator[Event]:
    """Run ``stream`` as one work RPC: counted for the drain, errors as statuses."""
    try:
        stream.lifecycle.check()
    except MeshError as err:
        await refuse_after_first(requests)
        await abort_with(context, err)
    try:
        async with stream.lifecycle.work():
            async for event in stream.run(requests, context):
                yield event
    except MeshError as err:
        if on_error is not None:
            on_error(err)
        await abort_with(context, err)
