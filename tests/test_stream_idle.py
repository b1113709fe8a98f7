"""What an idle stream holds: the mailbox, and nothing of the turn it last carried.

A router holds every client's Chat stream between turns (10,000 idle streams is a
benchmarked case), so whatever one idle stream keeps is multiplied. These run the
shared turn-stream plumbing (:mod:`mesh.streams`) in process, with requests fed
through a real async iterator, and look at what survives a finished turn.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator

import grpc
import pytest

from mesh.errors import Draining, IdleTimeout
from mesh.interceptors import RequestGuardInterceptor
from mesh.lifecycle import Lifecycle, Mailbox, next_request
from mesh.streams import Emitter, TurnEnd, TurnStream


class _Turn:
    """A turn big enough to matter, and weakly referenceable."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.state = [text] * 100


class _Echo(TurnStream[str, _Turn]):
    def __init__(self) -> None:
        super().__init__(Lifecycle(), idle_timeout=30)
        self.seen: list[weakref.ref[_Turn]] = []

    def accept(self, request: str, first: bool) -> _Turn:
        turn = _Turn(request)
        self.seen.append(weakref.ref(turn))
        return turn

    async def produce(self, turn: _Turn, emitter: Emitter) -> TurnEnd:
        emitter.emit(f"delta {turn.text}")
        return TurnEnd(final=f"final {turn.text}")

    def cancelled(self, turn: _Turn) -> str:
        return "cancelled"


async def test_an_idle_stream_keeps_nothing_of_its_last_turn() -> None:
    requests: asyncio.Queue[str | None] = asyncio.Queue()

    async def feed() -> AsyncIterator[str]:
        while (item := await requests.get()) is not None:
            yield item

    stream = _Echo()
    events = stream.run(feed())
    requests.put_nowait("one")
    assert [await anext(events), await anext(events)] == ["delta one", "final one"]
    # The generator now waits for the next request (its frame and the reader's are live).
    waiting = asyncio.ensure_future(anext(events))
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    assert not waiting.done()
    assert stream.seen[0]() is None, "the finished turn is still referenced by the idle stream"

    requests.put_nowait("two")
    assert await waiting == "delta two"
    assert await anext(events) == "final two"
    requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(events)


async def test_mailbox_hands_items_over_in_order_and_wakes_its_consumer() -> None:
    box = Mailbox()
    assert box.empty()
    box.put_nowait(1)
    box.put_nowait(2)
    assert [await box.get(), await box.get()] == [1, 2]
    getter = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    assert not getter.done()
    box.put_nowait(3)
    assert await getter == 3


async def test_mailbox_keeps_order_across_interleaved_puts_and_gets() -> None:
    box = Mailbox()
    got = []
    for item in range(10_000):
        box.put_nowait(item)
        if item % 3 == 0:
            got.append(await box.get())
    while not box.empty():
        got.append(await box.get())
    assert got == list(range(10_000))


async def test_a_cancelled_wait_leaves_the_item_for_the_next_get() -> None:
    box = Mailbox()
    getter = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    box.put_nowait("kept")
    assert await box.get() == "kept"


async def test_next_request_ends_idle_streams_at_a_drain_and_after_the_idle_timeout() -> None:
    lifecycle = Lifecycle()
    box = Mailbox()
    waiting = asyncio.ensure_future(next_request(box, lifecycle, 30))
    await asyncio.sleep(0)
    assert lifecycle.waiting == {box}
    lifecycle.start_draining()
    with pytest.raises(Draining):
        await waiting
    assert not lifecycle.waiting

    with pytest.raises(IdleTimeout):
        await next_request(Mailbox(), Lifecycle(), 0.01)


def _handler() -> grpc.RpcMethodHandler[bytes, bytes]:
    async def chat(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    return grpc.stream_stream_rpc_method_handler(chat)


async def test_the_request_guard_is_built_once_per_registered_handler() -> None:
    handler = _handler()

    async def registered(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        return handler

    class Details(grpc.HandlerCallDetails):
        method = "/mesh.v1.AgentService/Chat"
        invocation_metadata = ()

    guard = RequestGuardInterceptor()
    first = await guard.intercept_service(registered, Details())
    again = await guard.intercept_service(registered, Details())
    assert first is again and first is not handler

    # Innermost in the chain (auth outside it), the guard sees the registered handler
    # on every call; were it ever handed a per-call handler, it would not reuse the guard
    # built for another one.
    other = _handler()

    async def per_call(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        return other

    third = await guard.intercept_service(per_call, Details())
    assert third is not first
