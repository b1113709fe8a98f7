"""Spans for turns, hops, model calls and tool calls (GenAI semantic conventions).

Span names and attributes follow the OpenTelemetry GenAI conventions
(``invoke_agent {gen_ai.agent.name}``, ``chat {gen_ai.request.model}``,
``execute_tool {gen_ai.tool.name}``) and the RPC conventions for the router's turn
span (``mesh.v1.RouterService/Chat``, ``rpc.system.name`` ``grpc``). The mesh adds
``mesh.*`` attributes: hop path, handoff mode/source/target, hops remaining,
request id, replica address, store latency.

Every helper here is called only when :data:`state.tracing` is true; callers keep
``None`` for a span otherwise, so the hot path builds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mesh.errors import MeshError
from mesh.telemetry._setup import state

#: GenAI provider names for the mesh's provider kinds (others are passed as they are).
PROVIDER_NAMES = {
    "openai": "openai",
    "azure_openai": "azure.ai.openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "claude_cli": "anthropic",
}

_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    global _tracer
    if _tracer is None:
        from mesh.version import __version__

        _tracer = trace.get_tracer("mesh", __version__)
    return _tracer


def provider_name(kind: str) -> str:
    return PROVIDER_NAMES.get(kind, kind)


def extract(carrier: Mapping[str, str]) -> Context:
    """The context a W3C carrier (traceparent, tracestate, baggage) describes."""
    return propagate.extract(dict(carrier))


def carrier(span: Span, incoming: Mapping[str, str] | None = None) -> dict[str, str]:
    """``span``'s W3C headers for the next hop; ``incoming``'s baggage passes through."""
    ctx = span.get_span_context()
    out = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        out["tracestate"] = ctx.trace_state.to_header()
    if incoming and (baggage := incoming.get("baggage")):
        out["baggage"] = baggage
    return out


def ids(span: Span | None = None) -> tuple[str, str]:
    """(trace id, span id) of ``span`` (the current one by default) as hex, or ("", "")."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def fail(span: Span, err: BaseException) -> None:
    """Mark ``span`` failed the way the mesh's error table says (status, reason)."""
    if isinstance(err, MeshError):
        span.set_status(Status(StatusCode.ERROR, err.message))
        span.set_attribute("error.type", err.reason or err.code.name)
        span.set_attribute("rpc.response.status_code", err.code.name)
        span.add_event(
            "mesh.error",
            {"mesh.error.reason": err.reason or "", "rpc.response.status_code": err.code.name},
        )
    elif isinstance(err, asyncio.CancelledError):
        span.set_attribute("error.type", "cancelled")
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
    else:
        span.set_status(Status(StatusCode.ERROR, type(err).__name__))
        span.set_attribute("error.type", type(err).__qualname__)
        span.record_exception(err)


@contextlib.contextmanager
def scope(span: Span | None) -> Iterator[Span | None]:
    """Make ``span`` current for the block, mark it failed on an error, end it."""
    if span is None:
        yield None
        return
    token = trace.use_span(span, end_on_exit=False)
    token.__enter__()
    try:
        yield span
    except BaseException as err:
        fail(span, err)
        raise
    finally:
        token.__exit__(None, None, None)
        span.end()


# -- the router ----------------------------------------------------------------------------


def router_turn_span(
    incoming: Mapping[str, str], conversation_id: str, request_id: str, target: str
) -> Span:
    """The router's span for one turn, continuing the client's trace."""
    return tracer().start_span(
        "mesh.v1.RouterService/Chat",
        context=extract(incoming),
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system.name": "grpc",
            "rpc.method": "mesh.v1.RouterService/Chat",
            "gen_ai.conversation.id": conversation_id,
            "mesh.request_id": request_id,
            "mesh.route.target": target,
        },
    )


def hop_span(
    agent: str,
    conversation_id: str,
    hop_path: Sequence[str],
    hops_remaining: int,
    mode: str,
    source: str,
) -> Span:
    """The router's client span for one agent's part of a turn (child of the current)."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.conversation.id": conversation_id,
        "rpc.system.name": "grpc",
        "rpc.method": "mesh.v1.AgentService/Chat",
        "mesh.hop_path": list(hop_path),
        "mesh.hops_remaining": hops_remaining,
    }
    if mode:
        attributes["mesh.handoff.mode"] = mode
        attributes["mesh.handoff.source"] = source
    return tracer().start_span(f"invoke_agent {agent}", kind=SpanKind.CLIENT, attributes=attributes)


def replica(span: Span, address: str) -> None:
    host, _, port = address.rpartition(":")
    span.set_attribute("server.address", host.strip("[]"))
    if port.isdigit():
        span.set_attribute("server.port", int(port))


def handoff_event(span: Span, mode: str, source: str, target: str) -> None:
    span.add_event(
        "mesh.handoff",
        {"mesh.handoff.mode": mode, "mesh.handoff.source": source, "mesh.handoff.target": target},
    )


# -- the agent -----------------------------------------------------------------------------


def agent_span(
    parent: Mapping[str, str],
    agent: str,
    provider_kind: str,
    model: str,
    conversation_id: str,
    hop_path: Sequence[str],
    *,
    mode: str | None = None,
    source: str = "",
    hops_remaining: int | None = None,
    request_id: str = "",
    message: str = "",
) -> Span:
    """The agent's server span for one turn, child of the router's hop span."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.provider.name": provider_name(provider_kind),
        "gen_ai.request.model": model,
        "gen_ai.conversation.id": conversation_id,
        "rpc.system.name": "grpc",
        "mesh.hop_path": list(hop_path),
    }
    if request_id:
        attributes["mesh.request_id"] = request_id
    if mode:
        attributes["mesh.handoff.mode"] = mode
        attributes["mesh.handoff.source"] = source
    if hops_remaining is not None:
        attributes["mesh.hops_remaining"] = hops_remaining
    if state.capture_content and message:
        attributes["gen_ai.input.messages"] = _messages("user", message)
    return tracer().start_span(
        f"invoke_agent {agent}",
        context=extract(parent),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )


def usage(span: Span, input_tokens: int, output_tokens: int) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)


def output(span: Span, content: str) -> None:
    """The final answer, only when content capture is turned on."""
    if state.capture_content and content:
        span.set_attribute("gen_ai.output.messages", _messages("assistant", content))


def _messages(role: str, content: str) -> str:
    import json

    return json.dumps([{"role": role, "parts": [{"type": "text", "content": content}]}])


def chat_span(agent: str, provider_kind: str, model: str, conversation_id: str) -> Span:
    """A model call (child of the current span)."""
    return tracer().start_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name(provider_kind),
            "gen_ai.request.model": model,
            "gen_ai.agent.name": agent,
            "gen_ai.conversation.id": conversation_id,
        },
    )


def tool_span(name: str, call_id: str, description: str = "") -> Span:
    """A tool call (child of the current span)."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
    }
    if description:
        attributes["gen_ai.tool.description"] = description
    return tracer().start_span(
        f"execute_tool {name}", kind=SpanKind.INTERNAL, attributes=attributes
    )


def current() -> Span:
    """The current span (a non-recording one when there is none)."""
    return trace.get_current_span()
