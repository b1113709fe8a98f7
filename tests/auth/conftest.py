"""Fixtures for the auth tests: one real embedded STS (HTTPS, dev CA) for the session,
real grpc.aio servers on 127.0.0.1 port 0, and a log capture that the last test reads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh import context as ctx
from mesh.auth.devca import make_client_certificate
from mesh.auth.sts import TokenService
from mesh.config import MeshConfig, config_from_dict
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

ROUTER_SECRET_ENV = "MESH_TEST_ROUTER_SECRET"
ROUTER_SECRET = "router-secret-value-0123456789"


class LogCapture(logging.Handler):
    """Keeps every formatted record written during the session."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a broken record must not break the suite
            self.lines.append(f"{record.name} unformattable record")


#: Filled by the session fixture; read by test_zz_no_token_in_logs.py.
CAPTURE = LogCapture()
#: Output of subprocesses (mesh sts / mesh token) for the same check.
SUBPROCESS_OUTPUT: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def capture_all_logs() -> Iterator[LogCapture]:
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(CAPTURE)
    root.setLevel(logging.DEBUG)
    try:
        yield CAPTURE
    finally:
        root.removeHandler(CAPTURE)
        root.setLevel(old_level)


def mesh_dict(data_dir: Path, **auth: Any) -> dict[str, Any]:
    """A mesh with agents a, b, admin-only and step-up, auth on, STS on port 0."""
    certs = data_dir / "client-certs"
    cert, key = make_client_certificate(certs, "agent-a")
    body: dict[str, Any] = {
        "enabled": True,
        "sts": {"port": 0, "step_up_audiences": ["mesh-agent-stepup"]},
        "clients": {
            "router": {"secret_env": ROUTER_SECRET_ENV},
            # a may reach b on a user's behalf (a peer it calls); nothing else.
            "a": {"certificate": str(cert), "private_key": str(key), "audiences": ["b"]},
        },
    }
    body.update(auth)
    return {
        "data_dir": str(data_dir),
        "agents": {
            "a": {"description": "agent a", "required_scopes": ["mesh.chat"]},
            "b": {"description": "agent b"},
            "admin": {"description": "admin only", "required_scopes": ["mesh.admin"]},
            "stepup": {"description": "needs mfa"},
        },
        "auth": body,
    }


def with_auth(config: MeshConfig, **changes: Any) -> MeshConfig:
    """``config`` with some ``auth`` fields changed (same data dir, same STS)."""
    return config.model_copy(update={"auth": config.auth.model_copy(update=changes)})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh-data")


@pytest.fixture(scope="session")
def config(data_dir: Path) -> Iterator[MeshConfig]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ROUTER_SECRET_ENV, ROUTER_SECRET)
        yield config_from_dict(mesh_dict(data_dir))


@pytest.fixture(scope="session")
def sts(config: MeshConfig) -> Iterator[TokenService]:
    with TokenService(config) as service:
        yield service


@pytest.fixture
def entra_config(config: MeshConfig, sts: TokenService) -> MeshConfig:
    return with_auth(config, exchanger="entra")


class InfoAgent(agent_pb2_grpc.AgentServiceServicer):
    """A tiny real servicer reporting what the interceptor put into the contextvars.

    ``Info`` answers with name = principal subject, description = audience, skills =
    actor chain, version = conversation id, required_scopes = hop path. ``Chat``
    streams one delta per request with ``sub|aud|actors|conversation``. When ``next_hop``
    is set, Info first calls it (through the client interceptors) and returns its answer
    prefixed, to test per-hop exchange.
    """

    def __init__(self, next_hop: Callable[[], Any] | None = None) -> None:
        self.next_hop = next_hop

    async def Info(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.InfoRequest, context: Any
    ) -> agent_pb2.InfoResponse:
        if self.next_hop is not None:
            downstream: types_pb2.AgentInfo = await self.next_hop()
            return agent_pb2.InfoResponse(info=downstream)
        principal = ctx.current_principal.get()
        assert principal is not None
        assert ctx.current_token.get()
        from mesh.auth.interceptors import current_traceparent

        remaining = context.time_remaining()
        return agent_pb2.InfoResponse(
            info=types_pb2.AgentInfo(
                model=types_pb2.ModelInfo(
                    provider=current_traceparent.get(),
                    model=f"{remaining:.3f}" if remaining else "",
                ),
                name=principal.subject,
                description=principal.audience,
                skills=[types_pb2.Skill(name=a) for a in principal.actor_chain],
                version=ctx.current_conversation_id.get(),
                required_scopes=list(ctx.current_hop_path.get()),
            )
        )

    async def Chat(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        seq = 0
        async for _ in request_iterator:
            principal = ctx.current_principal.get()
            assert principal is not None
            seq += 1
            text = "|".join(
                [
                    principal.subject,
                    principal.audience,
                    ",".join(principal.actor_chain),
                    ctx.current_conversation_id.get(),
                ]
            )
            yield types_pb2.ChatEvent(agent="x", seq=seq, delta=types_pb2.TextDelta(text=text))

    async def Handoff(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async for _ in request_iterator:
            yield types_pb2.ChatEvent(agent="x", seq=1)


@asynccontextmanager
async def serve(
    interceptors: list[grpc.aio.ServerInterceptor], servicer: InfoAgent | None = None
) -> AsyncIterator[str]:
    """A real grpc.aio server on 127.0.0.1:0 with health, reflection and the agent."""
    # Like the mesh's server bootstrap: metadata up to 16 KiB reaches the interceptor.
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0), ("grpc.max_metadata_size", 16 * 1024)],
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer or InfoAgent(), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        ["mesh.v1.AgentService", "grpc.health.v1.Health", reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
