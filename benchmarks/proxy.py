"""The practical limit of a Python relay: a naive raw-bytes grpc.aio proxy.

Every bidi call it receives (any method) is forwarded to one upstream, on one shared
channel, as opaque bytes: no (de)serialization, no routing, no auth, no memory. One
task pumps requests upstream; the handler yields the upstream's messages back. The
router is judged against this in the same run.

``python -m benchmarks.proxy --upstream HOST:PORT [--uvloop]`` prints ``proxy: HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from benchmarks.common import quiet_grpc, use_uvloop

_LIMITS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class RawProxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self.upstream = upstream

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        # No serializers on either side: requests and responses stay bytes.
        forward: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self.upstream.stream_stream(
            method
        )

        async def relay(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            remaining = context.time_remaining()
            call = forward(timeout=remaining)

            async def pump() -> None:
                async for request in requests:
                    await call.write(request)
                await call.done_writing()

            pumping = asyncio.ensure_future(pump())
            try:
                async for response in call:
                    yield response
            finally:
                pumping.cancel()
                call.cancel()

        return grpc.stream_stream_rpc_method_handler(relay)


async def serve(upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=_LIMITS[1:])
    server = grpc.aio.server(
        options=[
            *_LIMITS,
            ("grpc.max_concurrent_streams", 20000),
            ("grpc.server.max_pending_requests", 30000),
        ],
        maximum_concurrent_rpcs=30000,
    )
    server.add_generic_rpc_handlers((RawProxy(channel),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"proxy: 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    with contextlib.suppress(grpc.RpcError):
        await channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward every call to")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    quiet_grpc()
    use_uvloop(args.uvloop)
    asyncio.run(serve(args.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
