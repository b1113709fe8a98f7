"""How a server's work streams live: counted, drained, and woken without a task each.

:class:`Lifecycle` counts work streams (for the stream limit) and turns in flight (for
the drain); :class:`Mailbox` is a stream's single-consumer queue; :func:`next_request`
waits for a stream's next item, ending it at the idle timeout or when the drain starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.errors import Draining, IdleTimeout, ResourceExhausted


class Mailbox:
    """A stream's queue with one consumer (``asyncio.Queue`` costs about 3 KiB, and a
    router holding 10,000 idle streams keeps two per stream). Items go onto one list
    and come off a reversed copy: O(1) per item, however long a reply queues up."""

    __slots__ = ("_incoming", "_outgoing", "_waiter")

    def __init__(self) -> None:
        self._incoming: list[object] = []
        self._outgoing: list[object] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: object) -> None:
        self._incoming.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._incoming and not self._outgoing

    async def get(self) -> object:
        """The oldest item, once there is one (one consumer at a time)."""
        while self.empty():
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        if not self._outgoing:
            self._incoming.reverse()
            self._outgoing, self._incoming = self._incoming, []
        return self._outgoing.pop()


class Lifecycle:
    """Counts work streams (for the stream limit) and turns in flight (for the drain);
    refuses new streams while draining and beyond ``max_streams``.

    A drain waits for turns, not streams: a router keeps idle pooled streams open at
    an agent, and those end at once when the drain starts (see :func:`next_request`).
    """

    def __init__(self, max_streams: int | None = None) -> None:
        self.max_streams = max_streams
        self.draining = asyncio.Event()
        self._active = 0
        self._turns = 0
        self.started = 0
        """Work streams ever started (a counter for tests and metrics)."""
        self.turns_started = 0
        """Turns ever started."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.waiting: set[Mailbox] = set()
        """Inboxes of streams waiting for their next request (see :func:`next_request`)."""

    def start_draining(self) -> None:
        """Refuse new work from now on, and end every stream that waits idle."""
        self.draining.set()
        for inbox in list(self.waiting):
            inbox.put_nowait(_DRAIN)

    @property
    def active(self) -> int:
        """Work streams open now."""
        return self._active

    @property
    def turns(self) -> int:
        """Turns in flight now."""
        return self._turns

    def check(self) -> None:
        if self.draining.is_set():
            raise Draining("server is shutting down; retry on another replica")
        if self.max_streams is not None and self._active >= self.max_streams:
            raise ResourceExhausted(
                f"{self._active} streams in flight, the limit (server.max_concurrent_streams)"
            )

    @contextlib.asynccontextmanager
    async def work(self) -> AsyncIterator[None]:
        """Wrap one work RPC (a Chat or Handoff stream)."""
        self.check()
        self._active += 1
        self.started += 1
        try:
            yield
        finally:
            self._active -= 1

    def turn_started(self) -> None:
        self._turns += 1
        self.turns_started += 1
        self._idle.clear()

    def turn_ended(self) -> None:
        self._turns -= 1
        if self._turns == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn is in flight; False when the timeout ran out first."""
        return await wait_set(self._idle, timeout)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until ``event`` is set; False when it was not."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


_DRAIN = object()
"""Put into idle streams' inboxes when the drain starts."""


async def next_request(inbox: Mailbox, lifecycle: Lifecycle, idle: float) -> object:
    """The next item a stream's reader queued.

    Raises IdleTimeout when none comes within ``idle`` seconds, and Draining when the
    server starts draining first: an idle stream holds no turn worth waiting for.
    No task per wait: the drain puts a sentinel into every waiting inbox.
    """
    if lifecycle.draining.is_set() and inbox.empty():
        raise Draining("server is shutting down; open a new stream to continue")
    lifecycle.waiting.add(inbox)
    try:
        async with asyncio.timeout(idle):
            item = await inbox.get()
    except TimeoutError:
        raise IdleTimeout(f"stream idle for {idle:g}s with no request; closed") from None
    finally:
        lifecycle.waiting.discard(inbox)
    if item is _DRAIN:
        raise Draining("server is shutting down; open a new stream to continue")
    return item
