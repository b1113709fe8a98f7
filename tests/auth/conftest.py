"""Fixtures for the auth tests: one real embedded STS (HTTPS, dev CA) for the session,
probe servers started with the project's own bootstrap (:class:`mesh.server.MeshServer`)
on 127.0.0.1 port 0 that report what they saw through ``meshtest.v1.ProbeService``
(tests/auth/probe/probe.proto), and a log capture that the last test reads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh import context as ctx
from mesh.auth.devca import make_client_certificate
from mesh.auth.server_auth import current_traceparent
from mesh.auth.sts import TokenService
from mesh.config import MeshConfig, ServerSettings, config_from_dict
from mesh.interceptors import CallContextInterceptor
from mesh.lifecycle import Lifecycle
from mesh.server import MeshServer, Service
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.auth import probe

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
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


def seen_now(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """A ``meshtest.v1.SeenResponse`` of what this call's context holds now."""
    principal = ctx.current_principal.get()
    seen = probe.pb2.SeenResponse(
        token_present=bool(ctx.current_token.get()),
        conversation_id=ctx.current_conversation_id.get(),
        hop_path=list(ctx.current_hop_path.get()),
        traceparent=current_traceparent.get(),
    )
    remaining = context.time_remaining()
    if remaining is not None:
        seen.deadline_remaining_s = remaining
    if principal is not None:
        seen.authenticated = True
        seen.subject = principal.subject
        seen.audience = principal.audience
        seen.actor_chain.extend(principal.actor_chain)
        seen.scopes.extend(sorted(principal.scopes))
        if principal.hops_remaining is not None:
            seen.hops_remaining = principal.hops_remaining
    return seen


class Probe(agent_pb2_grpc.AgentServiceServicer):
    """A real servicer that reports what the project's interceptors put into the context.

    ``meshtest.v1.ProbeService/Seen`` answers with a ``SeenResponse``; ``SeenEach`` with
    one per request of a bidi stream. The agent contract is served too, so that its
    per-method policy applies: ``Info`` answers the probe's own (honest) card, and each
    ``Chat``/``Handoff`` request is recorded as a ``SeenResponse`` in :attr:`chats`
    before the probe answers with a bare event. With ``next_hop``, ``Seen`` forwards to
    the next hop (through the client interceptors) and answers with what that hop saw.
    """

    def __init__(self, next_hop: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.next_hop = next_hop
        self.lifecycle = Lifecycle()
        self.chats: list[Any] = []
        """What each Chat/Handoff request saw, in order."""

    async def Seen(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802 - gRPC method name
        if self.next_hop is not None:
            return await self.next_hop()
        return seen_now(context)

    async def SeenEach(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async with self.lifecycle.work():
            async for _ in request_iterator:
                yield seen_now(context)

    async def Info(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.InfoRequest, context: Any
    ) -> agent_pb2.InfoResponse:
        return agent_pb2.InfoResponse(
            info=types_pb2.AgentInfo(name="probe", description="a test probe")
        )

    async def _record(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async with self.lifecycle.work():
            seq = 0
            async for _ in request_iterator:
                self.chats.append(seen_now(context))
                seq += 1
                yield types_pb2.ChatEvent(agent="probe", seq=seq)

    async def Chat(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async for event in self._record(request_iterator, context):
            yield event

    async def Handoff(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async for event in self._record(request_iterator, context):
            yield event


@asynccontextmanager
async def serve(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    servicer: Probe | None = None,
    *,
    credentials: grpc.ServerCredentials | None = None,
    extra: Sequence[Service] = (),
) -> AsyncIterator[str]:
    """The project's server bootstrap (:class:`MeshServer`: limits, health, reflection) on
    127.0.0.1:0 serving a probe, with the call-context interceptor first and then
    ``interceptors`` (the auth ones), as every mesh service chains them."""
    probe_servicer = servicer or Probe()
    services = [
        Service(
            AGENT_SERVICE,
            lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(probe_servicer, s),
        ),
        Service(
            probe.SERVICE,
            lambda s: probe.pb2_grpc.add_ProbeServiceServicer_to_server(probe_servicer, s),
        ),
        *extra,
    ]
    server = MeshServer(
        ServerSettings(),
        services,
        interceptors=[CallContextInterceptor(), *interceptors],
        lifecycle=probe_servicer.lifecycle,
        label="probe",
        server_credentials=credentials,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def seen(
    addr: str,
    metadata: Any = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> Any:
    """Call the probe's ``Seen`` at ``addr``; its ``SeenResponse``."""
    channel = (
        grpc.aio.insecure_channel(addr, interceptors=interceptors, options=options)
        if credentials is None
        else grpc.aio.secure_channel(addr, credentials, options, interceptors=interceptors)
    )
    async with channel:
        return await probe.pb2_grpc.ProbeServiceStub(channel).Seen(
            probe.pb2.SeenRequest(), metadata=metadata, timeout=10
        )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
