"""Faults: agents and routers killed, the token service gone, slow agents, idle clients."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.agent._serve import build_agent_server
from mesh.client import create_channel, turn_request
from mesh.config import MeshConfig
from mesh.errors import STATUS_DETAILS_KEY, Unavailable, decode_details, from_rpc_error
from mesh.v1 import agent_pb2_grpc, router_pb2_grpc, types_pb2
from tests.meshtest import (
    RecordingProvider,
    mesh_config,
    offline_agent,
    serve_agent,
    serve_router,
    start_agent,
    write_config,
)

from .helpers import drain, endpoints, read_turn, say, start_router, wait_serving

LONG = " ".join(f"w{i}" for i in range(400))


# -- an agent killed mid-stream ---------------------------------------------------------


async def test_agent_killed_mid_stream_conversation_continues(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "router": {"default_agent": "memo", "store": {"kind": "sqlite"}},
            "agents": {
                "memo": offline_agent(
                    rules=[{"contains": "story", "reply": LONG}],
                    default_reply="turn {turns}: {message}",
                    delay_ms=10,
                    chunk_chars=6,
                )
            },
        },
    )
    replicas = dict(start_agent(config, "memo")[::-1] for _ in range(2))
    router, raddr = start_router(config, {"memo": list(replicas)})
    try:
        async with create_channel(raddr) as channel:
            await wait_serving(channel, "memo", 2)
            stub = router_pb2_grpc.RouterServiceStub(channel)
            call = stub.Chat(timeout=60)
            first = await say(call, "hello", conversation_id="k1")
            assert first.final.content == "turn 1: hello"
            await call.write(turn_request("tell a story", conversation_id="k1"))
            seen: list[types_pb2.ChatEvent] = []
            event = await call.read()
            assert isinstance(event, types_pb2.ChatEvent) and event.WhichOneof("kind") == "delta"
            busy = [e.address for e in await endpoints(channel, "memo") if e.active_streams]
            assert len(busy) == 1
            victim = replicas.pop(busy[0])
            victim.popen.kill()
            victim.popen.wait()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await drain(call, seen)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert isinstance(from_rpc_error(caught.value), Unavailable)
            assert seen and seen[-1].WhichOneof("kind") == "error"
            assert seen[-1].error.code == types_pb2.ERROR_CODE_UNAVAILABLE
            # The router keeps serving, and the conversation goes on where it was
            # acknowledged: the failed turn was not stored.
            again = stub.Chat(timeout=60)
            reply = await say(again, "still there?", conversation_id="k1")
            assert reply.final.content == "turn 2: still there?"
            await again.done_writing()
            assert await again.code() == grpc.StatusCode.OK
    finally:
        router.stop()
        for proc in replicas.values():
            proc.stop()


# -- the router killed and restarted ----------------------------------------------------


async def test_router_killed_acknowledged_history_intact(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "router": {"default_agent": "memo", "store": {"kind": "sqlite"}},
            "agents": {"memo": offline_agent(default_reply="turn {turns}: {message}")},
        },
    )
    agent, address = start_agent(config, "memo")
    router, raddr = start_router(config, {"memo": [address]})
    conversations = 16
    acked = [0] * conversations
    total = 0
    killed = asyncio.Event()

    async def talk(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal total
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=60)
        try:
            while True:
                n = acked[index] + 1
                event = await say(call, f"n{n}", conversation_id=f"rk-{index}")
                assert event.final.content == f"turn {n}: n{n}"
                acked[index] = n
                total += 1
                if total >= 200 and not killed.is_set():
                    killed.set()
                    router.popen.send_signal(signal.SIGKILL)
        except (grpc.aio.AioRpcError, AssertionError):
            if not killed.is_set():
                raise
        finally:
            call.cancel()

    try:
        async with create_channel(raddr) as channel:
            await wait_serving(channel, "memo", 1)
            await asyncio.gather(*(talk(i, channel) for i in range(conversations)))
        router.popen.wait()
        assert killed.is_set()
        router, raddr = start_router(config, {"memo": [address]})
        async with create_channel(raddr) as channel:
            await wait_serving(channel, "memo", 1)
            call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=60)
            for index in range(conversations):
                event = await say(call, "after", conversation_id=f"rk-{index}")
                stored = int(event.final.content.split(":")[0].removeprefix("turn ")) - 1
                # Every acknowledged turn survived; at most the one in flight was
                # stored without its final event reaching the client.
                assert acked[index] <= stored <= acked[index] + 1, (index, acked, stored)
            await call.done_writing()
    finally:
        router.stop()
        agent.stop()


# -- a slow agent: the deadline holds at every hop --------------------------------------


class DeadlineRecorder(grpc.aio.ServerInterceptor):
    """Records the deadline (time remaining) each turn arrived with: the call's own, or
    the per-turn one a pooled stream's request carries, whichever is sooner."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.stream_stream is None:
            return handler
        inner = handler.stream_stream
        seen = self.remaining

        async def turns(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind in ("turn", "handoff"):
                    hop = getattr(request, kind).hop
                    own = context.time_remaining()
                    per_turn = hop.timeout_ms / 1000 if hop.timeout_ms else None
                    known = [t for t in (own, per_turn) if t is not None]
                    seen.append(min(known) if known else None)
                yield request

        async def recorded(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for event in inner(turns(requests, context), context):
                yield event

        return grpc.stream_stream_rpc_method_handler(
            recorded, handler.request_deserializer, handler.response_serializer
        )


@contextlib.asynccontextmanager
async def _recorded_agent(
    config: MeshConfig, name: str
) -> AsyncIterator[tuple[str, Any, RecordingProvider, DeadlineRecorder]]:
    from mesh.agent._serve import build_runtime

    provider = RecordingProvider(build_runtime(config, name).provider)
    recorder = DeadlineRecorder()
    server, _runtime = build_agent_server(
        config, name, provider=provider, extra_interceptors=[recorder]
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", server, provider, recorder
    finally:
        await server.stop(0)


async def test_slow_agent_deadline_honoured_at_every_hop() -> None:
    config = mesh_config(
        {
            "front": {
                **offline_agent(rules=[{"matches": ".", "handoff": "slow"}]),
                "handoffs": [{"target": "slow"}],
            },
            "slow": offline_agent(
                rules=[{"matches": ".", "reply": LONG}], delay_ms=200, chunk_chars=4
            ),
        },
        router={"default_agent": "front"},
    )
    async with contextlib.AsyncExitStack() as stack:
        front = await stack.enter_async_context(_recorded_agent(config, "front"))
        slow = await stack.enter_async_context(_recorded_agent(config, "slow"))
        raddr, app = await stack.enter_async_context(
            serve_router(config, {"front": [front[0]], "slow": [slow[0]]})
        )
        async with create_channel(raddr) as channel:
            call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=1.5)
            await call.write(turn_request("go"))
            events: list[types_pb2.ChatEvent] = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await drain(call, events)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert any(e.agent == "slow" for e in events)  # the slow agent had started
        # Each hop got the caller's deadline, shrunk by what was already spent. grpc's
        # timeout header rounds up (to a few significant digits), so allow that much.
        wire = 1.5 * 1.05
        (front_deadline,) = front[3].remaining
        (slow_deadline,) = slow[3].remaining
        assert front_deadline is not None and 0 < front_deadline <= wire
        assert slow_deadline is not None and 0 < slow_deadline <= wire
        # The model call at the end of the chain was stopped, and nothing is in flight.
        await asyncio.wait_for(slow[2].closed.wait(), 10)
        for server in (front[1], slow[1], app.server):
            assert await server.lifecycle.wait_idle(10)
        # Direct to the agent too: the same deadline ends its turn.
        async with create_channel(slow[0]) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=0.5)
            await call.write(turn_request("go"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await slow[1].lifecycle.wait_idle(10)


# -- clients that open streams and say nothing ------------------------------------------


async def _settled_task_count(baseline: int) -> int:
    """Poll (bounded) until the loop's task count is back to ``baseline``; returns it."""
    count = len(asyncio.all_tasks())
    for _ in range(500):
        count = len(asyncio.all_tasks())
        if count <= baseline:
            break
        await asyncio.sleep(0.01)
    return count


async def test_idle_streams_closed_with_status_and_nothing_leaks() -> None:
    config = mesh_config(
        {"a": offline_agent()},
        router={"default_agent": "a"},
        server={"idle_stream_timeout_s": 0.5},
    )
    async with serve_agent(config, "a") as (address, agent_server, _rt, _p):
        async with serve_router(config, {"a": [address]}) as (raddr, app):
            # No client interceptors: the count is of the servers' tasks (grpc.aio keeps an
            # intercepted call's helper task until the call object goes).
            async with (
                create_channel(raddr, forward_context=False) as rch,
                create_channel(address, forward_context=False) as ach,
            ):
                # One real turn first, so lazily created state exists before the baseline.
                warm = router_pb2_grpc.RouterServiceStub(rch).Chat(timeout=10)
                await say(warm, "hi")
                await warm.done_writing()
                assert await warm.code() == grpc.StatusCode.OK
                baseline = await _settled_task_count(len(asyncio.all_tasks()))
                calls = [router_pb2_grpc.RouterServiceStub(rch).Chat(timeout=30) for _ in range(20)]
                calls += [agent_pb2_grpc.AgentServiceStub(ach).Chat(timeout=30) for _ in range(20)]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call.read()
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    trailing = caught.value.trailing_metadata()
                    reason, _meta, _field = decode_details(
                        [(k, v) for k, v in trailing or () if k == STATUS_DETAILS_KEY]
                    )
                    assert reason == "IDLE_TIMEOUT"
                assert app.lifecycle.active == 0
                assert agent_server.lifecycle.active == 0
                assert await _settled_task_count(baseline) <= baseline
                # Still serving.
                again = router_pb2_grpc.RouterServiceStub(rch).Chat(timeout=10)
                assert (await say(again, "hello")).WhichOneof("kind") == "final"
                again.cancel()


# -- the token service down -------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class StsProcess:
    """The embedded token service in its own process (killing it closes its connections,
    as a real outage does), restartable on the same port."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.popen: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability._sts", str(self.path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.popen.stdout is not None
        assert self.popen.stdout.readline().startswith("sts: "), "the token service did not start"

    def kill(self) -> None:
        if self.popen is not None:
            self.popen.kill()
            self.popen.wait()
            self.popen = None


@pytest.fixture
def auth_env(tmp_path: Path) -> Iterator[tuple[MeshConfig, StsProcess]]:
    """Auth on, the token service on a fixed free port in its own process."""
    from mesh.config import load_config

    path = write_config(
        tmp_path,
        {
            "data_dir": str(tmp_path / "data"),
            "router": {"default_agent": "a", "store": {"kind": "memory"}},
            "agents": {"a": offline_agent()},
            "auth": {"enabled": True, "sts": {"port": _free_port()}},
        },
    )
    sts = StsProcess(path)
    sts.start()
    try:
        yield load_config(path), sts
    finally:
        sts.kill()


async def _turn_status(raddr: str, token: str) -> tuple[grpc.StatusCode, str, list[str]]:
    async with create_channel(raddr) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(
            timeout=20, metadata=(("authorization", f"Bearer {token}"),)
        )
        await call.write(turn_request("hello"))
        kinds: list[str] = []
        try:
            events = await read_turn(call)
            kinds = [str(e.WhichOneof("kind")) for e in events]
            if kinds[-1] == "final":
                call.cancel()
                return grpc.StatusCode.OK, "", kinds
            await call.done_writing()
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or "", kinds
        code = await call.code()
        return code, await call.details() or "", kinds


def _expire_exchanged_tokens(app: Any) -> None:
    """Jump the router's exchange cache two hours ahead: its cached tokens are expired."""
    from mesh.auth.exchange import exchanger_for

    cache = exchanger_for(app.config, "router").cache
    cache._clock = lambda: time.time() + 7200


async def test_token_service_down_cached_tokens_keep_working(
    auth_env: tuple[MeshConfig, StsProcess],
) -> None:
    from mesh.auth.sts import mint_user_token

    config, sts = auth_env
    token = mint_user_token(config, "alice")
    async with serve_agent(config, "a") as (address, _server, _rt, _p):
        async with serve_router(config, {"a": [address]}) as (raddr, _app):
            assert (await _turn_status(raddr, token))[0] == grpc.StatusCode.OK
            sts.kill()
            # Signing keys and the exchanged token are cached: turns go on without the STS.
            for _ in range(3):
                assert (await _turn_status(raddr, token))[0] == grpc.StatusCode.OK


async def test_token_service_down_after_expiry_clear_unavailable(
    auth_env: tuple[MeshConfig, StsProcess],
) -> None:
    from mesh.auth.sts import mint_user_token

    config, sts = auth_env
    token = mint_user_token(config, "alice")
    async with serve_agent(config, "a") as (address, _server, _rt, _p):
        async with serve_router(config, {"a": [address]}) as (raddr, app):
            assert (await _turn_status(raddr, token))[0] == grpc.StatusCode.OK
            sts.kill()
            _expire_exchanged_tokens(app)
            code, details, kinds = await _turn_status(raddr, token)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "identity provider" in details or "token" in details, details
            assert kinds == ["error"]


async def test_token_service_back_router_recovers(
    auth_env: tuple[MeshConfig, StsProcess],
) -> None:
    """A token-service outage is not the agent's fault: once the STS is back, turns work
    again at once (the agent's replica must not stay marked failed)."""
    from mesh.auth.sts import mint_user_token

    config, sts = auth_env
    token = mint_user_token(config, "alice")
    async with serve_agent(config, "a") as (address, _server, _rt, _p):
        async with serve_router(config, {"a": [address]}) as (raddr, app):
            assert (await _turn_status(raddr, token))[0] == grpc.StatusCode.OK
            sts.kill()
            _expire_exchanged_tokens(app)
            assert (await _turn_status(raddr, token))[0] != grpc.StatusCode.OK
            sts.start()
            code, details, _kinds = await _turn_status(raddr, token)
            assert code == grpc.StatusCode.OK, (code, details)
