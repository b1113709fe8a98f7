"""The thin gRPC adapter over :class:`~mesh.agent.AgentRuntime`.

It converts wire messages to runtime inputs and runtime events to wire events,
maps errors through :mod:`mesh.errors`, and owns the stream mechanics: a reader
task takes follow-up turns, CONSULT answers and cancels off the request stream
while the current turn's events flow out; an idle stream is closed; a client
cancel or an expired deadline cancels the turn (and so the model call and tools).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from mesh import telemetry
from mesh.agent._approval import approval_key
from mesh.agent._runtime import (
    AgentRuntime,
    ConsultAnswer,
    ConsultBroker,
    ErrorInfo,
    Final,
    RuntimeEvent,
    TurnInput,
)
from mesh.context import (
    check_conversation_id,
    current_conversation_id,
    current_hop_path,
    current_principal,
    current_request_id,
    current_trace_context,
)
from mesh.convert import MODE_FROM_PB, MODE_TO_PB, event_to_pb, history_from_pb, to_struct
from mesh.errors import (
    DeadlineExceeded,
    HistoryNotKept,
    InvalidArgument,
    MeshError,
)
from mesh.kept import HEADER, HEADER_VALUE, KeptHistories
from mesh.kept import resolve as resolve_kept
from mesh.lifecycle import Lifecycle
from mesh.providers.base import ChatMessage
from mesh.streams import Emitter, TurnEnd, TurnStream, abort_with, serve_stream
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("mesh.agent")

Req = TypeVar("Req", agent_pb2.HandoffRequest, types_pb2.ChatRequest)

_RETURN_PB: dict[str, types_pb2.ReturnStrategy.ValueType] = {
    "bubble_up": types_pb2.RETURN_STRATEGY_BUBBLE_UP,
    "return_to_caller": types_pb2.RETURN_STRATEGY_RETURN_TO_CALLER,
    "continue_chain": types_pb2.RETURN_STRATEGY_CONTINUE_CHAIN,
    "end_conversation": types_pb2.RETURN_STRATEGY_END_CONVERSATION,
}

__all__ = ["AgentServicer", "abort_with", "agent_info", "parse_chat_turn", "parse_handoff"]


def _hop(hop: types_pb2.HopContext, fallback: tuple[str, ...]) -> dict[str, Any]:
    """TurnInput fields from a request's per-turn hop context (metadata as fallback)."""
    return {
        "hop_path": tuple(hop.hop_path) or fallback,
        "request_id": hop.request_id,
        "trace_context": dict(hop.trace_context),
        "timeout_s": hop.timeout_ms / 1000 if hop.timeout_ms else None,
    }


def _kept_history(
    body: types_pb2.Turn | types_pb2.HandoffTurn, kept: KeptHistories | None, field: str
) -> tuple[ChatMessage, ...]:
    """A request's whole history: the kept messages ``body.kept`` names (``kept``: the
    stream's record, None where nothing is kept), then ``body.history``; recorded as
    the conversation's newest."""
    history = history_from_pb(body.history)
    conversation = body.conversation_id
    if body.HasField("kept"):
        start = None
        if kept is not None and conversation:
            start = resolve_kept(kept.get(conversation), body.kept.skip, body.kept.count)
        if start is None:
            raise HistoryNotKept(
                f"{field} names {body.kept.count} messages from {body.kept.skip} of "
                "conversation history this stream does not keep; send the whole history",
                field=field,
            )
        history = start + history
    if kept is not None and conversation:
        kept.put(conversation, history)
    return history


def parse_chat_turn(request: types_pb2.ChatRequest, kept: KeptHistories | None = None) -> TurnInput:
    """The turn a Chat request carries; ``kept``: the stream's kept histories, which
    resolve ``turn.kept`` and then record this turn's whole history."""
    turn = request.turn
    if not turn.message.strip():
        raise InvalidArgument("turn.message is required: the user's message", field="turn.message")
    check_conversation_id(turn.conversation_id, "turn.conversation_id")
    hop = _hop(turn.hop, current_hop_path.get())
    hops = turn.hop.hops_remaining if turn.HasField("hop") else None
    return TurnInput(
        conversation_id=turn.conversation_id or uuid.uuid4().hex,
        message=turn.message,
        history=_kept_history(turn, kept, "turn.kept"),
        context=dict(turn.context),
        turn_id=turn.turn_id or uuid.uuid4().hex[:12],
        hops_remaining=hops,
        **hop,
    )


