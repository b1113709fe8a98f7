"""The floor: a bare grpc.aio bidi server that sends the same messages an agent would.

No interceptors, no health, no runtime: for every ``ChatRequest`` it streams the
deltas and the final event agent ``a`` would stream for it (same text, same
chunking, same ids' lengths), so the bytes on the wire match the mesh's.

``python -m benchmarks.echo [--uvloop]`` prints ``echo: HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from benchmarks.common import CHUNK_CHARS, ECHO_SERVICE, quiet_grpc, reply_for, use_uvloop
from mesh.config import ServerSettings
from mesh.providers.offline import chunk_text
from mesh.server import server_options
from mesh.v1 import types_pb2


async def chat(
    requests: AsyncIterator[types_pb2.ChatRequest], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[types_pb2.ChatEvent]:
    seq = 0
    async for request in requests:
        turn = request.turn
        conversation = turn.conversation_id or uuid.uuid4().hex
        turn_id = turn.turn_id or uuid.uuid4().hex[:12]
        text = reply_for(turn.message)
        for chunk in chunk_text(text, CHUNK_CHARS):
            seq += 1
            yield types_pb2.ChatEvent(
                agent="a",
                seq=seq,
                conversation_id=conversation,
                turn_id=turn_id,
                delta=types_pb2.TextDelta(text=chunk),
            )
        seq += 1
        yield types_pb2.ChatEvent(
            agent="a",
            seq=seq,
            conversation_id=conversation,
            turn_id=turn_id,
            final=types_pb2.FinalMessage(
                content=text,
                usage=types_pb2.Usage(
                    input_tokens=len(turn.message.split()), output_tokens=len(text.split())
                ),
                stop_reason=types_pb2.STOP_REASON_END_TURN,
                hop_path=["a"],
            ),
        )


async def serve(settings: ServerSettings) -> None:
    server = grpc.aio.server(
        options=server_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs
    )
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Chat": grpc.stream_stream_rpc_method_handler(
                chat,
                request_deserializer=types_pb2.ChatRequest.FromString,
                response_serializer=types_pb2.ChatEvent.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{settings.host}:0")
    await server.start()
    print(f"echo: {settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    quiet_grpc()
    use_uvloop(args.uvloop)
    settings = ServerSettings(max_concurrent_rpcs=30000, max_concurrent_streams=20000)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
