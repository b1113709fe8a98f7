"""SIGTERM drains: NOT_SERVING at once, new work refused, open streams finish, exit 0."""

from __future__ import annotations

import logging
import signal
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.client import create_channel, turn_request
from mesh.v1 import agent_pb2_grpc, types_pb2

from .meshtest import offline_agent, start_agent, write_config

GRACE = 30.0


async def _write_then_read(call: Any) -> None:
    # The server may refuse before the write lands; either side then sees the status.
    await call.write(turn_request("go"))
    await call.read()


async def test_sigterm_drains_open_stream_and_exits_zero(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    reply = " ".join(f"w{i}" for i in range(60))
    config = write_config(
        tmp_path,
        {
            "server": {"grace_period_s": GRACE},
            "agents": {
                "slow": offline_agent(
                    rules=[{"contains": "go", "reply": reply}], delay_ms=20, chunk_chars=4
                )
            },
        },
    )
    proc, address = start_agent(config, "slow")
    try:
        async with create_channel(address) as channel, create_channel(address) as other:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack Watch
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=60)
            await call.write(turn_request("go"))
            event = await call.read()
            assert isinstance(event, types_pb2.ChatEvent)

            proc.signal(signal.SIGTERM)
            changed = await watch.read()
            assert isinstance(changed, health_pb2.HealthCheckResponse)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Then the Watch ends OK before the server stops (a Watch cut by the stop
            # made grpc log an ERROR at an ordinary shutdown).
            assert await watch.read() is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK

            # New work is refused while draining, so callers go elsewhere: always
            # UNAVAILABLE, even for a client that writes at once (grpc/grpc#36066).
            for _ in range(30):
                refused = agent_pb2_grpc.AgentServiceStub(other).Chat(timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _write_then_read(refused)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
                assert "shutting down" in (caught.value.details() or "")

            # The open stream completes.
            text = event.delta.text
            while True:
                event = await call.read()
                assert isinstance(event, types_pb2.ChatEvent)
                if event.WhichOneof("kind") == "final":
                    break
                text += event.delta.text
            assert text == reply
            # The turn in flight at SIGTERM completed, and its stream ends OK.
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        assert proc.popen.wait(timeout=GRACE) == 0
        loud = [line for line in proc.stderr_lines() if " ERROR " in line or " WARNING " in line]
        assert not loud, loud
    finally:
        proc.stop()


async def test_agent_drain_behind_the_router_loses_no_turn(tmp_path: object) -> None:
    """15 turns in flight through the router when one of two replicas gets SIGTERM: every
    turn completes and is stored, and later turns go to the other replica."""
    import asyncio
    from pathlib import Path

    from mesh.client import AgentClient
    from mesh.config import load_config

    from .meshtest import serve_router

    assert isinstance(tmp_path, Path)
    reply = " ".join(f"w{i}" for i in range(30))
    path = write_config(
        tmp_path,
        {
            "server": {"grace_period_s": GRACE},
            "router": {"default_agent": "slow", "store": {"kind": "memory"}},
            "agents": {
                "slow": offline_agent(
                    rules=[{"contains": "go", "reply": reply}], delay_ms=30, chunk_chars=8
                )
            },
        },
    )
    config = load_config(path)
    first, address_a = start_agent(path, "slow")
    second, address_b = start_agent(path, "slow")
    try:
        async with serve_router(config, {"slow": [address_a, address_b]}) as (router, app):
            async with create_channel(router) as channel:
                client = AgentClient(channel, router=True)
                started = asyncio.Semaphore(0)

                async def turn(n: int) -> types_pb2.ChatEvent:
                    stream = client.open(timeout=60)
                    final = None
                    async for event in stream.turn(
                        turn_request(f"go {n}", conversation_id=f"drain-{n}")
                    ):
                        if event.WhichOneof("kind") == "delta" and event.seq == 1:
                            started.release()
                        final = event
                    await stream.close()
                    assert await stream.call.code() == grpc.StatusCode.OK
                    assert final is not None
                    return final

                tasks = [asyncio.ensure_future(turn(n)) for n in range(15)]
                for _ in range(15):
                    await started.acquire()
                first.signal(signal.SIGTERM)
                finals = await asyncio.gather(*tasks)
                assert all(f.WhichOneof("kind") == "final" for f in finals), finals
                assert all(f.final.content == reply for f in finals)
                for n in range(15):
                    history, _active = await app.store.load(f"drain-{n}", 10)
                    assert [m.content for m in history] == [f"go {n}", reply]
                assert first.popen.wait(timeout=GRACE) == 0
                later = [await client.chat("go later") for _ in range(5)]
                assert all(r.final is not None for r in later)
    finally:
        first.stop()
        second.stop()


def test_a_watch_cut_by_its_peer_at_the_drain_is_not_an_error() -> None:
    from mesh.server import _cut_watch_at_drain

    def record(level: int, method: str) -> logging.LogRecord:
        text = f"Exception not handled by _handle_exceptions in servicer method [{method}]"
        return logging.LogRecord("grpc._cython.cygrpc", level, "", 0, text, None, None)

    assert not _cut_watch_at_drain(record(logging.ERROR, "/grpc.health.v1.Health/Watch"))
    assert _cut_watch_at_drain(record(logging.ERROR, "/mesh.v1.AgentService/Chat"))
    assert _cut_watch_at_drain(record(logging.DEBUG, "/grpc.health.v1.Health/Watch"))
