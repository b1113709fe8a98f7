"""Replicas dying, agents registering and leaving, routers restarting: real processes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mesh.client import AgentClient, create_channel, turn_request
from mesh.errors import Unavailable, from_rpc_error
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

from .meshtest import Proc, offline_agent, redis_server, start_agent, write_config

LONG = " ".join(f"w{i}" for i in range(300))


def _start_router(
    config: Path, *static: str, env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    args = ["router", "--config", str(config), "--port", "0"]
    for item in static:
        args += ["--static", item]
    proc = Proc(args, env)
    return proc, proc.wait_line("router: ")


async def _wait_healthy(router: str, agent: str, count: int) -> None:
    """Ask the router until ``agent`` has ``count`` SERVING endpoints (bounded)."""
    async with create_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for _ in range(200):
            listing = await stub.ListAgents(router_pb2.ListAgentsRequest(), timeout=5)
            serving = [
                e
                for a in listing.agents
                if a.info.name == agent
                for e in a.endpoints
                if e.health == types_pb2.ENDPOINT_HEALTH_SERVING
            ]
            if len(serving) == count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{agent} never had {count} SERVING endpoints")


async def test_replica_killed_mid_stream(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "router": {"default_agent": "slow", "store": {"kind": "memory"}},
            "agents": {
                "slow": offline_agent(
                    rules=[{"contains": "long", "reply": LONG}], delay_ms=20, chunk_chars=6
                )
            },
        },
    )
    first, addr1 = start_agent(config, "slow")
    second, addr2 = start_agent(config, "slow")
    router, raddr = _start_router(config, f"slow={addr1}", f"slow={addr2}")
    try:
        await _wait_healthy(raddr, "slow", 2)
        async with create_channel(raddr) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            calls = []
            for i in range(4):
                call = stub.Chat(timeout=60)
                await call.write(turn_request("long story", conversation_id=f"r{i}"))
                await call.done_writing()
                first_event = await call.read()
                assert isinstance(first_event, types_pb2.ChatEvent)
                calls.append(call)
            # Four streams are flowing, balanced two per replica. Kill one replica.
            first.popen.kill()
            first.popen.wait()
            outcomes: list[str] = []
            for call in calls:
                events: list[types_pb2.ChatEvent] = []
                try:
                    while (event := await call.read()) is not grpc.aio.EOF:
                        assert isinstance(event, types_pb2.ChatEvent)
                        events.append(event)
                    outcomes.append("ok")
                    assert events[-1].final.content == LONG
                except grpc.aio.AioRpcError as err:
                    mapped = from_rpc_error(err)
                    assert isinstance(mapped, Unavailable)
                    assert mapped.code == grpc.StatusCode.UNAVAILABLE
                    assert events[-1].WhichOneof("kind") == "error"
                    assert "failed mid-turn" in events[-1].error.message
                    assert "not replayed" in events[-1].error.message
                    outcomes.append("unavailable")
            assert sorted(outcomes) == ["ok", "ok", "unavailable", "unavailable"]
            # Streams that had not started go to the surviving replica; the router serves on.
            client = AgentClient(channel, router=True)
            results = await asyncio.gather(
                *(client.chat("short", conversation_id=f"n{i}", timeout=60) for i in range(6))
            )
            assert all(r.final is not None and r.final.agent == "slow" for r in results)
    finally:
        for proc in (router, first, second):
            proc.stop()


async def test_registered_agent_listed_then_gone_when_it_dies(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "router": {"store": {"kind": "memory"}, "discovery": {"health_interval_s": 0.5}},
            "agents": {"helper": offline_agent("registers itself")},
        },
    )
    router, raddr = _start_router(config)
    agent = Proc(["agent", "helper", "--config", str(config), "--port", "0", "--register", raddr])
    try:
        agent.wait_line("registered: ")
        listed = Proc(["agents", "--router", raddr])
        assert listed.popen.wait(timeout=30) == 0
        listed.lines.get(timeout=5)
        out = "".join(listed.stdout)
        assert "helper" in out and "registered" in out and "SERVING" in out
        async with create_channel(raddr) as channel:
            reply = await AgentClient(channel, router=True).chat("hi", agent="helper", timeout=30)
            assert reply.final is not None and reply.final.agent == "helper"
            agent.popen.kill()
            agent.popen.wait()
            stub = router_pb2_grpc.RouterServiceStub(channel)
            for _ in range(100):  # bounded: the health interval is 0.5 s
                listing = await stub.ListAgents(router_pb2.ListAgentsRequest(), timeout=5)
                if not listing.agents:
                    break
                await asyncio.sleep(0.05)
            assert not listing.agents
    finally:
        agent.stop()
        router.stop()


async def test_second_replica_registers_beside_the_first(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "router": {"store": {"kind": "memory"}, "discovery": {"health_interval_s": 0.5}},
            "agents": {"helper": offline_agent("registers itself")},
        },
    )
    router, raddr = _start_router(config)
    args = ["agent", "helper", "--config", str(config), "--port", "0", "--register", raddr]
    first, second = Proc(args), Proc(args)
    try:
        first.wait_line("registered: ")
        second.wait_line("registered: ")
        async with create_channel(raddr) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            listing = await stub.ListAgents(router_pb2.ListAgentsRequest(), timeout=5)
            (entry,) = listing.agents
            assert len(entry.endpoints) == 2
            assert {e.health for e in entry.endpoints} == {types_pb2.ENDPOINT_HEALTH_SERVING}
    finally:
        for proc in (first, second, router):
            proc.stop()
    assert not any("did not report SERVING" in line for line in second.stderr)


def _counting_config(tmp_path: Path, store: dict[str, object]) -> Path:
    return write_config(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "router": {"default_agent": "memo", "store": store},
            "agents": {"memo": offline_agent(default_reply="turn {turns}: {message}")},
        },
    )


async def _say(router: str, message: str, conversation: str) -> str:
    async with create_channel(router) as channel:
        result = await AgentClient(channel, router=True).chat(
            message, conversation_id=conversation, timeout=30
        )
    assert result.final is not None
    return result.final.final.content


async def test_conversation_survives_router_restart_sqlite(tmp_path: Path) -> None:
    config = _counting_config(tmp_path, {"kind": "sqlite"})
    agent, address = start_agent(config, "memo")
    router, raddr = _start_router(config, f"memo={address}")
    try:
        await _wait_healthy(raddr, "memo", 1)
        assert await _say(raddr, "one", "conv-s") == "turn 1: one"
        assert await _say(raddr, "two", "conv-s") == "turn 2: two"
        router.popen.send_signal(signal.SIGKILL)  # no chance to flush anything
        router.popen.wait()
        router, raddr = _start_router(config, f"memo={address}")
        await _wait_healthy(raddr, "memo", 1)
        assert await _say(raddr, "three", "conv-s") == "turn 3: three"
        assert await _say(raddr, "fresh", "conv-other") == "turn 1: fresh"
    finally:
        router.stop()
        agent.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


async def test_two_routers_share_redis(tmp_path: Path, redis_url: str) -> None:
    config = _counting_config(tmp_path, {"kind": "redis"})
    env = {"MESH_REDIS_URL": redis_url}
    agent, address = start_agent(config, "memo")
    first, addr1 = _start_router(config, f"memo={address}", env=env)
    second, addr2 = _start_router(config, f"memo={address}", env=env)
    try:
        await _wait_healthy(addr1, "memo", 1)
        await _wait_healthy(addr2, "memo", 1)
        assert await _say(addr1, "one", "conv-r") == "turn 1: one"
        assert await _say(addr2, "two", "conv-r") == "turn 2: two"
        assert await _say(addr1, "three", "conv-r") == "turn 3: three"
    finally:
        for proc in (first, second, agent):
            proc.stop()
