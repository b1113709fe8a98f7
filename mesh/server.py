"""The server bootstrap every service shares.

grpc.aio with health (``grpc.health.v1``: the overall ``""`` and each service),
reflection, message-size / concurrency / keepalive limits from config, and
``grpc.so_reuseport`` 0 (two servers must never silently share a port).

Shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING at once; new work RPCs
are refused with UNAVAILABLE (``DRAINING``) so callers go to another replica;
in-flight turns finish within the grace period; then the server stops, cutting
what is left (health Watch streams never end by themselves), and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mesh import telemetry
from mesh.config import ServerSettings
from mesh.health import Health
from mesh.interceptors import RequestGuardInterceptor
from mesh.lifecycle import Lifecycle

log = logging.getLogger("mesh.server")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _cut_watch_at_drain(record: logging.LogRecord) -> bool:
    """From the drain on, drop grpc's ERROR for a health Watch whose last write or status
    lost the race with its peer leaving (a router stopping beside this agent): the peer
    is gone, nothing was lost, and an ordinary stop must not log an ERROR."""
    return not (
        record.levelno >= logging.WARNING and "/grpc.health.v1.Health/Watch" in record.getMessage()
    )


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Channel arguments for a mesh server."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Both: the soft limit alone refuses header blocks above it only at random.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        ("grpc.max_concurrent_streams", settings.http2_max_streams_per_connection),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        # A burst of new streams waits in the core's pending queue until a handler
        # takes it; past these limits the core cancels calls, however many RPCs we allow.
        ("grpc.server.max_pending_requests", settings.max_concurrent_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_concurrent_rpcs * 2),
    ]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_v1_descriptor() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` in the default pool (once), made from
    v1alpha's descriptor with the package renamed, so reflection can describe itself."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def add_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Server reflection, v1 beside v1alpha.

    grpcio-reflection ships v1alpha only; v1 has the same messages on the wire, so the
    same servicer answers both (current grpcurl, buf curl, Postman and grpcui ask v1
    first; grpcurl 1.8 asks v1alpha).
    """
    _register_v1_descriptor()
    names = [*services, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection_aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),)
        )


@dataclass(frozen=True)
class Service:
    """A servicer to register: its full name and how to add it to a server."""

    name: str
    add: Callable[[grpc.aio.Server], None]


class MeshServer:
    """One gRPC server with health, reflection, limits and a graceful drain."""

    def __init__(
        self,
        settings: ServerSettings,
        services: Sequence[Service],
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        lifecycle: Lifecycle | None = None,
        label: str = "server",
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.lifecycle = lifecycle or Lifecycle(settings.max_concurrent_streams)
        self.label = label
        self.health = Health()
        self._credentials = server_credentials
        self._server = grpc.aio.server(
            # The guard innermost: it sees the registered handlers (built once each).
            interceptors=[*interceptors, RequestGuardInterceptor()],
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        """The bound plaintext health port (0 when there is none)."""
        self._metrics: telemetry.MetricsServer | None = None
        self.metrics_port = 0
        """The bound HTTP metrics port (0 when there is none)."""
        self._stopping: asyncio.Future[None] | None = None
        self._hard_stop: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()
        self.port = 0

    @property
    def grpc_server(self) -> grpc.aio.Server:
        return self._server

    async def start(self, host: str | None = None, port: int = 0) -> int:
        """Bind and start; returns the bound port (``port`` 0 picks a free one)."""
        for service in self.services:
            service.add(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [s.name for s in self.services]
        if self.settings.reflection:
            add_reflection(self._server, [*names, HEALTH_SERVICE])
        address = f"{host or self.settings.host}:{port}"
        if self._credentials is not None:
            bound = self._server.add_secure_port(address, self._credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind {address}")
        self.port = bound
        if self.settings.health_port is not None:
            await self._start_health(host or self.settings.host, self.settings.health_port)
        telemetry.configure(self.label.replace(" ", "-"))
        telemetry.metrics.watch_streams(self.label, lambda: self.lifecycle.active)
        if self.settings.metrics_port is not None:
            self._metrics = telemetry.MetricsServer(lambda: not self.lifecycle.draining.is_set())
            self.metrics_port = await self._metrics.start(
                host or self.settings.host, self.settings.metrics_port
            )
        await self._server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def _start_health(self, host: str, port: int) -> None:
        """The same health servicer, alone and in plaintext, on a second port."""
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
            maximum_concurrent_rpcs=64,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the health port {host}:{port}")
        await server.start()
        self._health_server, self.health_port = server, bound

    async def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service, status)

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING now, refuse new work, let in-flight work finish, then stop."""
        grace = self.settings.grace_period_s if grace is None else grace
        logging.getLogger("grpc._cython.cygrpc").addFilter(_cut_watch_at_drain)
        await self.health.enter_graceful_shutdown()
        self.lifecycle.start_draining()
        log.info(
            "%s draining: %d turns in flight, grace %.1fs",
            self.label,
            self.lifecycle.turns,
            grace,
        )
        started = asyncio.get_running_loop().time()
        finished = await self.lifecycle.wait_idle(grace)
        left = grace - (asyncio.get_running_loop().time() - started)
        await self.health.watchers_ended(max(left, 1.0))
        if not finished:
            log.warning(
                "%s grace period over with %d turns in flight; cancelling them",
                self.label,
                self.lifecycle.turns,
            )
        await self._server.stop(0.5)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics is not None:
            await self._metrics.stop()
        if telemetry.state.provider is not None:
            await asyncio.to_thread(telemetry.shutdown)
        self._stopped.set()

    def request_stop(self) -> None:
        """Start the drain (idempotent); a second call stops at once."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.drain())
        else:
            log.warning("%s: second signal, stopping now", self.label)
            self._hard_stop = asyncio.ensure_future(self.stop(0))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def wait(self) -> None:
        """Until the server has stopped (after a drain or a stop)."""
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping

    async def stop(self, grace: float | None = 0) -> None:
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics is not None:
            await self._metrics.stop()
