"""Kept histories: an agent keeps what a stream carried, the router sends only what is new.

Every test checks what the agent's model saw (the whole, right history of its own
conversation) besides what travelled on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from mesh.client import AgentClient, create_channel
from mesh.errors import HistoryNotKept, from_rpc_error
from mesh.kept import KEEP, KeptHistories, overlap, resolve
from mesh.providers.base import ChatMessage
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

from .meshtest import RawAgent, mesh_config, offline_agent, serve_agent, serve_router

HISTORY_LIMIT = 8  # four turns of the conversation


def _sample(agent: str, source: str) -> float:
    value = REGISTRY.get_sample_value(
        "mesh_history_messages_total", {"agent": agent, "source": source}
    )
    return value or 0.0


def _expected(conversation: str, round_: int, pad: str = "") -> list[ChatMessage]:
    """What the model must see in round ``round_``: the window of earlier turns (the
    agent echoes each message), then the turn's own message."""
    earlier: list[ChatMessage] = []
    for r in range(round_):
        text = f"{pad}{conversation}-{r}"
        earlier += [ChatMessage("user", text), ChatMessage("assistant", text, agent="memo")]
    return [*earlier[-HISTORY_LIMIT:], ChatMessage("user", f"{pad}{conversation}-{round_}")]


def _seen(provider: Any) -> dict[str, list[list[ChatMessage]]]:
    out: dict[str, list[list[ChatMessage]]] = {}
    for request in provider.requests:
        out.setdefault(request.conversation_id, []).append(list(request.messages))
    return out


async def _rounds(
    router: str, conversations: list[str], rounds: int, clients: int, pad: str = ""
) -> None:
    async def worker(names: list[str]) -> None:
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            for round_ in range(rounds):
                for name in names:
                    message = f"{pad}{name}-{round_}"
                    result = await client.chat(message, conversation_id=name)
                    assert result.final is not None

    await asyncio.gather(*(worker(conversations[i::clients]) for i in range(clients)))


@contextlib.asynccontextmanager
async def _mesh(**extra: Any) -> AsyncIterator[tuple[str, Any, Any, Any]]:
    """An echoing agent ``memo`` behind a router with an 8-message history window:
    (router address, router app, agent server, the agent's recording provider)."""
    config = mesh_config(
        {"memo": offline_agent(default_reply="{message}")},
        router={"default_agent": "memo", "store": {"history_limit": HISTORY_LIMIT}},
        **extra,
    )
    async with contextlib.AsyncExitStack() as stack:
        address, server, _runtime, provider = await stack.enter_async_context(
            serve_agent(config, "memo")
        )
        router, app = await stack.enter_async_context(serve_router(config, {"memo": [address]}))
        yield router, app, server, provider


async def test_the_agent_sees_every_history_whole_while_the_router_sends_what_is_new() -> None:
    """One client, turns one after another over three conversations: one pooled stream
    carries them all, and after a conversation's first turn the router sends only the
    two messages the last turn added."""
    conversations = ["a", "b", "c"]
    sent, kept = _sample("memo", "sent"), _sample("memo", "kept")
    async with _mesh() as (router, app, _server, provider):
        await _rounds(router, conversations, rounds=8, clients=1)
        assert app.streams.opened == 1
    seen = _seen(provider)
    for conversation in conversations:
        assert seen[conversation] == [_expected(conversation, r) for r in range(8)]
    sent, kept = _sample("memo", "sent") - sent, _sample("memo", "kept") - kept
    total = sum(min(2 * r, HISTORY_LIMIT) for r in range(8)) * len(conversations)
    assert sent == 2 * 7 * len(conversations) and kept == total - sent


