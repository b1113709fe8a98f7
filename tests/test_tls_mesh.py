"""TLS on every gRPC hop, with a plaintext health-only port for the kubelet's probes,
and the router verifying pods it found by DNS against the name it resolved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth.interceptors import channel_credentials
from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig, config_from_dict
from mesh.v1 import agent_pb2_grpc
from tests.meshtest import serve_agent, serve_router


def _config(data_dir: Path, dns_port: int = 0) -> MeshConfig:
    router: dict[str, Any] = {"default_agent": "sec", "store": {"kind": "memory"}}
    if dns_port:
        router["discovery"] = {"dns": [{"agent": "sec", "host": "localhost", "port": dns_port}]}
    return config_from_dict(
        {
            "data_dir": str(data_dir),
            "server": {"health_port": 0},
            "auth": {"enabled": True, "sts": {"port": 0}, "tls": {"enabled": True}},
            "router": router,
            "agents": {"sec": {"description": "behind TLS", "provider": {"kind": "offline"}}},
        },
        source="<tls test>",
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    with TokenService(_config(tmp_path)):
        yield tmp_path


async def test_tls_hops_with_plaintext_health_port(data_dir: Path) -> None:
    config = _config(data_dir)
    async with serve_agent(config, "sec") as (address, server, _rt, _p):
        assert server.health_port and server.health_port != server.port
        plain = f"127.0.0.1:{server.health_port}"
        async with create_channel(plain) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service="mesh.v1.AgentService")
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # The health port serves health only.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await agent_pb2_grpc.AgentServiceStub(channel).Info(_info(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The main port speaks TLS only.
        async with create_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await agent_pb2_grpc.AgentServiceStub(channel).Info(_info(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # The router finds the agent by DNS and verifies it against that name.
        port = int(address.rsplit(":", 1)[1])
        routed = _config(data_dir, dns_port=port)
        async with serve_router(routed, {}) as (router, app):
            assert await app.pool.wait_healthy("sec", 10)
            token = mint_user_token(routed, "alice", None, 600)
            async with create_channel(router, credentials=channel_credentials(routed)) as channel:
                stream = AgentClient(channel, router=True).open(
                    timeout=30, metadata=[("authorization", f"Bearer {token}")]
                )
                events = [e async for e in stream.turn(turn_request("hello"))]
                await stream.close()
    assert events[-1].final.content == "sec heard: hello"


def _info() -> Any:
    from mesh.v1 import agent_pb2

    return agent_pb2.InfoRequest()
