"""The router's data plane through real servers: pooled agent streams, per-turn
context, honest error relay, replicas that come back, history windows, the edge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.client import AgentClient, create_channel, turn_request
from mesh.context import current_hop_path, current_request_id, current_trace_context
from mesh.errors import (
    _ALL,
    MeshError,
    ProviderUnavailable,
    RemoteError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
    from_status,
)
from mesh.providers.base import ModelEvent, ModelRequest
from mesh.server import MeshServer
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

from .meshtest import (
    RawAgent,
    RecordingProvider,
    mesh_config,
    offline_agent,
    serve_agent,
    serve_router,
)


class ContextRecorder(RecordingProvider):
    """Records, at the agent, the call context each model call ran under."""

    seen: list[dict[str, Any]]

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        if not hasattr(self, "seen"):
            self.seen = []
        self.seen.append(
            {
                "request_id": current_request_id.get(),
                "trace": dict(current_trace_context.get({})),
                "path": current_hop_path.get(),
                "conversation": request.conversation_id,
            }
        )
        async for event in super().stream(request):
            yield event


@contextlib.asynccontextmanager
async def _agent(config: Any, name: str, provider: Any = None) -> AsyncIterator[Any]:
    from mesh.agent._serve import build_agent_server, build_runtime

    inner = build_runtime(config, name).provider
    wrapped = (provider or ContextRecorder)(inner)
    server, _runtime = build_agent_server(config, name, provider=wrapped)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", server, wrapped
    finally:
        await server.stop(0)


async def test_agent_gets_client_traceparent_and_request_id_per_turn() -> None:
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with contextlib.AsyncExitStack() as stack:
        address, server, provider = await stack.enter_async_context(_agent(config, "echo"))
        router, _app = await stack.enter_async_context(serve_router(config, {"echo": [address]}))
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            for n in (1, 2):
                trace = f"00-{n:032x}-{n:016x}-01"
                await client.chat(
                    f"hello {n}",
                    conversation_id=f"ctx-{n}",
                    metadata=[("traceparent", trace), ("x-request-id", f"req-{n}")],
                )
    # Both turns ran on one pooled agent stream, each under its own context.
    assert server.lifecycle.started == 1
    assert [s["request_id"] for s in provider.seen] == ["req-1", "req-2"]
    assert [s["trace"]["traceparent"] for s in provider.seen] == [
        f"00-{1:032x}-{1:016x}-01",
        f"00-{2:032x}-{2:016x}-01",
    ]
    assert [s["conversation"] for s in provider.seen] == ["ctx-1", "ctx-2"]
    assert all(s["path"] == ("echo",) for s in provider.seen)


async def test_a_malformed_trace_context_from_a_client_stops_at_the_router() -> None:
    """What the router takes from a caller's metadata is W3C trace context or nothing
    (``mesh.trace_context``): malformed values never reach an agent."""
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    good = f"00-{7:032x}-{7:016x}-01"
    sent = [
        [("traceparent", "00-not-a-trace-01"), ("tracestate", "vendor=abc")],
        [("traceparent", good), ("tracestate", "no equals sign"), ("baggage", "a=1, b=2")],
    ]
    async with contextlib.AsyncExitStack() as stack:
        address, _server, provider = await stack.enter_async_context(_agent(config, "echo"))
        router, _app = await stack.enter_async_context(serve_router(config, {"echo": [address]}))
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            for n, metadata in enumerate(sent):
                await client.chat(f"hello {n}", conversation_id=f"t-{n}", metadata=metadata)
    assert [s["trace"] for s in provider.seen] == [
        {},
        {"traceparent": good, "baggage": "a=1,b=2"},
    ]


async def test_200_turns_over_20_conversations_reuse_a_handful_of_agent_calls() -> None:
    config = mesh_config(
        {"memo": offline_agent(default_reply="turn {turns}: {message}")},
        router={"default_agent": "memo"},
    )
    async with contextlib.AsyncExitStack() as stack:
        address, server, _provider = await stack.enter_async_context(_agent(config, "memo"))
        router, app = await stack.enter_async_context(serve_router(config, {"memo": [address]}))
        results: dict[str, list[str]] = {f"conv-{i}": [] for i in range(20)}

        async def worker(conversations: list[str]) -> None:
            async with create_channel(router) as channel:
                client = AgentClient(channel, router=True)
                for rnd in range(10):
                    for conversation in conversations:
                        # One client call per turn, as a stateless frontend would.
                        result = await client.chat(
                            f"{conversation}-{rnd}", conversation_id=conversation
                        )
                        assert result.final is not None
                        results[conversation].append(result.final.final.content)

        names = list(results)
        await asyncio.gather(*(worker(names[i::4]) for i in range(4)))
    for conversation, finals in results.items():
        assert finals == [f"turn {r + 1}: {conversation}-{r}" for r in range(10)]
    assert server.lifecycle.turns_started == 200
    assert server.lifecycle.started <= 8, server.lifecycle.started  # 4 clients at once
    assert app.streams.opened == server.lifecycle.started


async def test_forged_hop_path_from_a_user_is_ignored() -> None:
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with contextlib.AsyncExitStack() as stack:
        address, _server, provider = await stack.enter_async_context(_agent(config, "echo"))
        router, _app = await stack.enter_async_context(serve_router(config, {"echo": [address]}))
        async with create_channel(router) as channel:
            result = await AgentClient(channel, router=True).chat(
                "hi", metadata=[("x-mesh-hop-path", "billing,orders")]
            )
    assert result.final is not None
    assert list(result.final.final.hop_path) == ["echo"]
    assert provider.seen[0]["path"] == ("echo",)  # the agent never saw the forged path


# -- errors relayed honestly ---------------------------------------------------------------


class _StatusAgent(RawAgent):
    """A raw ``mesh.v1.AgentService`` that ends every Chat with the status the message names."""

    def __init__(self) -> None:
        async def chat(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async for request in requests:
                code_name, _, reason = request.turn.message.partition(":")
                code = grpc.StatusCode[code_name]
                if reason:
                    err = MeshError("from the agent")
                    err.code, err.reason = code, reason
                    await context.abort(code, "from the agent", err.trailing_metadata())
                await context.abort(code, "from the agent")

        super().__init__(chat)


async def _status_through_router(router: str, message: str) -> MeshError:
    async with create_channel(router) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=20)
        await call.write(turn_request(message))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _event in call:
                pass
        return from_rpc_error(caught.value)


@pytest.mark.parametrize("code", ["FAILED_PRECONDITION", "ABORTED", "UNIMPLEMENTED", "DATA_LOSS"])
async def test_bare_status_from_an_agent_keeps_its_code_and_no_mesh_reason(code: str) -> None:
    fake = _StatusAgent()
    port = await fake.start()
    config = mesh_config({"raw": offline_agent()}, router={"default_agent": "raw"})
    try:
        async with serve_router(config, {"raw": [f"127.0.0.1:{port}"]}) as (router, _app):
            err = await _status_through_router(router, code)
    finally:
        await fake.server.stop(0)
    assert isinstance(err, RemoteError)
    assert err.code == grpc.StatusCode[code] and err.reason == ""


async def test_every_error_class_round_trips_through_agent_and_router() -> None:
    fake = _StatusAgent()
    port = await fake.start()
    config = mesh_config({"raw": offline_agent()}, router={"default_agent": "raw"})
    seen: dict[str, MeshError] = {}
    try:
        async with serve_router(config, {"raw": [f"127.0.0.1:{port}"]}) as (router, _app):
            for cls in _ALL:
                seen[cls.reason] = await _status_through_router(
                    router, f"{cls.code.name}:{cls.reason}"
                )
    finally:
        await fake.server.stop(0)
    for cls in _ALL:
        got = seen[cls.reason]
        if cls.reason in ("UNAVAILABLE", "DRAINING"):
            # A replica that says it is down: the router tried the others, then said so.
            assert type(got) is Unavailable and "from the agent" in got.message
            continue
        assert type(got) is cls, (cls, got)
        assert got.code == cls.code and got.reason == cls.reason
    # And the table itself both ways, with no server.
    for cls in _ALL:
        err = cls("x", field="f")
        back = from_status(err.code, err.message, list(err.trailing_metadata()))
        assert type(back) is cls and back.field == "f"


# -- replicas ------------------------------------------------------------------------------


class FailOnce(RecordingProvider):
    """A model API that fails the first call, then answers."""

    failed = False

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        if not self.failed:
            self.failed = True
            raise ProviderUnavailable("model API down for a moment")
        async for event in super().stream(request):
            yield event


async def test_provider_error_is_relayed_and_the_replica_stays_in_use() -> None:
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with contextlib.AsyncExitStack() as stack:
        address, _server, _provider = await stack.enter_async_context(
            _agent(config, "echo", FailOnce)
        )
        router, app = await stack.enter_async_context(serve_router(config, {"echo": [address]}))
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            err = await _status_through_router(router, "one")
            assert type(err) is ProviderUnavailable and "model API down" in err.message
            assert app.pool.endpoints["echo"][address].healthy
            result = await client.chat("two")
            assert result.final is not None and result.final.agent == "echo"


async def test_replica_marked_failed_comes_back_by_itself() -> None:
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with contextlib.AsyncExitStack() as stack:
        address, _server, _provider = await stack.enter_async_context(_agent(config, "echo"))
        router, app = await stack.enter_async_context(serve_router(config, {"echo": [address]}))
        endpoint = app.pool.endpoints["echo"][address]
        # A call saw it down (its own health never changed, so no Watch message comes).
        app.pool.mark_failed(endpoint)
        assert not endpoint.healthy
        async with create_channel(router) as channel:
            result = await AgentClient(channel, router=True).chat("hi")
        assert result.final is not None and result.final.agent == "echo"
        assert endpoint.healthy


# -- conversations that grow ---------------------------------------------------------------


async def test_history_is_windowed_by_bytes_and_never_internal() -> None:
    config = mesh_config(
        {"memo": offline_agent(default_reply="turn {turns}")},
        router={"default_agent": "memo", "store": {"kind": "memory", "history_max_bytes": 400_000}},
    )
    big = "x" * 60_000
    async with contextlib.AsyncExitStack() as stack:
        address, _server, provider = await stack.enter_async_context(_agent(config, "memo"))
        router, _app = await stack.enter_async_context(serve_router(config, {"memo": [address]}))
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            dropped = []
            for _ in range(12):
                result = await client.chat(big, conversation_id="big")
                assert result.final is not None
                dropped.append(result.final.final.history_dropped)
            err = await _status_through_router(router, "y" * 500_000)
    assert dropped[0] == 0 and dropped[-1] > 0  # the oldest messages were left out
    assert type(err) is ResourceExhausted
    assert "history_max_bytes" in err.message and err.field == "turn.message"
    sizes = [sum(len(m.content) for m in r.messages) for r in provider.requests]
    assert max(sizes) <= 400_000


# -- discovery -----------------------------------------------------------------------------


async def test_dns_two_addresses_then_a_changed_record(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with contextlib.AsyncExitStack() as stack:
        servers: list[MeshServer] = []
        port = 0
        for ip in ("127.0.0.2", "127.0.0.3"):
            from mesh.agent._serve import build_agent_server

            server, _rt = build_agent_server(config, "echo")
            port = await server.start(ip, port)
            stack.push_async_callback(server.stop, 0)
            servers.append(server)
        hosts.write_text("127.0.0.2 echo.test\n127.0.0.3 echo.test other\n")
        dns_config = mesh_config(
            {"echo": offline_agent()},
            router={
                "default_agent": "echo",
                "store": {"kind": "memory"},
                "discovery": {
                    "dns": [{"agent": "echo", "host": "echo.test", "port": port}],
                    "dns_interval_s": 0.1,
                    "hosts_file": str(hosts),
                },
            },
        )
        from mesh.router import MemoryStore, RouterApp

        app = RouterApp(dns_config, store=MemoryStore())
        router_port = await app.start("127.0.0.1", 0)
        stack.push_async_callback(app.stop)

        async def addresses(expected: set[str]) -> None:
            async with app.pool.changed:
                await asyncio.wait_for(
                    app.pool.changed.wait_for(
                        lambda: (
                            {a for a, e in app.pool.endpoints.get("echo", {}).items() if e.healthy}
                            == expected
                        )
                    ),
                    20,
                )

        await addresses({f"127.0.0.2:{port}", f"127.0.0.3:{port}"})
        async with create_channel(f"127.0.0.1:{router_port}") as channel:
            client = AgentClient(channel, router=True)
            for _ in range(4):
                await client.chat("hi")
            hosts.write_text("127.0.0.3 echo.test\n")
            await addresses({f"127.0.0.3:{port}"})
            await client.chat("after the change")
    assert servers[0].lifecycle.turns_started >= 1 and servers[1].lifecycle.turns_started >= 2


# -- the edge reports what it relays once ----------------------------------------------------


async def test_list_agents_reports_endpoints() -> None:
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with serve_agent(config, "echo") as (address, _s, _r, _p):
        async with serve_router(config, {"echo": [address]}) as (router, _app):
            async with create_channel(router) as channel:
                listing = await router_pb2_grpc.RouterServiceStub(channel).ListAgents(
                    router_pb2.ListAgentsRequest(), timeout=10
                )
    (entry,) = listing.agents
    assert (
        entry.info.name == "echo" and entry.endpoints[0].health == types_pb2.ENDPOINT_HEALTH_SERVING
    )


async def test_a_cancel_right_behind_its_turn_never_hangs_the_stream() -> None:
    """A cancel that arrives before the turn's task first runs still ends the turn."""
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"})
    async with serve_agent(config, "echo") as (address, _s, _r, _p):
        async with serve_router(config, {"echo": [address]}) as (router, _app):
            async with create_channel(router) as channel:
                for agent in ["nobody", ""] * 10:
                    call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=20)
                    await call.write(turn_request("hi", agent=agent))
                    await call.write(types_pb2.ChatRequest(cancel=types_pb2.Cancel(reason="x")))
                    await call.done_writing()
                    kinds = []
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        async for event in call:
                            kinds.append(event.WhichOneof("kind"))
                    assert await call.code() in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
                    assert kinds and kinds[-1] in ("final", "error"), kinds
