"""Tool approval on the open Chat stream, through a real router and real agents.

The tool belongs to an agent the turn was TRANSFERred to (or CONSULTed): its
approval request crosses the router to the client, and the client's answer on the
same stream goes back to exactly that agent stream. The tool records each run, so
the tests see it ran only when approved.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from mesh._approval_prompt import ask_approval
from mesh.client import ChatStream, create_channel, turn_request
from mesh.config import MeshConfig, config_from_dict
from mesh.v1 import router_pb2_grpc, types_pb2

from . import orch_tools
from .meshtest import (
    MESH_YAML,
    RecordingProvider,
    mesh_config,
    offline_agent,
    serve_agent,
    serve_router,
    tool_path,
)

REFUND_RULE = {"contains": "refund", "tool": "issue_refund", "arguments": {"invoice_id": "INV-7"}}


def _mesh(timeout_s: float = 30.0, front: dict[str, Any] | None = None) -> MeshConfig:
    return mesh_config(
        {
            "front": front
            or {
                **offline_agent(rules=[{"contains": "refund", "handoff": "payer"}]),
                "handoffs": [{"target": "payer"}],
            },
            "payer": {
                **offline_agent(rules=[REFUND_RULE], after_tools="payer: {results}"),
                "tools": ["tests.orch_tools:issue_refund"],
                "tool_policies": {"issue_refund": {"approval": "required"}},
                "limits": {"approval_timeout_s": timeout_s},
            },
        },
        router={"default_agent": "front"},
    )


@contextlib.asynccontextmanager
async def mesh_of(config: MeshConfig) -> AsyncIterator[tuple[str, dict[str, RecordingProvider]]]:
    async with contextlib.AsyncExitStack() as stack:
        static: dict[str, list[str]] = {}
        providers: dict[str, RecordingProvider] = {}
        for name in config.agents:
            address, _s, _rt, provider = await stack.enter_async_context(serve_agent(config, name))
            static[name] = [address]
            providers[name] = provider
        router, _app = await stack.enter_async_context(serve_router(config, static))
        yield router, providers


@pytest.fixture(autouse=True)
def _fresh_tool_log() -> None:
    orch_tools.RAN.clear()


async def converse(
    router: str, message: str, answer: types_pb2.ApprovalAnswer | None
) -> list[types_pb2.ChatEvent]:
    """One turn; each approval request is answered with ``answer`` (None: never)."""
    events: list[types_pb2.ChatEvent] = []
    async with create_channel(router) as channel:
        stream = ChatStream(router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=30))
        try:
            async for event in stream.turn(turn_request(message)):
                events.append(event)
                if event.HasField("approval_request") and answer is not None:
                    reply = types_pb2.ApprovalAnswer()
                    reply.CopyFrom(answer)
                    reply.approval_id = event.approval_request.approval_id
                    await stream.send(types_pb2.ChatRequest(approval=reply))
        finally:
            await stream.close()
            stream.cancel()
    return events


def _request(events: list[types_pb2.ChatEvent]) -> types_pb2.ChatEvent:
    (asked,) = [e for e in events if e.HasField("approval_request")]
    return asked


def _result(events: list[types_pb2.ChatEvent]) -> types_pb2.ToolResult:
    (result,) = [e.tool_result for e in events if e.HasField("tool_result")]
    return result


async def test_approved_tool_of_a_transferred_to_agent_runs() -> None:
    async with mesh_of(_mesh()) as (router, _providers):
        events = await converse(router, "refund INV-7", types_pb2.ApprovalAnswer(approved=True))
    asked = _request(events)
    request = asked.approval_request
    assert asked.agent == "payer" and request.requested_by == "payer"
    assert list(request.hop_path) == ["front", "payer"]
    assert request.call.name == "issue_refund"
    assert json_format.MessageToDict(request.call.arguments) == {"invoice_id": "INV-7"}
    assert request.timeout_ms == 30_000
    kinds = [e.WhichOneof("kind") for e in events]
    # The request reaches the client before the tool result: the turn paused.
    assert kinds.index("approval_request") < kinds.index("tool_result")
    assert orch_tools.RAN == ["INV-7"]
    assert _result(events).content == "refunded INV-7" and not _result(events).is_error
    assert events[-1].final.content == "payer: issue_refund: refunded INV-7"
    assert list(events[-1].final.hop_path) == ["front", "payer"]


async def test_denied_tool_does_not_run_and_the_model_sees_the_denial() -> None:
    async with mesh_of(_mesh()) as (router, providers):
        denied = types_pb2.ApprovalAnswer(approved=False, reason="not this month")
        events = await converse(router, "refund INV-7", denied)
    assert orch_tools.RAN == []
    result = _result(events)
    assert result.is_error and "did not approve" in result.content
    assert "not this month" in result.content
    # The denial went back to the model as the tool's result.
    tool_message = providers["payer"].requests[-1].messages[-1]
    assert tool_message.role == "tool" and "not this month" in tool_message.content
    assert "did not approve" in events[-1].final.content


async def test_no_answer_in_time_is_a_denial() -> None:
    async with mesh_of(_mesh(timeout_s=0.2)) as (router, _providers):
        events = await converse(router, "refund INV-7", None)
    assert _request(events).approval_request.timeout_ms == 200
    assert orch_tools.RAN == []
    result = _result(events)
    assert result.is_error and "no answer within 0.2s" in result.content
    assert events[-1].HasField("final")


async def _half_closed_turn(router: str, answer_first: bool) -> list[types_pb2.ChatEvent]:
    """A turn whose client half-closes (as grpcurl does at the end of its input): at
    once after the turn, or right after answering the approval request."""
    events: list[types_pb2.ChatEvent] = []
    async with create_channel(router) as channel:
        # The approval timeout is 10 minutes: waiting it out would end in DEADLINE_EXCEEDED.
        stream = ChatStream(router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=60))
        try:
            await stream.send(turn_request("refund INV-7"))
            if not answer_first:
                await stream.close()
            async for event in stream.events():
                events.append(event)
                if event.HasField("approval_request") and answer_first:
                    answer = types_pb2.ApprovalAnswer(
                        approval_id=event.approval_request.approval_id, approved=True
                    )
                    await stream.send(types_pb2.ChatRequest(approval=answer))
                    await stream.close()
        finally:
            stream.cancel()
    return events


async def test_a_client_that_half_closed_gets_a_denial_at_once() -> None:
    async with mesh_of(_mesh(timeout_s=600)) as (router, _providers):
        events = await _half_closed_turn(router, answer_first=False)
    assert _request(events).approval_request.timeout_ms == 600_000
    assert orch_tools.RAN == []
    result = _result(events)
    assert result.is_error and "closed its side of the stream" in result.content
    assert events[-1].HasField("final") and "closed its side" in events[-1].final.content


async def test_an_answer_written_just_before_the_half_close_still_counts() -> None:
    async with mesh_of(_mesh(timeout_s=600)) as (router, _providers):
        events = await _half_closed_turn(router, answer_first=True)
    assert orch_tools.RAN == ["INV-7"]
    assert _result(events).content == "refunded INV-7"


async def test_approval_inside_a_consult_reaches_the_consulted_agent() -> None:
    front = {
        **offline_agent(
            rules=[{"contains": "refund", "consult": ["payer"]}],
            after_tools="front heard: {results}",
        ),
        "handoffs": [{"target": "payer", "modes": ["consult"]}],
    }
    async with mesh_of(_mesh(front=front)) as (router, _providers):
        events = await converse(router, "refund INV-7", types_pb2.ApprovalAnswer(approved=True))
    asked = _request(events)
    assert asked.agent == "payer" and list(asked.approval_request.hop_path) == ["front", "payer"]
    assert orch_tools.RAN == ["INV-7"]
    assert events[-1].agent == "front"
    assert events[-1].final.content == "front heard: ask_payer: payer: issue_refund: refunded INV-7"


async def test_an_answer_for_an_unknown_request_changes_nothing() -> None:
    async with mesh_of(_mesh()) as (router, _providers):
        async with create_channel(router) as channel:
            stream = ChatStream(router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=30))
            try:
                events: list[types_pb2.ChatEvent] = []
                async for event in stream.turn(turn_request("refund INV-7")):
                    events.append(event)
                    if event.HasField("approval_request"):
                        stray = types_pb2.ApprovalAnswer(approval_id="nope", approved=True)
                        await stream.send(types_pb2.ChatRequest(approval=stray))
                        real = types_pb2.ApprovalAnswer(
                            approval_id=event.approval_request.approval_id, approved=False
                        )
                        await stream.send(types_pb2.ChatRequest(approval=real))
            finally:
                await stream.close()
                stream.cancel()
    assert orch_tools.RAN == [] and _result(events).is_error


async def test_the_terminal_prompt_approves_on_yes_and_denies_otherwise() -> None:
    event = types_pb2.ChatEvent(
        agent="orders",
        approval_request=types_pb2.ApprovalRequest(
            approval_id="ap1",
            call=types_pb2.ToolCall(id="c1", name="cancel_order"),
            requested_by="orders",
            hop_path=["triage", "orders"],
            timeout_ms=5000,
        ),
    )
    event.approval_request.call.arguments.update({"order_id": "A-18"})
    out = io.StringIO()
    yes = await ask_approval(event, readline=lambda: "y\n", out=out)
    assert yes.approval_id == "ap1" and yes.approved
    assert 'orders (path triage > orders) wants to run cancel_order({"order_id": "A-18"})' in (
        out.getvalue()
    )
    no = await ask_approval(event, readline=lambda: "\n", out=io.StringIO())
    assert not no.approved and no.reason == "denied at the terminal"
    eof = await ask_approval(event, readline=lambda: "", out=io.StringIO())
    assert not eof.approved


async def test_the_default_mesh_returns_to_triage_and_asks_before_cancelling() -> None:
    raw = yaml.safe_load(MESH_YAML.read_text(encoding="utf-8"))
    raw["auth"] = {"enabled": False}
    config = config_from_dict(raw, source=str(MESH_YAML))  # tools import from services/
    assert config.agents["orders"].tool_policies["cancel_order"].approval == "required"
    handoff = next(h for h in config.agents["triage"].handoffs if h.target == "orders")
    assert handoff.return_strategy == "return_to_caller"
    async with contextlib.AsyncExitStack() as stack:
        static: dict[str, list[str]] = {}
        for name in ("triage", "orders"):
            address, *_ = await stack.enter_async_context(serve_agent(config, name))
            static[name] = [address]
        router, _app = await stack.enter_async_context(serve_router(config, static))
        events = await converse(
            router, "please cancel my order", types_pb2.ApprovalAnswer(approved=True)
        )
    assert _request(events).approval_request.call.name == "cancel_order"
    assert "A-18 is cancelled" in _result(events).content
    final = events[-1]
    assert final.agent == "triage" and list(final.final.hop_path) == ["triage", "orders", "triage"]
    assert final.final.content == "Triage again: orders has answered. Anything else?"


async def test_grpcurl_answers_an_approval_on_the_same_stream() -> None:
    """A grpcurl user types the approval JSON into the open Chat stream."""
    async with mesh_of(_mesh()) as (router, _providers):
        proc = await asyncio.create_subprocess_exec(
            tool_path("grpcurl"),
            "-plaintext",
            "-max-time",
            "30",
            "-d",
            "@",
            router,
            "mesh.v1.RouterService/Chat",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"turn": {"conversation_id": "g1", "message": "refund INV-7"}}\n')
        await proc.stdin.drain()
        seen = ""
        decoder = json.JSONDecoder()
        events: list[dict[str, Any]] = []
        while not any("approval_request" in e for e in events):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "grpcurl ended before the approval request"
            seen += line.decode()
            with contextlib.suppress(ValueError):
                event, _end = decoder.raw_decode(seen.strip())
                events.append(event)
                seen = ""
        approval_id = events[-1]["approval_request"]["approval_id"]
        answer = {"approval": {"approval_id": approval_id, "approved": True}}
        proc.stdin.write(json.dumps(answer).encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        rest, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    tail = rest.decode()
    assert '"content": "refunded INV-7"' in tail
    assert '"content": "payer: issue_refund: refunded INV-7"' in tail
    assert orch_tools.RAN == ["INV-7"]
