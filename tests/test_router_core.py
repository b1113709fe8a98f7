"""The routing core and the relay's byte helpers, with no server."""

from __future__ import annotations

import pytest

from mesh.errors import AgentNotFound, HandoffCycle, HandoffNotAllowed, HopBudgetExceeded
from mesh.router._core import HopBudget, RoutingCore
from mesh.router._wire import (
    KIND_DELTA,
    KIND_ERROR,
    KIND_FINAL,
    KIND_HANDOFF,
    KIND_TOOL_CALL,
    KIND_TOOL_RESULT,
    encode_seq,
    peek_kind,
)
from mesh.v1 import types_pb2

from .meshtest import mesh_config, offline_agent


def _core(discovered: tuple[str, ...] = ()) -> RoutingCore:
    config = mesh_config(
        {
            "triage": {**offline_agent(), "limits": {"max_hops": 2}},
            "billing": offline_agent(),
            "orders": offline_agent(),
        },
        max_hops=5,
        router={
            "default_agent": "triage",
            "routes": [
                {"matches": "^brief\\b", "agent": "brief"},
                {"context": {"department": "finance"}, "agent": "billing"},
                {"context": {"x-tenant": "acme"}, "agent": "orders"},
            ],
            "sequences": {"brief": {"steps": ["billing", "orders"]}},
        },
    )
    return RoutingCore(config, lambda: discovered)


def test_route_order_named_then_rules_then_active_then_default() -> None:
    core = _core(discovered=("remote",))
    assert core.choose("orders", "brief me", {}, {}, "billing") == "orders"  # named wins
    assert core.choose("remote", "hi", {}, {}, "") == "remote"  # a discovered agent
    assert core.choose("", "brief me", {}, {}, "orders") == "brief"  # a regex route
    assert core.choose("", "hi", {"department": "finance"}, {}, "orders") == "billing"
    assert core.choose("", "hi", {}, {"x-tenant": "acme"}, "") == "orders"  # metadata route
    assert core.choose("", "hi", {}, {}, "billing") == "billing"  # the conversation's agent
    assert core.choose("", "hi", {}, {}, "gone") == "triage"  # unknown active: default
    with pytest.raises(AgentNotFound) as caught:
        core.choose("nobody", "hi", {}, {}, "")
    assert caught.value.field == "turn.agent" and "billing" in caught.value.message


def test_sequence_plan_and_single_agent_plan() -> None:
    core = _core()
    assert core.plan("brief").steps == ("billing", "orders") and core.plan("brief").sequence
    assert core.plan("billing").steps == ("billing",) and not core.plan("billing").sequence


def test_budget_counts_incoming_hops_and_per_agent_limit() -> None:
    core = _core()
    budget = HopBudget.incoming(["billing"])  # one hop already taken upstream
    assert core.hops_remaining("triage", budget) == 1  # triage's own limit is 2
    assert core.hops_remaining("billing", budget) == 4  # the mesh limit is 5
    core.take_handoff(budget, "triage", "orders", None)
    assert budget.path == ["billing", "orders"] and budget.hops == 2
    with pytest.raises(HopBudgetExceeded) as caught:
        core.take_handoff(budget, "triage", "billing", None)
    assert "billing > orders > billing" in caught.value.message
    assert caught.value.metadata == {"path": "billing,orders,billing", "max_hops": "2"}
    assert budget.path == ["billing", "orders"]  # nothing recorded for a refused hop
    core.take_handoff(budget, "billing", "triage", None)  # billing may still go on


def test_consult_cycle_and_unknown_target_refused() -> None:
    core = _core()
    budget = HopBudget(["triage"])
    with pytest.raises(HandoffCycle) as caught:
        core.check_handoff(budget, "billing", "triage", ["triage", "billing"])
    assert caught.value.metadata["path"] == "triage,billing,triage"
    core.check_handoff(budget, "triage", "billing", None)  # TRANSFER back is no cycle
    with pytest.raises(HandoffNotAllowed):
        core.check_handoff(budget, "triage", "brief", None)  # a sequence is no agent


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (types_pb2.ChatEvent(delta=types_pb2.TextDelta(text="hé")), KIND_DELTA),
        (types_pb2.ChatEvent(tool_call=types_pb2.ToolCall(id="1", name="t")), KIND_TOOL_CALL),
        (types_pb2.ChatEvent(tool_result=types_pb2.ToolResult(call_id="1")), KIND_TOOL_RESULT),
        (types_pb2.ChatEvent(handoff=types_pb2.HandoffEvent(target="b")), KIND_HANDOFF),
        (types_pb2.ChatEvent(final=types_pb2.FinalMessage(content="x")), KIND_FINAL),
        (types_pb2.ChatEvent(error=types_pb2.ErrorEvent(message="X")), KIND_ERROR),
        (types_pb2.ChatEvent(), 0),
    ],
)
def test_peek_kind_and_appended_seq(event: types_pb2.ChatEvent, kind: int) -> None:
    event.agent = "a" * 300  # a length prefix of two bytes
    event.seq = 7
    event.conversation_id = "c" * 130
    event.turn_id = "t1"
    data = event.SerializeToString()
    assert peek_kind(data) == kind
    for seq in (1, 127, 128, 300, 2**40):
        stamped = types_pb2.ChatEvent.FromString(data + encode_seq(seq))
        assert stamped.seq == seq
        assert stamped.agent == event.agent and stamped.turn_id == "t1"
        assert stamped.WhichOneof("kind") == event.WhichOneof("kind")
    assert peek_kind(b"\x0a\xff") == 0  # truncated: no kind, no crash
