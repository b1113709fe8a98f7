"""The default mesh as `mesh up` runs it: router + five agents, each its own process."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mesh.client import AgentClient, create_channel

from .meshtest import MESH_YAML, Proc, start_mesh, tool_path
from .test_grpcurl import _objects


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("mesh-data")
    proc, address = start_mesh(MESH_YAML, Path(data))
    try:
        yield address
    finally:
        assert proc.stop() == 0, "".join(proc.stderr)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool_path("grpcurl"), "-plaintext", "-max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_grpcurl_list_and_describe_router(router: str) -> None:
    listing = grpcurl(router, "list")
    assert "mesh.v1.Router" in listing.stdout.split(), listing.stderr
    described = grpcurl(router, "describe", "mesh.v1.Router")
    assert "rpc Chat ( stream .mesh.v1.ChatRequest ) returns ( stream .mesh.v1.ChatEvent )" in (
        described.stdout
    )
    assert "rpc Register" in described.stdout and "rpc ListAgents" in described.stdout


def test_grpcurl_chat_transfer_final_from_target(router: str) -> None:
    result = grpcurl(
        "-d",
        '{"turn": {"conversation_id": "g1", "message": "I need a refund for INV-1001"}}',
        router,
        "mesh.v1.Router/Chat",
    )
    assert result.returncode == 0, result.stderr
    events = _objects(result.stdout)
    handoffs = [e for e in events if "handoff" in e]
    assert handoffs[0]["agent"] == "triage"
    assert handoffs[0]["handoff"]["target"] == "billing"  # type: ignore[index]
    assert handoffs[0]["handoff"]["mode"] == "TRANSFER"  # type: ignore[index]
    final = events[-1]
    assert "final" in final and final["agent"] == "billing"
    assert final["final"]["hop_path"] == ["triage", "billing"]  # type: ignore[index]
    assert "refund of 42.00 EUR" in final["final"]["content"]  # type: ignore[index]
    assert [e["seq"] for e in events] == [str(i) for i in range(1, len(events) + 1)]


async def test_coordinator_consults_two_agents_in_parallel(router: str) -> None:
    async with create_channel(router) as channel:
        result = await AgentClient(channel, router=True).chat("give me a plan", timeout=60)
    consults = [e.handoff.target for e in result.events if e.WhichOneof("kind") == "handoff"]
    assert sorted(consults) == ["billing", "orders"]
    final = result.final
    assert final is not None and final.agent == "triage"
    assert "INV-1001 (42.00 EUR) is paid" in final.final.content
    assert "A-17 shipped with DHL" in final.final.content
    speakers = {e.agent for e in result.events if e.WhichOneof("kind") == "delta"}
    assert {"billing", "orders", "triage"} <= speakers


async def test_sequential_chain_feeds_each_output_to_the_next(router: str) -> None:
    async with create_channel(router) as channel:
        result = await AgentClient(channel, router=True).chat("brief on grpc", timeout=60)
    final = result.final
    assert final is not None and final.agent == "writer"
    assert list(final.final.hop_path) == ["researcher", "writer"]
    assert final.final.content.startswith("Brief: Notes: search_notes: gRPC runs over HTTP/2")


async def test_conditional_route_on_context_runs_before_any_model(router: str) -> None:
    async with create_channel(router) as channel:
        client = AgentClient(channel, router=True)
        result = await client.chat("hello", context={"department": "finance"}, timeout=60)
        named = await client.chat("hello", agent="orders", timeout=60)
    assert result.final is not None and list(result.final.final.hop_path) == ["billing"]
    assert named.final is not None and named.final.agent == "orders"


def test_mesh_chat_and_agents_commands(router: str) -> None:
    chat = Proc(["chat", "--router", router, "where is my order?"])
    assert chat.popen.wait(timeout=60) == 0, "".join(chat.stderr)
    out = "".join(chat.stdout)
    assert "[triage]" in out and "[orders]" in out and "A-17" in out
    agents = Proc(["agents", "--router", router, "--json"])
    assert agents.popen.wait(timeout=60) == 0
    listing = json.loads("".join(agents.stdout))
    names = {a["info"]["name"] for a in listing["agents"]}
    assert names == {"triage", "billing", "orders", "researcher", "writer"}
    assert all(a["endpoints"][0]["health"] == "SERVING" for a in listing["agents"])


async def test_end_conversation_closes_the_stream(router: str) -> None:
    from mesh.client import turn_request
    from mesh.v1 import router_pb2_grpc, types_pb2

    async with create_channel(router) as channel:
        call = router_pb2_grpc.RouterStub(channel).Chat(timeout=30)
        await call.write(turn_request("ok bye now", conversation_id="end-1"))
        events = [e async for e in call]  # ends without our half-close
        assert await call.code() == grpc.StatusCode.OK
    handoff = next(e for e in events if e.WhichOneof("kind") == "handoff")
    assert handoff.handoff.mode == types_pb2.HandoffMode.END_CONVERSATION
    assert events[-1].final.stop_reason == "end_conversation"
