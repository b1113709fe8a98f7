"""grpc.health.v1 as the mesh serves it: Check, List and Watch, through real clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import ServerSettings
from mesh.server import MeshServer, Service
from tests.meshtest import grpcurl

SERVICE = "mesh.v1.AgentService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _server() -> tuple[MeshServer, str]:
    server = MeshServer(ServerSettings(), [Service(SERVICE, lambda s: None)], label="health")
    port = await server.start("127.0.0.1", 0)
    return server, f"127.0.0.1:{port}"


async def test_check_and_list_through_grpcurl() -> None:
    server, address = await _server()
    try:
        await server.set_serving(SERVICE, False)
        check = await asyncio.to_thread(
            grpcurl, "-d", json.dumps({"service": SERVICE}), address, "grpc.health.v1.Health/Check"
        )
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout) == {"status": "NOT_SERVING"}

        unknown = await asyncio.to_thread(
            grpcurl, "-d", '{"service": "no.such.Service"}', address, "grpc.health.v1.Health/Check"
        )
        assert "NotFound" in unknown.stderr and "no.such.Service" in unknown.stderr

        listed = await asyncio.to_thread(grpcurl, address, "grpc.health.v1.Health/List")
        assert listed.returncode == 0, listed.stderr
        statuses = json.loads(listed.stdout)["statuses"]
        assert statuses == {"": {"status": "SERVING"}, SERVICE: {"status": "NOT_SERVING"}}
    finally:
        await server.stop(0)


async def test_watch_sees_every_settled_change_then_ends_at_the_drain() -> None:
    server, address = await _server()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack Watch
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
            assert (await watch.read()).status == SERVING
            await server.set_serving(SERVICE, False)
            assert (await watch.read()).status == NOT_SERVING
            await server.set_serving(SERVICE, True)
            assert (await watch.read()).status == SERVING

            # A watcher of a service the server does not have hears SERVICE_UNKNOWN, and
            # then its status once the service appears.
            other = stub.Watch(health_pb2.HealthCheckRequest(service="late.Service"), timeout=30)
            assert (await other.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await server.set_serving("late.Service", True)
            assert (await other.read()).status == SERVING

            drained = asyncio.ensure_future(server.drain(grace=5))
            for call in (watch, other):
                assert (await call.read()).status == NOT_SERVING
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
            await drained
    finally:
        await server.stop(0)
