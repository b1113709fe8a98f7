"""best_match: a routing model picks the agent when no CONDITIONAL route matches.

A real router over real agents; the routing model is the offline model, so its
answers are deterministic: it names billing for refunds, answers nonsense for
"weird", and a slow variant never answers within the decision's deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mesh.client import AgentClient, create_channel
from mesh.config import MeshConfig
from mesh.router._routing import parse_choice
from mesh.v1 import types_pb2

from .meshtest import RecordingProvider, mesh_config, offline_agent, serve_agent, serve_router

# The offline model formats its replies ({message}): JSON braces are doubled.
ROUTING_RULES = [
    {"contains": "refund", "reply": '{{"agent": "billing", "reason": "refunds are billing\'s"}}'},
    {"contains": "parcel", "reply": "orders: it is about a parcel"},
    {"contains": "weird", "reply": "banana"},
    {"contains": "ghost", "reply": '{{"agent": "nobody", "reason": "made up"}}'},
]


def _mesh(**routing: Any) -> MeshConfig:
    return mesh_config(
        {
            "triage": offline_agent("Greets people", default_reply="triage: {message}"),
            "billing": {
                **offline_agent("Answers invoices and refunds", default_reply="billing here"),
                "skills": [{"name": "refunds", "description": "Says whether a refund is due"}],
            },
            "orders": offline_agent("Tracks orders", default_reply="orders here"),
        },
        router={
            "default_agent": "triage",
            "routes": [{"matches": "^billing:", "agent": "billing"}],
            "routing": {
                "strategy": "best_match",
                "provider": {"kind": "offline", "rules": ROUTING_RULES},
                **routing,
            },
        },
    )


@contextlib.asynccontextmanager
async def mesh_of(config: MeshConfig) -> AsyncIterator[tuple[str, RecordingProvider]]:
    async with contextlib.AsyncExitStack() as stack:
        static: dict[str, list[str]] = {}
        for name in config.agents:
            address, *_ = await stack.enter_async_context(serve_agent(config, name))
            static[name] = [address]
        router, app = await stack.enter_async_context(serve_router(config, static))
        best = app.router.best_match
        assert best is not None
        recording = RecordingProvider(best.provider)
        best.provider = recording
        yield router, recording


async def chat(router: str, message: str) -> list[types_pb2.ChatEvent]:
    async with create_channel(router) as channel:
        result = await AgentClient(channel, router=True).chat(message, timeout=30)
    return result.events


def _decision(events: list[types_pb2.ChatEvent]) -> types_pb2.RoutingDecision:
    (decision,) = [e.routing for e in events if e.HasField("routing")]
    return decision


async def test_the_routing_model_picks_the_agent_it_names() -> None:
    async with mesh_of(_mesh()) as (router, model):
        events = await chat(router, "I want a refund")
        parcel = await chat(router, "where is my parcel")
    decision = _decision(events)
    assert events[0].agent == "router" and events[0].HasField("routing")  # before the turn
    assert decision.agent == "billing" and decision.reason == "refunds are billing's"
    assert not decision.fallback and decision.strategy == "best_match"
    assert events[-1].agent == "billing" and list(events[-1].final.hop_path) == ["billing"]
    # The model chose from the agents' Info: descriptions and skills.
    system = model.requests[0].system
    assert "- billing: Answers invoices and refunds" in system
    assert "skill refunds: Says whether a refund is due" in system
    assert "- orders: Tracks orders" in system
    assert _decision(parcel).agent == "orders" and parcel[-1].agent == "orders"


async def test_a_nonsense_or_unknown_answer_falls_back_to_the_default_agent() -> None:
    async with mesh_of(_mesh()) as (router, _model):
        nonsense = await chat(router, "something weird")
        unknown = await chat(router, "a ghost story")
    for events in (nonsense, unknown):
        decision = _decision(events)
        assert decision.fallback and decision.agent == "triage"
        assert "named no known agent" in decision.reason
        assert events[-1].agent == "triage"
    assert "banana" in _decision(nonsense).reason


async def test_the_decision_has_its_own_deadline() -> None:
    config = _mesh(timeout_s=0.2)
    slow = config.router.routing.provider.model_copy(update={"delay_ms": 60_000.0})
    routing = config.router.routing.model_copy(update={"provider": slow})
    config = config.model_copy(
        update={"router": config.router.model_copy(update={"routing": routing})}
    )
    async with mesh_of(config) as (router, model):
        events = await chat(router, "I want a refund")
        assert model.closed.is_set()  # the slow model stream was closed, not left running
    decision = _decision(events)
    assert decision.fallback and decision.agent == "triage"
    assert "no answer within 0.2s" in decision.reason
    assert events[-1].agent == "triage" and events[-1].final.content == "triage: I want a refund"


async def test_rules_decide_first_and_the_model_is_not_asked() -> None:
    async with mesh_of(_mesh()) as (router, model):
        events = await chat(router, "billing: a refund")
    assert not any(e.HasField("routing") for e in events)
    assert events[-1].agent == "billing" and model.requests == []


def test_parse_choice_reads_json_or_a_leading_name() -> None:
    names = ["billing", "orders"]
    assert parse_choice('{"agent": "orders", "reason": "r"}', names) == ("orders", "r")
    assert parse_choice('Sure! {"agent": "billing"}', names) == ("billing", "")
    assert parse_choice("orders - parcels", names) == ("orders", "parcels")
    assert parse_choice('{"agent": "x"}', names) is None
    assert parse_choice("", names) is None
