"""Writes that race on one stream all arrive (the parallel CONSULT answers case).

A triage agent that consults billing and orders at once gets both answers written
into its one open stream, often at the same moment. grpc core allows one pending
write per call and refuses a second with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS; the
router used to swallow that and lose the answer, and the turn hung until its
deadline. Here a real server counts what reached it of answers written in pairs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from mesh.client import ChatStream
from mesh.router._agents import CHAT_METHOD, _Stream
from mesh.v1 import types_pb2

PAIRS = 20
"""Two writes started together fail about two times in three without the fix."""


class CountingServer:
    """A Chat method that reads every request, then answers with the call ids it saw."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()

    async def _chat(self, requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        seen = []
        async for data in requests:
            seen.append(types_pb2.ChatRequest.FromString(data).consult_result.call_id)
            if len(seen) == 2 * PAIRS:
                break
        yield types_pb2.ChatEvent(
            final=types_pb2.FinalMessage(content=",".join(sorted(seen)))
        ).SerializeToString()

    async def start(self) -> str:
        handler: Any = grpc.stream_stream_rpc_method_handler(self._chat)
        service, method = CHAT_METHOD.lstrip("/").split("/")
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"


def _answer(call_id: str) -> types_pb2.ChatRequest:
    return types_pb2.ChatRequest(consult_result=types_pb2.ConsultResult(call_id=call_id))


async def _race(send: Callable[[types_pb2.ChatRequest], Awaitable[None]]) -> list[str]:
    """PAIRS times, two answers written at the same moment; the ids that were sent."""
    sent = []
    for n in range(PAIRS):
        pair = [f"call_{n:02d}_a", f"call_{n:02d}_b"]
        await asyncio.wait_for(asyncio.gather(*(send(_answer(c)) for c in pair)), timeout=30)
        sent += pair
    return sorted(sent)


@pytest.mark.parametrize("side", ["router", "client"])
async def test_two_answers_written_at_once_both_arrive(side: str) -> None:
    counting = CountingServer()
    address = await counting.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            method: Any = channel.stream_stream(
                CHAT_METHOD,
                request_serializer=types_pb2.ChatRequest.SerializeToString,
                response_deserializer=None if side == "router" else types_pb2.ChatEvent.FromString,
            )
            call = method()
            await asyncio.wait_for(call.wait_for_connection(), timeout=30)
            if side == "router":
                stream = _Stream(call, endpoint=_FakeEndpoint(), key="", pool=None)  # type: ignore[arg-type]
                sent = await _race(stream.send)
                data = await asyncio.wait_for(stream.call.read(), timeout=30)
                content = types_pb2.ChatEvent.FromString(data).final.content
            else:
                chat = ChatStream(call)
                sent = await _race(chat.send)
                event = await asyncio.wait_for(call.read(), timeout=30)
                content = event.final.content
            assert content.split(",") == sent  # the server saw every answer
            call.cancel()
    finally:
        await counting.server.stop(None)


class _FakeEndpoint:
    agent = "triage"
    address = "held"
