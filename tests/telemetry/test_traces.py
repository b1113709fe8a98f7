"""One trace per turn across real processes: client -> router -> agents -> model/tools.

`mesh up` runs the router and three agents (and the token service with auth on),
each exporting over OTLP to a TraceService receiver this test starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.client import AgentClient, create_channel
from tests.meshtest import MESH_YAML, mesh_token, start_mesh, write_config

from .otlp import Receiver, Span

SERVER, CLIENT = 2, 3  # OTLP SpanKind values


def small_mesh(auth: bool, slow_ms: float = 0.0) -> dict[str, Any]:
    """The default mesh's triage, billing and orders (nothing else)."""
    data: dict[str, Any] = yaml.safe_load(MESH_YAML.read_text())
    data["agents"] = {
        k: v for k, v in data["agents"].items() if k in ("triage", "billing", "orders")
    }
    for name in ("billing", "orders"):
        data["agents"][name]["provider"]["delay_ms"] = slow_ms
    data["router"]["routes"] = [r for r in data["router"]["routes"] if r["agent"] == "billing"]
    data["router"]["sequences"] = {}
    data["router"]["store"] = {"kind": "memory"}
    if not auth:
        data["auth"] = {"enabled": False}
    return data


@contextlib.asynccontextmanager
async def traced_mesh(tmp: Path, auth: bool) -> AsyncIterator[tuple[Receiver, str, list[Any]]]:
    receiver = Receiver()
    endpoint = await receiver.start()
    # The consulted agents answer in several chunks 30 ms apart: a consult takes long
    # enough that two consults run in parallel overlap whatever the scheduling.
    config = write_config(tmp, small_mesh(auth, slow_ms=30))
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "PYTHONPATH": str(MESH_YAML.parent),  # the agents' tools
    }
    proc, address, full_env = start_mesh(config, tmp / "data", env)
    try:
        metadata = []
        if auth:
            metadata.append(("authorization", f"Bearer {mesh_token(config, full_env)}"))
        yield receiver, address, metadata
    finally:
        assert proc.stop() == 0, "".join(proc.stderr)
        await receiver.stop()


def _by(spans: list[Span], service: str, name: str) -> list[Span]:
    return [s for s in spans if s.service == service and s.name == name]


def _one(spans: list[Span], service: str, name: str) -> Span:
    found = _by(spans, service, name)
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def _no_content(spans: list[Span], *texts: str) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            for text in texts:
                assert text not in str(value), (span.name, key)


async def _turn(address: str, metadata: list[Any], message: str, trace_id: str, conv: str) -> Any:
    traceparent = f"00-{trace_id}-{'ab' * 8}-01"
    async with create_channel(address) as channel:
        return await AgentClient(channel, router=True).chat(
            message,
            conversation_id=conv,
            timeout=60,
            metadata=[*metadata, ("traceparent", traceparent)],
        )