def parse_handoff_turn(
    handoff: types_pb2.HandoffTurn, kept: KeptHistories | None = None
) -> TurnInput:
    """The handoff a request carries; ``kept`` as for :func:`parse_chat_turn` (None on
    an ``AgentService.Handoff`` stream, which keeps nothing)."""
    if not handoff.message.strip():
        raise InvalidArgument(
            "handoff.message is required: what the target should answer", field="handoff.message"
        )
    check_conversation_id(handoff.conversation_id, "handoff.conversation_id")
    mode = MODE_FROM_PB.get(int(handoff.mode))
    if mode is None or mode == "end_conversation":
        raise InvalidArgument("handoff.mode must be TRANSFER or CONSULT", field="handoff.mode")
    if not handoff.source_agent:
        raise InvalidArgument("handoff.source_agent is required", field="handoff.source_agent")
    return TurnInput(
        conversation_id=handoff.conversation_id or uuid.uuid4().hex,
        message=handoff.message,
        history=_kept_history(handoff, kept, "handoff.kept"),
        context=dict(handoff.context),
        turn_id=handoff.turn_id or uuid.uuid4().hex[:12],
        hop_path=tuple(handoff.hop_path) or current_hop_path.get(),
        request_id=handoff.hop.request_id,
        trace_context=dict(handoff.hop.trace_context),
        timeout_s=handoff.hop.timeout_ms / 1000 if handoff.hop.timeout_ms else None,
        source_agent=handoff.source_agent,
        mode=mode,
        reason=handoff.reason,
        hops_remaining=handoff.hops_remaining,
    )


def parse_handoff(request: agent_pb2.HandoffRequest) -> TurnInput:
    return parse_handoff_turn(request.handoff)


def _within_budget(turn: TurnInput) -> TurnInput:
    """Refuse a turn that asks for more handoffs than the caller's token grants (its
    ``mesh_hops`` claim), so a bypassed router cannot buy a longer chain; a turn that
    asks for none gets what the token grants, never an unlimited budget."""
    principal = current_principal.get()
    if principal is not None and principal.hops_remaining is not None:
        from mesh.auth.policy import check_hop_budget

        if turn.hops_remaining is None:  # a turn that names no budget gets the token's
            return dataclasses.replace(turn, hops_remaining=principal.hops_remaining)
        check_hop_budget(principal.hops_remaining, turn.hops_remaining)
    return turn


