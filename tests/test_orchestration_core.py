"""The orchestration rules without servers: return strategies in the routing core,
the waiting stack of return_to_caller, the next turn's agent, where model routing
takes over from the rules, the config fields, and the reflection score parser."""

from __future__ import annotations

import pytest

from mesh.agent._reflection import parse_score
from mesh.errors import ConfigError, HandoffCycle
from mesh.router._core import Plan, RoutingCore

from .meshtest import mesh_config, offline_agent


def _core(**router: object) -> RoutingCore:
    config = mesh_config(
        {
            "a": {
                **offline_agent(),
                "handoffs": [
                    {"target": "b", "return": "return_to_caller"},
                    {"target": "c"},
                ],
            },
            "b": offline_agent(),
            "c": offline_agent(),
        },
        router={
            "default_agent": "a",
            "routes": [{"contains": ["invoice"], "agent": "b"}],
            "sequences": {"chain": {"steps": ["a", "c"]}},
            **router,
        },
    )
    return RoutingCore(config, lambda: ["d"])


def test_return_strategy_comes_from_the_handing_agents_target() -> None:
    core = _core()
    assert core.return_strategy("a", "b") == "return_to_caller"
    assert core.return_strategy("a", "c") == "bubble_up"  # the default
    assert core.return_strategy("d", "a") == "bubble_up"  # a discovered agent: no config


def test_a_transfer_to_an_agent_waiting_for_its_return_is_a_cycle() -> None:
    core = _core()
    core.check_return_cycle(["a"], "b", "c")
    with pytest.raises(HandoffCycle) as caught:
        core.check_return_cycle(["a"], "b", "a")
    assert "return cycle refused: a > b > a" in caught.value.message
    assert caught.value.metadata["path"] == "a,b,a"


def test_the_next_turns_agent_follows_the_strategy() -> None:
    core = _core()
    single, chain = Plan("a", ("a",)), Plan("chain", ("a", "c"), sequence=True)
    assert core.next_active(single, "b", "bubble_up", False) == "b"
    assert core.next_active(single, "a", "return_to_caller", False) == "a"
    assert core.next_active(chain, "c", "continue_chain", False) == "chain"
    assert core.next_active(chain, "b", "bubble_up", False) == "b"  # left the sequence
    assert core.next_active(chain, "c", "", False) == "chain"
    assert core.next_active(single, "b", "end_conversation", True) == ""


def test_rules_first_then_the_routing_model_then_the_default() -> None:
    core = _core(routing={"strategy": "best_match"})
    assert core.model_routing
    assert core.choose_by_rules("", "an invoice", {}, {}, "") == "b"
    assert core.choose_by_rules("", "hello", {}, {}, "c") == "c"  # the conversation's agent
    assert core.choose_by_rules("", "hello", {}, {}, "") is None  # the model decides
    assert core.choose("", "hello", {}, {}, "") == "a"
    assert core.candidates() == ["a", "b", "c", "chain", "d"]
    assert not _core().model_routing


def test_config_fields_and_their_errors() -> None:
    with pytest.raises(ConfigError, match=r"best_match needs router.default_agent"):
        mesh_config({"a": offline_agent()}, router={"routing": {"strategy": "best_match"}})
    with pytest.raises(ConfigError, match=r"handoffs.0.return"):
        mesh_config(
            {"a": {**offline_agent(), "handoffs": [{"target": "b", "return": "later"}]}, "b": {}}
        )
    with pytest.raises(ConfigError, match=r"tool_policies.x.approval"):
        mesh_config({"a": {**offline_agent(), "tool_policies": {"x": {"approval": "maybe"}}}})
    with pytest.raises(ConfigError, match=r"reflection.threshold"):
        mesh_config(
            {"a": {**offline_agent(), "kind": "reflection", "reflection": {"threshold": 2}}}
        )


def test_parse_score_reads_the_usual_shapes() -> None:
    assert parse_score("score: 0.7\nok") == 0.7
    assert parse_score("Score = 8/10") == 0.8
    assert parse_score("I'd give it 7") == 0.7
    assert parse_score("85") == 0.85
    assert parse_score("score: 3") == 0.3
    assert parse_score("no number here") is None