def _check_transfer(spans: list[Span], trace_id: str, conv: str) -> None:
    mine = [s for s in spans if s.attributes.get("gen_ai.conversation.id") == conv]
    assert mine and all(s.trace_id == trace_id for s in mine)
    spans = [s for s in spans if s.trace_id == trace_id]
    turn = _one(spans, "router", "mesh.v1.RouterService/Chat")
    assert turn.parent_id == "ab" * 8 and turn.kind == SERVER  # the client's span
    assert turn.attributes["mesh.hop_path"] == ["triage", "billing"]
    assert isinstance(turn.attributes["mesh.store.latency_ms"], float)
    hop_triage = _one(spans, "router", "invoke_agent triage")
    hop_billing = _one(spans, "router", "invoke_agent billing")
    assert hop_triage.parent_id == turn.span_id and hop_triage.kind == CLIENT
    assert hop_billing.parent_id == turn.span_id
    assert hop_billing.attributes["mesh.handoff.mode"] == "transfer"
    assert hop_billing.attributes["mesh.handoff.source"] == "triage"
    assert hop_billing.attributes["server.address"] == "127.0.0.1"
    assert "mesh.handoff" in hop_triage.events
    triage = _one(spans, "agent-triage", "invoke_agent triage")
    billing = _one(spans, "agent-billing", "invoke_agent billing")
    assert triage.parent_id == hop_triage.span_id and triage.kind == SERVER
    assert billing.parent_id == hop_billing.span_id
    for agent in (triage, billing):
        attrs = agent.attributes
        assert attrs["gen_ai.operation.name"] == "invoke_agent"
        assert attrs["gen_ai.provider.name"] == "offline"
        assert attrs["gen_ai.request.model"] == "offline-1"
        assert attrs["gen_ai.conversation.id"] == conv
        assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert billing.attributes["gen_ai.agent.name"] == "billing"
    assert billing.attributes["mesh.handoff.mode"] == "transfer"
    chats = _by(spans, "agent-billing", "chat offline-1")
    assert len(chats) == 2 and all(c.parent_id == billing.span_id for c in chats)
    assert all(c.attributes["gen_ai.operation.name"] == "chat" for c in chats)
    tool = _one(spans, "agent-billing", "execute_tool refund_status")
    assert tool.parent_id == billing.span_id
    assert tool.attributes["gen_ai.tool.name"] == "refund_status"
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    _no_content(spans, "refund for INV-1001", "42.00 EUR")


def _check_consult(spans: list[Span], trace_id: str, conv: str) -> None:
    spans = [s for s in spans if s.trace_id == trace_id]
    turn = _one(spans, "router", "mesh.v1.RouterService/Chat")
    hop_triage = _one(spans, "router", "invoke_agent triage")
    assert hop_triage.parent_id == turn.span_id
    branches = {}
    for name in ("billing", "orders"):
        hop = _one(spans, "router", f"invoke_agent {name}")
        assert hop.parent_id == hop_triage.span_id  # asked by triage, inside its hop
        assert hop.attributes["mesh.handoff.mode"] == "consult"
        agent = _one(spans, f"agent-{name}", f"invoke_agent {name}")
        assert agent.parent_id == hop.span_id
        assert agent.attributes["gen_ai.conversation.id"] == conv
        branches[name] = agent
    billing, orders = branches["billing"], branches["orders"]
    assert billing.start < orders.end and orders.start < billing.end, "branches did not overlap"
    triage = _one(spans, "agent-triage", "invoke_agent triage")
    assert triage.start <= billing.start and billing.end <= triage.end
    assert len(_by(spans, "agent-triage", "chat offline-1")) == 2  # before and after consults
    _no_content(spans, "give me a plan", "is paid", "shipped with DHL")


def _complete(trace_id: str, count: int) -> Any:
    def done(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return len(mine) >= count and any(s.service == "router" for s in mine)

    return done


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
async def test_one_trace_per_turn_through_transfer_and_parallel_consult(
    tmp_path: Path, auth: bool
) -> None:
    async with traced_mesh(tmp_path, auth) as (receiver, address, metadata):
        transfer_trace = "1" * 32
        result = await _turn(
            address, metadata, "I need a refund for INV-1001", transfer_trace, "t1"
        )
        assert result.final is not None and result.final.agent == "billing"
        # router turn + 2 hops, 2 agent spans, triage chat, billing 2 chats + 1 tool
        await receiver.wait_for(_complete(transfer_trace, 9))
        _check_transfer(receiver.spans, transfer_trace, "t1")

        consult_trace = "2" * 32
        result = await _turn(address, metadata, "give me a plan", consult_trace, "c1")
        assert result.final is not None and "A-17 shipped with DHL" in result.final.final.content
        # router turn + 3 hops, 3 agent spans, triage 2 chats, billing/orders 1 chat each
        await receiver.wait_for(_complete(consult_trace, 11))
        _check_consult(receiver.spans, consult_trace, "c1")
