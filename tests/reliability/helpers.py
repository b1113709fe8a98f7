"""Helpers for the reliability suite: real processes and servers on loopback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from mesh.client import turn_request
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.meshtest import Proc


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def start_router(config: Path, static: dict[str, Sequence[str]]) -> tuple[Proc, str]:
    """``mesh router`` on a free port over the given agent endpoints."""
    args = ["router", "--config", str(config), "--port", "0"]
    for agent, addresses in static.items():
        for address in addresses:
            args += ["--static", f"{agent}={address}"]
    proc = Proc(args)
    return proc, proc.wait_line("router: ")


async def endpoints(channel: grpc.aio.Channel, agent: str) -> list[router_pb2.Endpoint]:
    """The router's view of ``agent``'s replicas."""
    listing = await router_pb2_grpc.RouterServiceStub(channel).ListAgents(
        router_pb2.ListAgentsRequest(), timeout=10
    )
    return [e for a in listing.agents if a.info.name == agent for e in a.endpoints]


async def wait_serving(channel: grpc.aio.Channel, agent: str, count: int) -> None:
    """Poll the router (bounded) until ``agent`` has ``count`` SERVING replicas."""
    import asyncio

    for _ in range(300):
        if (
            sum(
                e.health == types_pb2.ENDPOINT_HEALTH_SERVING
                for e in await endpoints(channel, agent)
            )
            == count
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{agent} never had {count} SERVING replicas")


async def read_turn(
    call: grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent],
) -> list[types_pb2.ChatEvent]:
    """Events up to and including the turn's final (or error) event; raises on a status."""
    events: list[types_pb2.ChatEvent] = []
    while True:
        event = await call.read()
        if event is grpc.aio.EOF:
            raise AssertionError(f"stream ended after {len(events)} events without a final")
        assert isinstance(event, types_pb2.ChatEvent)
        events.append(event)
        if event.WhichOneof("kind") in ("final", "error"):
            return events


async def say(
    call: grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent],
    message: str,
    conversation_id: str = "",
) -> types_pb2.ChatEvent:
    """One turn on an open stream; returns its last event."""
    await call.write(turn_request(message, conversation_id=conversation_id))
    return (await read_turn(call))[-1]


async def drain(
    call: grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent],
    into: list[types_pb2.ChatEvent],
) -> None:
    """Read every event until the stream ends (raises on a non-OK status)."""
    while (event := await call.read()) is not grpc.aio.EOF:
        assert isinstance(event, types_pb2.ChatEvent)
        into.append(event)
