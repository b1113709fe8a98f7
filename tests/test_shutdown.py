"""SIGTERM drains: NOT_SERVING at once, new work refused, open streams finish, exit 0."""

from __future__ import annotations

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

            call = agent_pb2_grpc.AgentStub(channel).Chat(timeout=60)
            await call.write(turn_request("go"))
            event = await call.read()
            assert isinstance(event, types_pb2.ChatEvent)

            proc.signal(signal.SIGTERM)
            changed = await watch.read()
            assert isinstance(changed, health_pb2.HealthCheckResponse)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING

            # New work is refused while draining, so callers go elsewhere.
            refused = agent_pb2_grpc.AgentStub(other).Chat(timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _write_then_read(refused)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
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
            await call.done_writing()
        assert proc.popen.wait(timeout=GRACE) == 0
    finally:
        proc.stop()