class _AgentStream(TurnStream[Req, TurnInput]):
    """One Chat or Handoff call at an agent."""

    def __init__(
        self,
        runtime: AgentRuntime,
        context: grpc.aio.ServicerContext[Any, Any],
        lifecycle: Lifecycle,
        idle_timeout: float,
        opening: str,
    ) -> None:
        super().__init__(lifecycle, idle_timeout, runtime.mesh.server.max_message_bytes)
        self.runtime = runtime
        self.context = context
        self.opening = opening
        self.one_turn = opening == "handoff"
        self.broker = ConsultBroker()
        self.kept = KeptHistories(runtime.mesh.server.max_message_bytes)
        """The histories this stream keeps (``mesh.kept``), for its turns and handoffs."""

    def accept(self, request: Req, first: bool) -> TurnInput | None:
        kind = request.WhichOneof("kind")
        if kind == "consult_result":
            if first:
                raise InvalidArgument(
                    f"the first request must carry `{self.opening}`", field=self.opening
                )
            answer = request.consult_result
            if not self.broker.resolve(
                answer.call_id, ConsultAnswer(answer.content, answer.is_error, answer.agent)
            ):
                log.info("consult answer for unknown call %r ignored", answer.call_id[:64])
            return None
        if kind == "approval":
            if first:
                raise InvalidArgument(
                    f"the first request must carry `{self.opening}`", field=self.opening
                )
            approval = request.approval
            verdict = ConsultAnswer(approval.reason, not approval.approved)
            if not self.broker.resolve(approval_key(approval.approval_id), verdict):
                log.info(
                    "approval answer for unknown request %r ignored", approval.approval_id[:64]
                )
            return None
        if kind == "cancel":
            if first:
                raise InvalidArgument(
                    f"the first request must carry `{self.opening}`", field=self.opening
                )
            self.cancel_turn()
            return None
        if self.opening == "handoff":
            if not first or kind != "handoff":
                raise InvalidArgument(
                    "a Handoff stream opens with `handoff`, then carries `consult_result` or "
                    "`cancel`",
                    field="kind",
                )
            assert isinstance(request, agent_pb2.HandoffRequest)
            return _within_budget(parse_handoff(request))
        assert isinstance(request, types_pb2.ChatRequest)
        if kind == "turn":
            return _within_budget(parse_chat_turn(request, self.kept))
        if kind == "handoff":
            return _within_budget(parse_handoff_turn(request.handoff, self.kept))
        raise InvalidArgument("the request carries no `turn`", field="turn")

    async def produce(self, turn: TurnInput, emitter: Emitter) -> TurnEnd:
        timeout = self.runtime.config.limits.turn_timeout_s
        remaining = self.context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        if turn.timeout_s is not None:
            timeout = min(timeout, turn.timeout_s)
        current_hop_path.set(turn.hop_path)
        if turn.request_id:
            current_request_id.set(turn.request_id)
        if turn.trace_context:
            current_trace_context.set(dict(turn.trace_context))
        if turn.conversation_id:
            current_conversation_id.set(turn.conversation_id)
        span = self._span(turn) if telemetry.state.tracing else None
        started = time.perf_counter()
        outcome = "error"
        try:
            with telemetry.tracing.scope(span):
                log.debug(
                    "turn %s of %s at %s", turn.turn_id, turn.conversation_id, self.runtime.name
                )
                async with asyncio.timeout(timeout):
                    async for event in self.runtime.run_turn(turn, self.broker):
                        emitter.emit(event)
                        if span is not None and isinstance(event, Final):
                            telemetry.tracing.usage(span, event.input_tokens, event.output_tokens)
                            telemetry.tracing.output(span, event.content)
            outcome = "ok"
        except TimeoutError:
            outcome = "DEADLINE_EXCEEDED"
            raise DeadlineExceeded(f"turn did not finish within {timeout:.3g}s") from None
        except MeshError as err:
            outcome = err.reason or err.code.name
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            name = self.runtime.name
            telemetry.metrics.turns.labels("agent", name, outcome).inc()
            telemetry.metrics.turn_duration.labels("agent", name).observe(
                time.perf_counter() - started
            )
        return TurnEnd()

    def _span(self, turn: TurnInput) -> Any:
        """This turn's span at the agent; its context is the one the next hop gets."""
        runtime = self.runtime
        parent = turn.trace_context or current_trace_context.get({})
        span = telemetry.tracing.agent_span(
            parent,
            runtime.name,
            runtime.provider.kind,
            runtime.provider.model,
            turn.conversation_id,
            turn.hop_path,
            mode=turn.mode,
            source=turn.source_agent,
            hops_remaining=turn.hops_remaining,
            request_id=turn.request_id,
            message=turn.message,
        )
        current_trace_context.set(telemetry.tracing.carrier(span, parent))
        return span

    def cancelled(self, turn: TurnInput) -> RuntimeEvent:
        return Final("", 0, 0, "cancelled")

    def failed(self, turn: TurnInput, err: MeshError) -> RuntimeEvent:
        return ErrorInfo(err.code.name, err.message, err.reason)

    def stamp(self, event: RuntimeEvent, turn: TurnInput) -> types_pb2.ChatEvent:
        self.seq += 1
        out = event_to_pb(event)
        out.agent = self.runtime.name
        out.seq = self.seq
        out.conversation_id = turn.conversation_id
        out.turn_id = turn.turn_id
        if isinstance(event, Final):
            out.final.hop_path.extend([*turn.hop_path, self.runtime.name])
        return out


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """``mesh.v1.AgentService`` over one :class:`AgentRuntime`."""

    def __init__(
        self, runtime: AgentRuntime, lifecycle: Lifecycle, *, idle_timeout: float = 300.0
    ) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout

    def _stream(self, context: grpc.aio.ServicerContext[Any, Any], opening: str) -> Any:
        return _AgentStream(self.runtime, context, self.lifecycle, self.idle_timeout, opening)

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def Chat(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[types_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        await context.send_initial_metadata(((HEADER, HEADER_VALUE),))
        async for event in serve_stream(self._stream(context, "turn"), request_iterator, context):
            yield event

    async def Handoff(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[agent_pb2.HandoffRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        stream = self._stream(context, "handoff")
        async for event in serve_stream(stream, request_iterator, context):
            yield event

    async def Info(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InfoResponse:
        return agent_pb2.InfoResponse(info=agent_info(self.runtime))


def agent_info(runtime: AgentRuntime) -> types_pb2.AgentInfo:
    config = runtime.config
    modes: dict[str, list[types_pb2.HandoffMode.ValueType]] = {}
    for handoff in config.handoffs:
        modes[handoff.target] = [MODE_TO_PB[m] for m in handoff.modes]
    return types_pb2.AgentInfo(
        name=config.name,
        description=config.description,
        skills=[types_pb2.Skill(name=s.name, description=s.description) for s in config.skills],
        model=types_pb2.ModelInfo(provider=runtime.provider.kind, model=runtime.provider.model),
        handoff_targets=[
            types_pb2.HandoffTarget(
                agent=h.target,
                modes=modes[h.target],
                description=h.description,
                return_strategy=_RETURN_PB[h.return_strategy],
            )
            for h in config.handoffs
        ],
        limits=types_pb2.Limits(
            max_hops=runtime.mesh.max_hops_for(config.name),
            max_tool_rounds=config.limits.max_tool_rounds,
            max_message_bytes=runtime.mesh.server.max_message_bytes,
            turn_timeout_seconds=config.limits.turn_timeout_s,
        ),
        version=runtime.version,
        tools=[
            types_pb2.ToolInfo(
                name=t.name, description=t.description, parameters=to_struct(t.parameters)
            )
            for t in runtime.tools.values()
        ],
        required_scopes=config.required_scopes,
    )