async def test_concurrent_clients_share_pooled_streams_and_every_history_stays_right() -> None:
    """Three clients at once over six conversations: a conversation's turns land on
    different pooled streams, each keeping what it carried; every model call still sees
    exactly its own conversation's history."""
    conversations = [f"conv-{i}" for i in range(6)]
    sent, kept = _sample("memo", "sent"), _sample("memo", "kept")
    async with _mesh() as (router, app, _server, provider):
        await _rounds(router, conversations, rounds=8, clients=3)
        opened = app.streams.opened
    seen = _seen(provider)
    assert sorted(seen) == conversations
    for conversation, calls in seen.items():
        assert calls == [_expected(conversation, r) for r in range(8)], conversation
    sent, kept = _sample("memo", "sent") - sent, _sample("memo", "kept") - kept
    total = sum(min(2 * r, HISTORY_LIMIT) for r in range(8)) * len(conversations)
    # Every history message was either sent or kept (how many were kept depends on which
    # stream each turn found idle); a stream goes back to the pool before the client sees
    # its final, so three clients never need more than three.
    assert sent + kept == total
    assert opened <= 3


async def test_an_agent_that_forgot_gets_the_turn_again_whole_on_a_new_stream() -> None:
    """An agent whose bound is below the router's forgets histories the router counts on
    (here: 16 KiB per stream, long messages); it refuses such a turn before running
    it, and the router sends it again, whole, on a new stream. The client sees nothing."""
    pad = "x" * 400  # 8 messages of history fit the router's window (half the limit)
    conversations = [f"c{i}" for i in range(6)]
    async with _mesh(server={"max_message_bytes": 16384}) as (router, app, server, provider):
        await _rounds(router, conversations, rounds=6, clients=1, pad=pad)
        opened = app.streams.opened
    seen = _seen(provider)
    for conversation in conversations:
        assert seen[conversation] == [_expected(conversation, r, pad) for r in range(6)]
    assert opened > 1  # the refused turns went out again on new streams
    assert server.lifecycle.turns_started == len(conversations) * 6  # each ran once


class _OldAgent(RawAgent):
    """An agent built before kept histories: no ``mesh-history`` header. It records the
    turns it receives and answers each with a final event."""

    def __init__(self) -> None:
        self.turns: list[types_pb2.Turn] = []

        async def chat(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for request in requests:
                self.turns.append(request.turn)
                final = types_pb2.FinalMessage(content=request.turn.message)
                yield types_pb2.ChatEvent(agent="memo", final=final)

        super().__init__(chat)


async def test_an_agent_without_the_header_gets_every_history_whole() -> None:
    old = _OldAgent()
    address = f"127.0.0.1:{await old.start()}"
    config = mesh_config(
        {"memo": offline_agent()},
        router={"default_agent": "memo", "store": {"history_limit": HISTORY_LIMIT}},
    )
    try:
        async with serve_router(config, {"memo": [address]}) as (router, _app):
            await _rounds(router, ["a", "b"], rounds=5, clients=1)
    finally:
        await old.server.stop(0)
    assert len(old.turns) == 10
    for turn in old.turns:
        assert not turn.HasField("kept")
        round_ = int(turn.message.rsplit("-", 1)[1])
        assert len(turn.history) == min(2 * round_, HISTORY_LIMIT)


async def _chat_direct(address: str, *turns: types_pb2.Turn) -> list[types_pb2.ChatEvent]:
    async with create_channel(address) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=20)
        for turn in turns:
            await call.write(types_pb2.ChatRequest(turn=turn))
        await call.done_writing()
        return [event async for event in call]


