"""Every turn the router acknowledged is in the SQLite store after the router is SIGKILLed
while 32 streams write: real router and agent processes, the database read afterwards."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc

from mesh.client import AgentClient, create_channel, turn_request
from mesh.router import SqliteStore
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

from .meshtest import Proc, offline_agent, start_agent, write_config

STREAMS = 32
#: Acknowledged turns (all streams together) before the router is killed.
KILL_AFTER = 320


async def _wait_serving(router: str, agent: str) -> None:
    async with create_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        for _ in range(200):
            listing = await stub.ListAgents(router_pb2.ListAgentsRequest(), timeout=5)
            if any(
                e.health == types_pb2.ENDPOINT_HEALTH_SERVING
                for a in listing.agents
                if a.info.name == agent
                for e in a.endpoints
            ):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{agent} never SERVING")


async def test_acknowledged_turns_survive_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path,
        {
            "data_dir": str(data),
            "router": {"default_agent": "memo", "store": {"kind": "sqlite"}},
            "agents": {"memo": offline_agent(default_reply="ok {message}")},
        },
    )
    agent, address = start_agent(config, "memo")
    router = Proc(["router", "--config", str(config), "--port", "0", "--static", f"memo={address}"])
    acked: dict[str, list[str]] = {f"conv-{i}": [] for i in range(STREAMS)}
    ended: list[str] = []
    killed = asyncio.Event()
    total = 0
    try:
        raddr = router.wait_line("router: ")
        await _wait_serving(raddr, "memo")

        async def writer(conversation: str) -> None:
            nonlocal total
            # Each stream its own connection, so the kill hits every one alike.
            async with create_channel(raddr, own_connection=True) as channel:
                stream = AgentClient(channel, router=True).open(timeout=120)
                n = 0
                try:
                    while True:
                        message = f"{conversation}/turn-{n}"
                        events = [
                            e
                            async for e in stream.turn(
                                turn_request(message, conversation_id=conversation)
                            )
                        ]
                        final = events[-1] if events else None
                        if final is None or final.WhichOneof("kind") != "final":
                            ended.append(f"{conversation}: {final}")
                            return
                        assert final.final.content == f"ok {message}"
                        acked[conversation].append(message)  # acknowledged: final received
                        total += 1
                        n += 1
                        if total >= KILL_AFTER and not killed.is_set():
                            killed.set()
                            router.popen.send_signal(signal.SIGKILL)
                except grpc.aio.AioRpcError as err:
                    ended.append(f"{conversation}: {err.code().name}")
                except Exception as err:  # noqa: BLE001 - the client's mapped error on the kill
                    ended.append(f"{conversation}: {type(err).__name__}")
                finally:
                    stream.cancel()

        await asyncio.wait_for(asyncio.gather(*(writer(c) for c in acked)), 120)
        assert router.popen.wait(timeout=30) == -signal.SIGKILL
    finally:
        router.stop()
        agent.stop()

    assert killed.is_set() and len(ended) == STREAMS
    assert sum(len(v) for v in acked.values()) >= KILL_AFTER
    # Every stream was writing when the router died (each had acknowledged turns).
    assert all(acked.values())
    store = SqliteStore(data / "conversations.db")
    try:
        for conversation, messages in acked.items():
            history, active = await store.load(conversation, 100_000)
            stored = [m.content for m in history if m.role == "user"]
            replies = {m.content for m in history if m.role == "assistant"}
            # The stored turns start with every acknowledged one, in order; at most the
            # one in flight at the kill may follow (committed, not yet acknowledged).
            assert stored[: len(messages)] == messages, conversation
            assert len(stored) - len(messages) <= 1, conversation
            assert all(f"ok {m}" in replies for m in messages), conversation
            assert active == "memo"
    finally:
        await store.close()
