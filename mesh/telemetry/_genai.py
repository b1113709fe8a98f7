"""GenAI telemetry of one agent's model calls and tool calls (spans and metrics)."""

from __future__ import annotations

import sys
import time
from typing import Any

from mesh.context import current_trace_context
from mesh.providers.base import Provider, ToolCallRequest
from mesh.telemetry import _metrics as metrics
from mesh.telemetry import _trace as tracing
from mesh.telemetry._setup import state
from mesh.tools import Tool, ToolExecutor, ToolOutcome


class ModelCall:
    """Telemetry of one model call: a ``chat`` span (when tracing), duration and tokens."""

    __slots__ = ("agent", "error", "model", "provider", "span", "started")

    def __init__(self, agent: str, provider: Provider, conversation_id: str) -> None:
        self.agent = agent
        self.provider = tracing.provider_name(provider.kind)
        self.model = provider.model
        self.started = time.perf_counter()
        self.error = ""
        self.span: Any = None
        if state.tracing:
            self.span = tracing.chat_span(agent, provider.kind, self.model, conversation_id)

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        for kind, count in (("input", input_tokens), ("output", output_tokens)):
            metrics.token_usage.labels("chat", self.provider, self.model, kind, self.agent).observe(
                count
            )
            metrics.model_tokens.labels(self.agent, self.model, kind).inc(count)
        if self.span is not None:
            tracing.usage(self.span, input_tokens, output_tokens)

    def failed(self, err: BaseException) -> None:
        self.error = getattr(err, "reason", "") or type(err).__name__
        if self.span is not None:
            tracing.fail(self.span, err)

    def end(self) -> None:
        """Call in a ``finally``: an exception in flight marks the call failed."""
        err = sys.exc_info()[1]
        if err is not None:
            self.failed(err)
        metrics.operation_duration.labels("chat", self.provider, self.model, self.error).observe(
            time.perf_counter() - self.started
        )
        if self.span is not None:
            self.span.end()


async def traced_tool(
    executor: ToolExecutor, tool: Tool, call: ToolCallRequest, timeout: float
) -> ToolOutcome:
    """Run one tool call, with an ``execute_tool`` span when tracing."""
    started = time.perf_counter()
    if not state.tracing:
        outcome = await executor.run(tool, call.arguments, timeout)
    else:
        span = tracing.tool_span(tool.name, call.id, tool.description)
        incoming = current_trace_context.get({})
        current_trace_context.set(tracing.carrier(span, incoming))  # a tool calling the mesh
        with tracing.scope(span):
            outcome = await executor.run(tool, call.arguments, timeout)
            if outcome.is_error:
                span.set_attribute("error.type", "tool_error")
    metrics.tool_duration.labels(tool.name, "tool_error" if outcome.is_error else "").observe(
        time.perf_counter() - started
    )
    return outcome