@pytest.mark.parametrize(
    "kept",
    [
        types_pb2.KeptHistory(skip=0, count=1),  # a fresh stream keeps nothing
        types_pb2.KeptHistory(skip=1, count=2),  # past what the stream keeps
        types_pb2.KeptHistory(skip=0, count=0),  # names no message
    ],
)
async def test_a_turn_naming_history_its_stream_does_not_keep_is_refused(
    kept: types_pb2.KeptHistory,
) -> None:
    """A caller can name only history it sent on the same stream: a bad reference gets
    FAILED_PRECONDITION HISTORY_NOT_KEPT before the model runs, and the agent serves on."""
    config = mesh_config({"memo": offline_agent(default_reply="{message}")})
    async with serve_agent(config, "memo") as (address, _server, _runtime, provider):
        first = types_pb2.Turn(
            conversation_id="c1",
            message="one",
            history=[types_pb2.Message(role=types_pb2.Message.ROLE_USER, content="zero")],
        )
        second = types_pb2.Turn(conversation_id="c1", message="two", kept=kept)
        turns = (second,) if kept.skip == 0 and kept.count == 1 else (first, second)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _chat_direct(address, *turns)
        err = from_rpc_error(caught.value)
        assert isinstance(err, HistoryNotKept) and err.field == "turn.kept"
        assert [r.messages[-1].content for r in provider.requests] == ["one"][: len(turns) - 1]
        # The same stream may name what it sent; another stream may not.
        good = types_pb2.Turn(
            conversation_id="c1", message="three", kept=types_pb2.KeptHistory(count=1)
        )
        events = await _chat_direct(address, first, good)
        assert events[-1].final.content == "three"
        assert [m.content for m in provider.requests[-1].messages] == ["zero", "three"]


def _messages(*texts: str) -> list[ChatMessage]:
    return [ChatMessage("user", t) for t in texts]


def test_overlap_finds_where_the_window_moved_on() -> None:
    kept = _messages("a", "b", "c", "d")
    assert overlap(kept, _messages("c", "d", "e", "f")) == (2, 2)
    assert overlap(kept, _messages("a", "b", "c", "d", "e")) == (0, 4)
    assert overlap(kept, kept) == (0, 4)
    assert overlap(kept, _messages("b", "x", "d")) == (0, 0)  # not a tail of what is kept
    assert overlap(kept, _messages("d")) == (3, 1)
    assert overlap(_messages("a", "a", "b"), _messages("a", "b", "c")) == (1, 2)
    assert overlap([], _messages("a")) == (0, 0) and overlap(kept, []) == (0, 0)
    assert resolve(tuple(kept), 2, 2) == tuple(kept[2:])
    assert resolve(tuple(kept), 3, 2) is None and resolve(None, 0, 1) is None


def test_kept_histories_keep_the_newest_conversations_within_their_bound() -> None:
    kept = KeptHistories(max_bytes=10_000)
    for i in range(KEEP + 2):
        kept.put(f"c{i}", _messages(f"m{i}"))
    assert "c0" not in kept and "c1" not in kept
    assert all(f"c{i}" in kept for i in range(2, KEEP + 2))
    kept.put("c2", _messages("again"))  # used again: now the newest
    kept.put("new", _messages("n"))
    assert "c2" in kept and "c3" not in kept
    # A history over the bound drops the oldest first, and itself when it alone is over.
    kept.put("big", _messages("x" * 9_000))
    assert "big" in kept and sum(f"c{i}" in kept for i in range(KEEP + 2)) < KEEP - 1
    kept.put("huge", _messages("x" * 20_000))
    assert "huge" not in kept and kept.get("huge") is None


def test_overlap_of_many_equal_messages_is_found_or_given_up_quickly() -> None:
    same = _messages(*["ok"] * 2000)
    assert overlap(same, same) == (0, 2000)
    assert overlap(same, [*same[:-1], ChatMessage("user", "other")]) == (1, 1999)
    # Only the last 10 kept messages start this history: that far in, the search has
    # given up (it tries a bounded number of starting points), and the turn goes whole.
    assert overlap(same, [*same[:10], ChatMessage("user", "other")]) == (0, 0)


