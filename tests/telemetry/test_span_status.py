"""Span status from the error table, and W3C context passed on intact (in-process servers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh import telemetry
from mesh.client import AgentClient, create_channel
from mesh.context import current_trace_context
from mesh.providers.base import ModelEvent, ModelRequest
from tests.meshtest import RecordingProvider, mesh_config, offline_agent, serve_router

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory (no exporter thread)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE._done = False
    trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    telemetry.state.tracing = True
    try:
        yield _EXPORTER
    finally:
        telemetry.state.tracing = False


class TraceRecorder(RecordingProvider):
    seen: list[dict[str, str]]

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        if not hasattr(self, "seen"):
            self.seen = []
        self.seen.append(dict(current_trace_context.get({})))
        async for event in super().stream(request):
            yield event


@contextlib.asynccontextmanager
async def _agent(config: Any, name: str) -> AsyncIterator[tuple[str, TraceRecorder]]:
    from mesh.agent._serve import build_agent_server, build_runtime

    recorder = TraceRecorder(build_runtime(config, name).provider)
    server, _runtime = build_agent_server(config, name, provider=recorder)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        await server.stop(0)


async def test_hop_budget_refusal_is_the_turn_spans_status(spans: InMemorySpanExporter) -> None:
    front = offline_agent(rules=[{"contains": "go", "handoff": "back", "reason": "r"}])
    front["handoffs"] = [{"target": "back", "modes": ["transfer"]}]
    front["limits"] = {"max_hops": 0}
    config = mesh_config(
        {"front": front, "back": offline_agent()}, router={"default_agent": "front"}
    )
    trace_id = "7" * 32
    async with contextlib.AsyncExitStack() as stack:
        front_at, front_rec = await stack.enter_async_context(_agent(config, "front"))
        back_at, _ = await stack.enter_async_context(_agent(config, "back"))
        router, _app = await stack.enter_async_context(
            serve_router(config, {"front": [front_at], "back": [back_at]})
        )
        async with create_channel(router) as channel:
            result = await AgentClient(channel, router=True).chat(
                "go",
                metadata=[
                    ("traceparent", f"00-{trace_id}-{'8' * 16}-01"),
                    ("tracestate", "vendor=abc"),
                    ("baggage", "tenant=acme"),
                ],
            )
    assert result.events[-1].error.reason == "HOP_BUDGET_EXCEEDED"
    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {trace_id}
    (turn,) = [s for s in finished if s.name == "mesh.v1.RouterService/Chat"]
    assert turn.status.status_code == StatusCode.ERROR
    assert turn.attributes is not None
    assert turn.attributes["error.type"] == "HOP_BUDGET_EXCEEDED"
    assert turn.attributes["rpc.response.status_code"] == "FAILED_PRECONDITION"
    assert [e.name for e in turn.events] == ["mesh.error"]
    (hop,) = [s for s in finished if s.name == "invoke_agent front" and s.kind.name == "CLIENT"]
    assert hop.status.status_code == StatusCode.ERROR
    # The agent got the router's span as parent, with the client's tracestate and baggage.
    (seen,) = front_rec.seen
    assert seen["tracestate"] == "vendor=abc" and seen["baggage"] == "tenant=acme"
    (agent,) = [s for s in finished if s.name == "invoke_agent front" and s.kind.name == "SERVER"]
    assert agent.parent is not None and agent.parent.span_id == hop.context.span_id
    assert seen["traceparent"] == f"00-{trace_id}-{agent.context.span_id:016x}-01"
