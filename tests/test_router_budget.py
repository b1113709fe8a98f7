"""The hop budget and the CONSULT stack, enforced in the router; deadlines and cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.errors import HandoffCycle, HopBudgetExceeded, MeshError, from_rpc_error
from mesh.v1 import router_pb2_grpc, types_pb2

from .meshtest import RecordingProvider, mesh_config, offline_agent, serve_agent, serve_router

SLOW_TEXT = " ".join(f"w{i}" for i in range(500))


@contextlib.asynccontextmanager
async def mesh_of(
    config: MeshConfig,
) -> AsyncIterator[tuple[str, dict[str, RecordingProvider], list[object]]]:
    """Every agent of ``config`` in-process, behind an in-process router."""
    async with contextlib.AsyncExitStack() as stack:
        static: dict[str, list[str]] = {}
        providers: dict[str, RecordingProvider] = {}
        servers: list[object] = []
        for name in config.agents:
            address, server, _rt, provider = await stack.enter_async_context(
                serve_agent(config, name)
            )
            static[name] = [address]
            providers[name] = provider
            servers.append(server)
        router, app = await stack.enter_async_context(serve_router(config, static))
        servers.append(app.server)
        yield router, providers, servers


def _ping_pong(max_hops: int) -> MeshConfig:
    def agent(other: str) -> dict[str, object]:
        return {
            **offline_agent(rules=[{"matches": ".", "handoff": other}]),
            "handoffs": [{"target": other, "modes": ["transfer"]}],
        }

    return mesh_config(
        {"a": agent("b"), "b": agent("a")}, max_hops=max_hops, router={"default_agent": "a"}
    )


async def _chat_error(
    router: str, message: str, timeout: float = 30
) -> tuple[MeshError, list[types_pb2.ChatEvent]]:
    events: list[types_pb2.ChatEvent] = []
    async with create_channel(router) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=timeout)
        await call.write(turn_request(message))
        await call.done_writing()
        try:
            async for event in call:
                events.append(event)
        except grpc.aio.AioRpcError as err:
            return from_rpc_error(err), events
    raise AssertionError("the turn ended without an error status")


async def test_transfer_loop_stops_at_exactly_max_hops() -> None:
    async with mesh_of(_ping_pong(3)) as (router, providers, _servers):
        err, events = await _chat_error(router, "go")
    assert isinstance(err, HopBudgetExceeded)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "path: a > b > a > b > a" in err.message
    assert err.metadata["path"] == "a,b,a,b,a"
    # Exactly three handoffs happened: a ran twice, b twice, and nothing after.
    assert len(providers["a"].requests) == 2 and len(providers["b"].requests) == 2
    forwarded = [e.handoff.target for e in events if e.WhichOneof("kind") == "handoff"]
    assert forwarded == ["b", "a", "b"]  # the refused fourth handoff was not forwarded
    assert events[-1].WhichOneof("kind") == "error"
    assert events[-1].error.code == types_pb2.ERROR_CODE_FAILED_PRECONDITION


async def test_consult_cycle_refused_before_reaching_a_again() -> None:
    config = mesh_config(
        {
            "a": {
                **offline_agent(rules=[{"contains": "ask", "consult": ["b"]}]),
                "handoffs": [{"target": "b", "modes": ["consult"]}],
            },
            "b": {
                **offline_agent(rules=[{"contains": "ask", "consult": ["a"]}]),
                "handoffs": [{"target": "a", "modes": ["consult"]}],
            },
        },
        router={"default_agent": "a"},
    )
    async with mesh_of(config) as (router, providers, _servers):
        err, _events = await _chat_error(router, "ask around")
    assert isinstance(err, HandoffCycle)
    assert "a > b > a" in err.message
    assert len(providers["a"].requests) == 1  # only the opening Chat turn ever reached a
    assert len(providers["b"].requests) == 1


def _three_hops(delay_ms: float) -> MeshConfig:
    return mesh_config(
        {
            "a": {
                **offline_agent(rules=[{"matches": ".", "handoff": "b"}]),
                "handoffs": [{"target": "b"}],
            },
            "b": {
                **offline_agent(rules=[{"matches": ".", "handoff": "c"}]),
                "handoffs": [{"target": "c"}],
            },
            "c": offline_agent(
                rules=[{"matches": ".", "reply": SLOW_TEXT}], delay_ms=delay_ms, chunk_chars=4
            ),
        },
        router={"default_agent": "a"},
    )


async def _all_idle(servers: list[object]) -> None:
    for server in servers:
        assert await server.lifecycle.wait_idle(10)  # type: ignore[attr-defined]


async def test_deadline_ends_every_hop() -> None:
    async with mesh_of(_three_hops(delay_ms=100)) as (router, providers, servers):
        err, events = await _chat_error(router, "go", timeout=2)
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert providers["c"].opened.is_set()
        await asyncio.wait_for(providers["c"].closed.wait(), 10)
        await _all_idle(servers)
    assert any(e.agent == "c" for e in events)


async def test_client_cancel_reaches_every_hop() -> None:
    async with mesh_of(_three_hops(delay_ms=50)) as (router, providers, servers):
        async with create_channel(router) as channel:
            call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=60)
            await call.write(turn_request("go"))
            async for event in call:
                if event.agent == "c" and event.WhichOneof("kind") == "delta":
                    break
            call.cancel()
        await asyncio.wait_for(providers["c"].closed.wait(), 10)
        await _all_idle(servers)


async def test_cancel_request_ends_the_turn_and_the_stream_goes_on() -> None:
    async with mesh_of(_three_hops(delay_ms=50)) as (router, providers, _servers):
        async with create_channel(router) as channel:
            stream = AgentClient(channel, router=True).open(timeout=60)
            await stream.send(turn_request("go", conversation_id="k1"))
            call = stream.call
            async for event in call:
                if event.agent == "c":
                    break
            await call.write(types_pb2.ChatRequest(cancel=types_pb2.Cancel(reason="stop")))
            async for event in call:
                if event.WhichOneof("kind") == "final":
                    break
            assert event.final.stop_reason == types_pb2.STOP_REASON_CANCELLED
            await asyncio.wait_for(providers["c"].closed.wait(), 10)
            await stream.close()


async def test_turns_of_every_conversation_reuse_one_agent_stream() -> None:
    config = mesh_config(
        {"memo": offline_agent(default_reply="turn {turns}: {message}")},
        router={"default_agent": "memo"},
    )
    async with contextlib.AsyncExitStack() as stack:
        address, agent_server, _rt, _p = await stack.enter_async_context(
            serve_agent(config, "memo")
        )
        router, _app = await stack.enter_async_context(serve_router(config, {"memo": [address]}))
        async with create_channel(router) as channel:
            stream = AgentClient(channel, router=True).open(timeout=60)
            finals = []
            for word in ("one", "two", "three"):
                request = turn_request(word, conversation_id="reuse-1")
                events = [e async for e in stream.turn(request)]
                finals.append(events[-1].final.content)
            await stream.close()
            # A turn of another conversation (another client stream) reuses it too: each
            # turn carries its own conversation and hop context.
            other = [
                e
                async for e in AgentClient(channel, router=True)
                .open(timeout=60)
                .turn(turn_request("four", conversation_id="reuse-2"))
            ]
        assert finals == ["turn 1: one", "turn 2: two", "turn 3: three"]
        assert other[-1].final.content == "turn 1: four"
        assert agent_server.lifecycle.started == 1  # four turns, one agent stream
        assert await agent_server.lifecycle.wait_idle(10)  # and it was closed cleanly


async def test_dns_discovery_finds_replicas_behind_a_name() -> None:
    # A headless Service resolves to one address per pod; here `localhost` resolves to
    # the loopback address(es) and the agent listens on 127.0.0.1.
    base = mesh_config({"dnsagent": offline_agent(default_reply="via dns")})
    async with serve_agent(base, "dnsagent") as (address, _server, _rt, _p):
        port = int(address.rsplit(":", 1)[1])
        config = mesh_config(
            {"dnsagent": offline_agent(default_reply="via dns")},
            router={
                "default_agent": "dnsagent",
                "discovery": {
                    "dns": [{"agent": "dnsagent", "host": "localhost", "port": port}],
                    "dns_interval_s": 0.2,
                },
            },
        )
        async with serve_router(config, {}) as (router, app):
            assert await app.pool.wait_healthy("dnsagent", 10)
            found = set(app.pool.endpoints["dnsagent"])
            assert address in found
            assert all(e.sources == {"dns"} for e in app.pool.endpoints["dnsagent"].values())
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat("hi", timeout=30)
            assert result.final is not None and result.final.final.content == "via dns"