async def test_a_conversation_stays_with_the_replica_that_keeps_its_history() -> None:
    """Two replicas: a conversation's first turn goes to either, and its later turns to
    the replica whose idle stream keeps its history, so only new messages travel."""
    config = mesh_config(
        {"memo": offline_agent(default_reply="{message}")},
        router={"default_agent": "memo", "store": {"history_limit": HISTORY_LIMIT}},
    )
    conversations = ["a", "b", "c"]
    sent, kept = _sample("memo", "sent"), _sample("memo", "kept")
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(serve_agent(config, "memo")) for _ in "12"]
        addresses = [address for address, *_ in replicas]
        router, app = await stack.enter_async_context(serve_router(config, {"memo": addresses}))
        for endpoint in app.pool.endpoints["memo"].values():  # both, before the first turn
            assert await app.pool.wait_endpoint(endpoint, 10)
        await _rounds(router, conversations, rounds=8, clients=1)
    seen = [_seen(provider) for *_, provider in replicas]
    assert all(seen)  # both replicas carried conversations
    for conversation in conversations:
        (calls,) = [at[conversation] for at in seen if conversation in at]
        assert calls == [_expected(conversation, r) for r in range(8)]
    sent, kept = _sample("memo", "sent") - sent, _sample("memo", "kept") - kept
    total = sum(min(2 * r, HISTORY_LIMIT) for r in range(8)) * len(conversations)
    assert sent == 2 * 7 * len(conversations) and kept == total - sent


async def test_handoff_turns_send_only_what_the_target_does_not_keep() -> None:
    """A sequence hands every turn from ``front`` to ``memo`` (a TRANSFER on a pooled
    stream), and turns addressed to ``memo`` itself come between: both kinds of turn of
    one conversation share memo's kept record, so after the first only new messages
    travel, and memo's model sees each history whole."""
    config = mesh_config(
        {
            "front": offline_agent(default_reply="{message}"),
            "memo": offline_agent(default_reply="{message}"),
        },
        router={
            "default_agent": "memo",
            "sequences": {"chain": {"steps": ["front", "memo"]}},
            "store": {"history_limit": HISTORY_LIMIT},
        },
    )
    sent, kept = _sample("memo", "sent"), _sample("memo", "kept")
    async with contextlib.AsyncExitStack() as stack:
        agents = {
            name: await stack.enter_async_context(serve_agent(config, name))
            for name in ("front", "memo")
        }
        router, app = await stack.enter_async_context(
            serve_router(config, {name: [address] for name, (address, *_) in agents.items()})
        )
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)
            for round_ in range(8):
                result = await client.chat(
                    f"c-{round_}", conversation_id="c", agent="chain" if round_ % 2 else "memo"
                )
                assert result.final is not None and result.final.agent == "memo"
    seen = _seen(agents["memo"][3])["c"]
    handed = [ChatMessage("user", f"c-{r}") if r % 2 else None for r in range(8)]
    assert seen == [[*_expected("c", r), *filter(None, [handed[r]])] for r in range(8)]
    # Whole, the 8 histories hold 48 messages. Sent: a handoff's first one whole (3),
    # then per chat turn the last answer (1) and per handoff the answer and the two
    # user messages since (3); 15 in all.
    sent, kept = _sample("memo", "sent") - sent, _sample("memo", "kept") - kept
    assert (sent, kept) == (15, 33)
    assert app.streams.opened == 2  # one pooled stream per agent


async def test_a_handoff_naming_history_no_stream_keeps_is_refused() -> None:
    """``handoff.kept`` on ``AgentService.Handoff`` (one turn: nothing kept) or naming
    what a Chat stream does not keep gets HISTORY_NOT_KEPT before the model runs."""
    config = mesh_config({"memo": offline_agent(default_reply="{message}")})
    handoff = types_pb2.HandoffTurn(
        conversation_id="c1",
        source_agent="front",
        mode=types_pb2.HANDOFF_MODE_TRANSFER,
        message="hello",
        kept=types_pb2.KeptHistory(count=1),
    )
    async with serve_agent(config, "memo") as (address, _server, _runtime, provider):
        async with create_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            calls: list[AsyncIterable[types_pb2.ChatEvent]] = [
                stub.Handoff(iter([agent_pb2.HandoffRequest(handoff=handoff)]), timeout=20),
                stub.Chat(iter([types_pb2.ChatRequest(handoff=handoff)]), timeout=20),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    _ = [event async for event in call]
                err = from_rpc_error(caught.value)
                assert isinstance(err, HistoryNotKept) and err.field == "handoff.kept"
        assert provider.requests == []
