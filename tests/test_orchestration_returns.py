"""Return strategies after a TRANSFER, through a real router and three real agents.

Each test asserts who spoke, in what order, what the client received as it
streamed, the final's hop path, and where the conversation's next turn went.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.errors import HandoffCycle, HopBudgetExceeded, MeshError, from_rpc_error
from mesh.v1 import router_pb2_grpc, types_pb2

from .meshtest import RecordingProvider, mesh_config, offline_agent, serve_agent, serve_router

RETURN = types_pb2.ReturnStrategy


@contextlib.asynccontextmanager
async def mesh_of(
    config: MeshConfig,
) -> AsyncIterator[tuple[str, dict[str, RecordingProvider]]]:
    async with contextlib.AsyncExitStack() as stack:
        static: dict[str, list[str]] = {}
        providers: dict[str, RecordingProvider] = {}
        for name in config.agents:
            address, _server, _rt, provider = await stack.enter_async_context(
                serve_agent(config, name)
            )
            static[name] = [address]
            providers[name] = provider
        router, _app = await stack.enter_async_context(serve_router(config, static))
        yield router, providers


def three(strategy: str, **extra: Any) -> MeshConfig:
    """a hands refunds to b with ``strategy``; c is the second step of the ``chain``."""
    return mesh_config(
        {
            "a": {
                **offline_agent(
                    rules=[{"contains": "refund", "handoff": "b", "reason": "refunds"}],
                    default_reply="a wraps up: {message}",
                ),
                "handoffs": [{"target": "b", "return": strategy}],
            },
            "b": offline_agent(default_reply="b pays back"),
            "c": offline_agent(default_reply="c got: {message}"),
        },
        router={"default_agent": "a", "sequences": {"chain": {"steps": ["a", "c"]}}},
        **extra,
    )


def speakers(events: list[types_pb2.ChatEvent]) -> list[tuple[str, str]]:
    """(agent, kind) of each event, consecutive deltas of one agent folded into one."""
    out: list[tuple[str, str]] = []
    for event in events:
        item = (event.agent, event.WhichOneof("kind") or "")
        if item[1] == "delta" and out and out[-1] == item:
            continue
        out.append(item)
    return out


def text_of(events: list[types_pb2.ChatEvent], agent: str) -> str:
    return "".join(e.delta.text for e in events if e.agent == agent and e.HasField("delta"))


async def turns(router: str, *messages: str, agent: str = "") -> list[list[types_pb2.ChatEvent]]:
    """Each message as one turn of one conversation, on one Chat stream."""
    out: list[list[types_pb2.ChatEvent]] = []
    async with create_channel(router) as channel:
        stream = AgentClient(channel, router=True).open(timeout=30)
        try:
            for index, message in enumerate(messages):
                request = turn_request(message, conversation_id="conv-r", agent=agent)
                if index:
                    request.turn.agent = ""
                out.append([e async for e in stream.turn(request)])
        finally:
            await stream.close()
            stream.cancel()
    return out


async def test_bubble_up_target_answers_and_keeps_the_conversation() -> None:
    async with mesh_of(three("bubble_up")) as (router, providers):
        first, second = await turns(router, "I want a refund", "and one more thing")
    assert speakers(first) == [("a", "handoff"), ("b", "delta"), ("b", "final")]
    assert first[0].handoff.return_strategy == RETURN.RETURN_STRATEGY_BUBBLE_UP
    assert text_of(first, "b") == "b pays back"
    assert list(first[-1].final.hop_path) == ["a", "b"]
    assert first[-1].final.content == "b pays back"
    # The next turn goes straight to b: a's model is not asked again.
    assert second[0].agent == "b" and list(second[-1].final.hop_path) == ["b"]
    assert len(providers["a"].requests) == 1 and len(providers["b"].requests) == 2


async def test_return_to_caller_streams_the_target_then_the_caller_finishes() -> None:
    async with mesh_of(three("return_to_caller")) as (router, providers):
        first, second = await turns(router, "I want a refund", "thanks")
    assert speakers(first) == [
        ("a", "handoff"),
        ("b", "delta"),  # b's answer streamed to the user as it happened
        ("b", "handoff"),  # control goes back to a
        ("a", "delta"),
        ("a", "final"),
    ]
    assert first[0].handoff.target == "b"
    assert first[0].handoff.return_strategy == RETURN.RETURN_STRATEGY_RETURN_TO_CALLER
    back = first[2].handoff
    assert back.target == "a" and back.return_strategy == RETURN.RETURN_STRATEGY_RETURN_TO_CALLER
    assert text_of(first, "b") == "b pays back"
    # a saw b's answer and finished the turn with it.
    assert first[-1].final.content == "a wraps up: b pays back"
    assert providers["a"].requests[1].messages[-1].content == "b pays back"
    assert list(first[-1].final.hop_path) == ["a", "b", "a"]
    # The conversation stays with the caller.
    assert second[0].agent == "a" and list(second[-1].final.hop_path) == ["a"]
    assert second[-1].final.content == "a wraps up: thanks"


async def test_continue_chain_feeds_the_targets_answer_to_the_next_step() -> None:
    async with mesh_of(three("continue_chain")) as (router, providers):
        first, second = await turns(router, "refund please", "hello again", agent="chain")
    assert speakers(first) == [
        ("a", "handoff"),
        ("b", "delta"),
        ("c", "delta"),
        ("c", "final"),
    ]
    assert first[0].handoff.return_strategy == RETURN.RETURN_STRATEGY_CONTINUE_CHAIN
    assert first[-1].final.content == "c got: b pays back"  # b's output fed step 2
    assert list(first[-1].final.hop_path) == ["a", "b", "c"]
    # The next turn runs the chain again from its first step.
    assert list(second[-1].final.hop_path) == ["a", "c"]
    assert second[-1].final.content == "c got: a wraps up: hello again"
    assert len(providers["c"].requests) == 2


async def test_bubble_up_inside_a_sequence_leaves_the_sequence() -> None:
    async with mesh_of(three("bubble_up")) as (router, providers):
        first, second = await turns(router, "refund please", "hello again", agent="chain")
    assert speakers(first) == [("a", "handoff"), ("b", "delta"), ("b", "final")]
    assert list(first[-1].final.hop_path) == ["a", "b"]
    assert providers["c"].requests == []  # the chain's next step never ran
    assert list(second[-1].final.hop_path) == ["b"]


async def test_end_conversation_ends_after_the_target_answers() -> None:
    async with mesh_of(three("end_conversation")) as (router, providers):
        async with create_channel(router) as channel:
            call = AgentClient(channel, router=True).open(timeout=30).call
            await call.write(turn_request("refund now", conversation_id="conv-e"))
            events = [e async for e in call]  # the router ends the stream itself
            assert await call.code() == grpc.StatusCode.OK
        # conv-e ended: a later turn with that id starts over at the routing rules (a).
        (again,) = await turns_on("conv-e", router, "hello")
    assert speakers(events) == [("a", "handoff"), ("b", "delta"), ("b", "final")]
    assert events[0].handoff.return_strategy == RETURN.RETURN_STRATEGY_END_CONVERSATION
    final = events[-1].final
    assert final.stop_reason == types_pb2.STOP_REASON_END_CONVERSATION
    assert final.content == "b pays back" and list(final.hop_path) == ["a", "b"]
    assert len(providers["b"].requests) == 1
    assert list(again[-1].final.hop_path) == ["a"] and again[-1].agent == "a"


async def turns_on(conversation: str, router: str, message: str) -> list[list[types_pb2.ChatEvent]]:
    async with create_channel(router) as channel:
        stream = AgentClient(channel, router=True).open(timeout=30)
        try:
            request = turn_request(message, conversation_id=conversation)
            return [[e async for e in stream.turn(request)]]
        finally:
            await stream.close()
            stream.cancel()


async def _error(router: str, message: str) -> tuple[MeshError, list[types_pb2.ChatEvent]]:
    events: list[types_pb2.ChatEvent] = []
    async with create_channel(router) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=30)
        await call.write(turn_request(message))
        await call.done_writing()
        try:
            async for event in call:
                events.append(event)
        except grpc.aio.AioRpcError as err:
            return from_rpc_error(err), events
    raise AssertionError("the turn ended without an error status")


async def test_return_to_caller_ping_pong_stops_at_the_hop_budget() -> None:
    config = mesh_config(
        {
            "a": {
                **offline_agent(rules=[{"matches": ".", "handoff": "b"}]),
                "handoffs": [{"target": "b", "return": "return_to_caller"}],
            },
            "b": offline_agent(default_reply="b again"),
        },
        max_hops=3,
        router={"default_agent": "a"},
    )
    async with mesh_of(config) as (router, providers):
        err, events = await _error(router, "go")
    assert isinstance(err, HopBudgetExceeded)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "path: a > b > a > b > a" in err.message
    assert err.metadata["path"] == "a,b,a,b,a"
    # a -> b, b returns to a, a -> b again; b's second return is refused unsent.
    assert len(providers["a"].requests) == 2 and len(providers["b"].requests) == 2
    moves = [(e.agent, e.handoff.target) for e in events if e.HasField("handoff")]
    assert moves == [("a", "b"), ("b", "a"), ("a", "b")]
    assert events[-1].error.code == types_pb2.ERROR_CODE_FAILED_PRECONDITION


async def test_handing_back_to_an_agent_waiting_for_its_return_is_a_cycle() -> None:
    config = mesh_config(
        {
            "a": {
                **offline_agent(rules=[{"matches": ".", "handoff": "b"}]),
                "handoffs": [{"target": "b", "return": "return_to_caller"}],
            },
            "b": {
                **offline_agent(rules=[{"matches": ".", "handoff": "a"}]),
                "handoffs": [{"target": "a"}],
            },
        },
        router={"default_agent": "a"},
    )
    async with mesh_of(config) as (router, providers):
        err, _events = await _error(router, "go")
    assert isinstance(err, HandoffCycle)
    assert "a > b > a" in err.message and "waiting" in err.message
    assert len(providers["a"].requests) == 1  # a never ran again


async def test_info_lists_each_targets_return_strategy() -> None:
    config = three("return_to_caller")
    async with serve_agent(config, "a") as (address, _server, _runtime, _provider):
        async with create_channel(address) as channel:
            info = await AgentClient(channel).info()
    (target,) = info.handoff_targets
    assert target.agent == "b"
    assert target.return_strategy == RETURN.RETURN_STRATEGY_RETURN_TO_CALLER
