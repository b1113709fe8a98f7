"""The default mesh as `mesh up` runs it: router + five agents, each its own process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from mesh.client import AgentClient, create_channel

from .meshtest import MESH_YAML, Proc, grpcurl, mesh_token, start_mesh
from .test_grpcurl import _objects


@dataclass(frozen=True)
class Mesh:
    address: str
    env: dict[str, str]
    token: str

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The default mesh, authenticated as it ships: STS, router and agents."""
    data = tmp_path_factory.mktemp("mesh-data")
    proc, address, env = start_mesh(MESH_YAML, Path(data))
    try:
        yield Mesh(address, env, mesh_token(MESH_YAML, env))
    finally:
        assert proc.stop() == 0, "".join(proc.stderr)


@pytest.fixture(scope="module")
def router(mesh: Mesh) -> str:
    return mesh.address


def test_grpcurl_list_and_describe_router(router: str) -> None:
    listing = grpcurl(router, "list")
    assert "mesh.v1.RouterService" in listing.stdout.split(), listing.stderr
    described = grpcurl(router, "describe", "mesh.v1.RouterService")
    assert "rpc Chat ( stream .mesh.v1.ChatRequest ) returns ( stream .mesh.v1.ChatEvent )" in (
        described.stdout
    )
    assert "rpc Register" in described.stdout and "rpc ListAgents" in described.stdout


def test_grpcurl_chat_transfer_final_from_target(mesh: Mesh) -> None:
    router = mesh.address
    result = grpcurl(
        "-H",
        f"authorization: Bearer {mesh.token}",
        "-d",
        '{"turn": {"conversation_id": "g1", "message": "I need a refund for INV-1001"}}',
        router,
        "mesh.v1.RouterService/Chat",
    )
    assert result.returncode == 0, result.stderr
    events = _objects(result.stdout)
    handoffs = [e for e in events if "handoff" in e]
    assert handoffs[0]["agent"] == "triage"
    assert handoffs[0]["handoff"]["target"] == "billing"  # type: ignore[index]
    assert handoffs[0]["handoff"]["mode"] == "HANDOFF_MODE_TRANSFER"  # type: ignore[index]
    final = events[-1]
    assert "final" in final and final["agent"] == "billing"
    assert final["final"]["hop_path"] == ["triage", "billing"]  # type: ignore[index]
    assert "refund of 42.00 EUR" in final["final"]["content"]  # type: ignore[index]
    assert [e["seq"] for e in events] == [str(i) for i in range(1, len(events) + 1)]


async def test_coordinator_consults_two_agents_in_parallel(mesh: Mesh) -> None:
    async with create_channel(mesh.address) as channel:
        result = await AgentClient(channel, router=True).chat(
            "give me a plan", timeout=60, metadata=mesh.auth
        )
    consults = [e.handoff.target for e in result.events if e.WhichOneof("kind") == "handoff"]
    assert sorted(consults) == ["billing", "orders"]
    final = result.final
    assert final is not None and final.agent == "triage"
    assert "INV-1001 (42.00 EUR) is paid" in final.final.content
    assert "A-17 shipped with DHL" in final.final.content
    speakers = {e.agent for e in result.events if e.WhichOneof("kind") == "delta"}
    assert {"billing", "orders", "triage"} <= speakers


async def test_sequential_chain_feeds_each_output_to_the_next(mesh: Mesh) -> None:
    async with create_channel(mesh.address) as channel:
        result = await AgentClient(channel, router=True).chat(
            "brief on grpc", timeout=60, metadata=mesh.auth
        )
    final = result.final
    assert final is not None and final.agent == "writer"
    assert list(final.final.hop_path) == ["researcher", "writer"]
    assert final.final.content.startswith("Brief: Notes: search_notes: gRPC runs over HTTP/2")


async def test_conditional_route_on_context_runs_before_any_model(mesh: Mesh) -> None:
    async with create_channel(mesh.address) as channel:
        client = AgentClient(channel, router=True)
        result = await client.chat(
            "hello", context={"department": "finance"}, timeout=60, metadata=mesh.auth
        )
        named = await client.chat("hello", agent="orders", timeout=60, metadata=mesh.auth)
    assert result.final is not None and list(result.final.final.hop_path) == ["billing"]
    assert named.final is not None and named.final.agent == "orders"


def test_mesh_chat_and_agents_commands(mesh: Mesh) -> None:
    # Both fetch a user token by themselves from the embedded token service's keys.
    router = mesh.address
    chat = Proc(["chat", "--router", router, "where is my order?"], mesh.env)
    assert chat.popen.wait(timeout=60) == 0, "".join(chat.stderr)
    out = "".join(chat.stdout)
    assert "[triage]" in out and "[orders]" in out and "A-17" in out
    agents = Proc(["agents", "--router", router, "--json"], mesh.env)
    assert agents.popen.wait(timeout=60) == 0
    listing = json.loads("".join(agents.stdout))
    names = {a["info"]["name"] for a in listing["agents"]}
    assert names == {"triage", "billing", "orders", "researcher", "writer"}
    assert all(a["endpoints"][0]["health"] == "ENDPOINT_HEALTH_SERVING" for a in listing["agents"])


async def test_end_conversation_closes_the_stream(mesh: Mesh) -> None:
    from mesh.client import turn_request
    from mesh.v1 import router_pb2_grpc, types_pb2

    async with create_channel(mesh.address) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=30, metadata=mesh.auth)
        await call.write(turn_request("ok bye now", conversation_id="end-1"))
        events = [e async for e in call]  # ends without our half-close
        assert await call.code() == grpc.StatusCode.OK
    handoff = next(e for e in events if e.WhichOneof("kind") == "handoff")
    assert handoff.handoff.mode == types_pb2.HANDOFF_MODE_END_CONVERSATION
    assert events[-1].final.stop_reason == types_pb2.STOP_REASON_END_CONVERSATION


def test_grpcurl_without_token_is_refused_but_list_and_health_work(router: str) -> None:
    refused = grpcurl("-d", '{"turn": {"message": "hi"}}', router, "mesh.v1.RouterService/Chat")
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr
    assert "missing bearer token" in refused.stderr
    # Reflection is exempt in the default mesh (a setting); health always is.
    assert "mesh.v1.RouterService" in grpcurl(router, "list").stdout
    health = grpcurl(router, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}
