"""The reflection agent kind, through a real router and a real agent server.

The offline model drafts "Draft <n>" (n counts the user messages it has seen, so
each revision is a new draft) and, asked to evaluate, scores by rules on the
draft it is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mesh.client import AgentClient, ChatStream, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.v1 import router_pb2_grpc, types_pb2

from .meshtest import RecordingProvider, mesh_config, offline_agent, serve_agent, serve_router

LONG = " ".join(f"w{i}" for i in range(200))


def _mesh(reflection: dict[str, Any], rules: list[dict[str, Any]], **provider: Any) -> MeshConfig:
    agent = {
        **offline_agent(rules=rules, default_reply="Draft {turns}", **provider),
        "kind": "reflection",
        "reflection": {"criteria": "Names the draft number.", **reflection},
    }
    return mesh_config({"thinker": agent}, router={"default_agent": "thinker"})


def _score(draft: int, score: str) -> dict[str, Any]:
    return {"matches": f"Answer: Draft {draft}$", "reply": f"score: {score}\nfeedback {draft}"}


@contextlib.asynccontextmanager
async def mesh_of(config: MeshConfig) -> AsyncIterator[tuple[str, RecordingProvider]]:
    async with contextlib.AsyncExitStack() as stack:
        address, _s, _rt, provider = await stack.enter_async_context(serve_agent(config, "thinker"))
        router, _app = await stack.enter_async_context(serve_router(config, {"thinker": [address]}))
        yield router, provider


async def chat(router: str, message: str) -> list[types_pb2.ChatEvent]:
    async with create_channel(router) as channel:
        return (await AgentClient(channel, router=True).chat(message, timeout=30)).events


def _steps(events: list[types_pb2.ChatEvent]) -> list[tuple[int, float, bool]]:
    return [
        (e.reflection.iteration, round(e.reflection.score, 3), e.reflection.accepted)
        for e in events
        if e.HasField("reflection")
    ]


def _words(text: str) -> int:
    return len(text.split())


async def test_stops_at_the_threshold_and_streams_only_the_answer() -> None:
    config = _mesh({"threshold": 0.8, "max_iterations": 5}, [_score(1, "0.4"), _score(2, "0.9")])
    async with mesh_of(config) as (router, model):
        events = await chat(router, "tell me")
    assert _steps(events) == [(1, 0.4, False), (2, 0.9, True)]
    first = next(e.reflection for e in events if e.HasField("reflection"))
    assert first.draft == "Draft 1" and first.feedback == "feedback 1"
    deltas = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert deltas == "Draft 2"  # drafts are events, not text: only the answer streams
    final = events[-1].final
    assert final.content == "Draft 2" and final.stop_reason == types_pb2.STOP_REASON_END_TURN
    # draft, evaluate, revise, evaluate: four model calls, and usage counts each one.
    assert len(model.requests) == 4
    assert "Criteria: Names the draft number." in model.requests[1].system
    assert model.requests[2].messages[-1].content.startswith("Revise your previous answer.")
    assert "feedback 1" in model.requests[2].messages[-1].content
    outputs = ["Draft 1", "score: 0.4\nfeedback 1", "Draft 2", "score: 0.9\nfeedback 2"]
    assert final.usage.output_tokens == sum(_words(t) for t in outputs)
    assert final.usage.input_tokens == sum(
        sum(_words(m.content) for m in r.messages) + _words(r.system) for r in model.requests
    )


async def test_stops_at_max_iterations_with_the_last_draft() -> None:
    rules = [_score(n, "0.2") for n in (1, 2, 3)]
    config = _mesh({"threshold": 0.8, "max_iterations": 3}, rules)
    async with mesh_of(config) as (router, model):
        events = await chat(router, "tell me")
    assert _steps(events) == [(1, 0.2, False), (2, 0.2, False), (3, 0.2, False)]
    assert events[-1].final.content == "Draft 3"
    assert len(model.requests) == 6


async def test_a_python_evaluation_function_scores_instead_of_the_model() -> None:
    config = _mesh({"evaluator": "tests.orch_tools:length_score", "threshold": 0.9}, [])
    async with mesh_of(config) as (router, model):
        events = await chat(router, "tell me")
    assert _steps(events) == [(1, 0.5, False), (2, 1.0, True)]
    steps = [e.reflection for e in events if e.HasField("reflection")]
    assert steps[0].feedback == "too thin for 'tell me' (Names the draft number.)"
    assert events[-1].final.content == "Draft 2"
    assert len(model.requests) == 2  # drafts only: the function did the scoring


async def test_cancel_mid_iteration_stops_the_model_stream() -> None:
    rules = [{"matches": "^Request: ", "reply": "score: 0.1\nmore"}]
    config = _mesh(
        {"threshold": 0.9, "max_iterations": 5},
        rules,
        delay_ms=20.0,
        chunk_chars=4,
    )
    config = config.model_copy(
        update={
            "agents": {
                "thinker": config.agents["thinker"].model_copy(
                    update={
                        "provider": config.agents["thinker"].provider.model_copy(
                            update={"default_reply": "Draft {turns} " + LONG}
                        )
                    }
                )
            }
        }
    )
    async with mesh_of(config) as (router, model):
        async with create_channel(router) as channel:
            stream = ChatStream(router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=60))
            events: list[types_pb2.ChatEvent] = []
            try:
                async for event in stream.turn(turn_request("tell me")):
                    events.append(event)
                    if event.HasField("reflection"):
                        while len(model.requests) < 3:  # until the revision's stream is open
                            model.opened.clear()
                            await model.opened.wait()
                        opened = len(model.requests)
                        await stream.send(types_pb2.ChatRequest(cancel=types_pb2.Cancel()))
            finally:
                await stream.close()
                stream.cancel()
        await asyncio.wait_for(model.closed.wait(), 10)
        assert len(model.requests) == opened  # nothing ran after the cancel
    assert _steps(events) == [(1, 0.1, False)]
    assert events[-1].final.stop_reason == types_pb2.STOP_REASON_CANCELLED
    assert opened == 3  # draft 1, its evaluation, and the revision that was cancelled
