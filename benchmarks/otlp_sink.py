"""A local OTLP/gRPC trace receiver for the tracing-on rows: accepts and counts spans.

``python -m benchmarks.otlp_sink`` prints ``otlp: http://127.0.0.1:PORT``; on SIGTERM it
prints ``spans: N`` (how many spans it received) to stderr and exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.common import quiet_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(  # noqa: N802 - gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans += len(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve() -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # opentelemetry-proto ships its grpc module without type hints.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"otlp: http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    print(f"spans: {sink.spans}", file=sys.stderr, flush=True)


def main() -> int:
    quiet_grpc()
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
