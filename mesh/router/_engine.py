"""The router's turn engine: runs one turn across agents through the agent-stream port.

One turn: the routing core picks the agent (or sequence); the engine hands it the
history and relays its events. A TRANSFER moves the turn to the target; a CONSULT
runs the target concurrently and writes its answer back into the caller's open
stream; a sequence runs its steps in order. What happens once a TRANSFER's target
has answered is the target's return strategy (:func:`mesh.router._returns.follow`). Every
handoff, and every return of control, is checked by the core before anything is
forwarded. The finished turn is stored before its final event
is sent, so an acknowledged turn survives a router restart.

Events the router only forwards (text deltas, tool calls and results) are relayed
as the agent serialized them; only finals, handoffs, errors and approval requests
are parsed. An approval request remembers the agent stream that asked, so the
client's answer on its Chat stream goes back to exactly that stream (the agent may
be a TRANSFER's target or a CONSULT's, several hops from the client).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from mesh import telemetry
from mesh.convert import MODE_FROM_PB
from mesh.errors import MeshError, Unavailable
from mesh.providers.base import ChatMessage
from mesh.router._core import Plan, RoutingCore
from mesh.router._port import AgentCall, AgentStreams, HopCall
from mesh.router._requests import chat_turn, handoff_turn
from mesh.router._returns import follow
from mesh.router._routing import BestMatch
from mesh.router._store import ConversationStore
from mesh.router._turn import Outcome, TurnState
from mesh.router._wire import (
    KIND_APPROVAL,
    KIND_DELTA,
    KIND_ERROR,
    KIND_FINAL,
    KIND_HANDOFF,
    peek_kind,
)
from mesh.v1 import types_pb2

TRANSFER = types_pb2.HANDOFF_MODE_TRANSFER
CONSULT = types_pb2.HANDOFF_MODE_CONSULT
END = types_pb2.HANDOFF_MODE_END_CONVERSATION

STRATEGY_PB: dict[str, types_pb2.ReturnStrategy.ValueType] = {
    "bubble_up": types_pb2.RETURN_STRATEGY_BUBBLE_UP,
    "return_to_caller": types_pb2.RETURN_STRATEGY_RETURN_TO_CALLER,
    "continue_chain": types_pb2.RETURN_STRATEGY_CONTINUE_CHAIN,
    "end_conversation": types_pb2.RETURN_STRATEGY_END_CONVERSATION,
}

TokenFor = Callable[[str, str | None, str | None, int], Awaitable[str | None]]
"""(agent, the caller's token, the token the handing agent held or None, hops used so far)
-> the bearer for that agent."""


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _unwrap(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


class Router:
    def __init__(
        self,
        core: RoutingCore,
        streams: AgentStreams,
        store: ConversationStore,
        *,
        token_for: TokenFor | None = None,
        infos: Callable[[], Mapping[str, types_pb2.AgentInfo]] | None = None,
        best_match: BestMatch | None = None,
    ) -> None:
        self.core = core
        self.streams = streams
        self.store = store
        self.store_kind = type(store).__name__.removesuffix("Store").lower() or "store"
        self.token_for = token_for
        if best_match is None and core.model_routing:
            best_match = BestMatch.for_config(core.config, infos or dict)
        self.best_match = best_match

    # -- routing -----------------------------------------------------------------------

    async def choose(
        self,
        state: TurnState,
        named: str,
        metadata: Mapping[str, str],
        active: str,
    ) -> str:
        """The agent or sequence the turn goes to; a routing model's choice is emitted."""
        core = self.core
        chosen = core.choose_by_rules(named, state.message, state.context, metadata, active)
        if chosen is not None or self.best_match is None:
            return chosen or core.default()
        decision = await self.best_match.decide(
            state.message, core.candidates(), core.default(), state.remaining()
        )
        state.input_tokens += decision.input_tokens
        state.output_tokens += decision.output_tokens
        state.emit(types_pb2.ChatEvent(agent="router", routing=decision.to_pb()))
        return decision.agent

    # -- approvals ---------------------------------------------------------------------

    async def answer_approval(self, state: TurnState, answer: types_pb2.ApprovalAnswer) -> bool:
        """Pass a client's approval answer to the agent stream that asked; False if none."""
        call = state.approvals.pop(answer.approval_id, None)
        if call is None:
            return False
        await call.send(types_pb2.ChatRequest(approval=answer))
        return True

    async def deny_unanswerable(self, state: TurnState) -> None:
        """The client half-closed: deny the approvals it can no longer answer, now and
        for the rest of the turn (instead of each waiting out its timeout)."""
        state.answerable = False
        for approval_id in list(state.approvals):
            await self.answer_approval(state, _unanswerable(approval_id))

    # -- requests to agents ------------------------------------------------------------

    def _chat_turn(self, state: TurnState, agent: str) -> types_pb2.ChatRequest:
        return chat_turn(state, self.core.hops_remaining(agent, state.budget))

    def _handoff_turn(
        self,
        state: TurnState,
        source: str,
        target: str,
        mode: types_pb2.HandoffMode.ValueType,
        reason: str,
        message: str,
        context: dict[str, str],
    ) -> types_pb2.ChatRequest:
        hops = self.core.hops_remaining(target, state.budget)
        return handoff_turn(state, source, mode, reason, message, context, hops)

    async def _open(
        self,
        state: TurnState,
        agent: str,
        request: types_pb2.ChatRequest,
        history: Sequence[ChatMessage],
        source: str,
    ) -> tuple[AgentCall, bytes]:
        token = None
        if self.token_for is not None:
            previous = state.tokens.get(source) if source else None
            token = await self.token_for(agent, state.subject_token, previous, state.budget.hops)
            if token is not None:
                state.tokens[agent] = token
        traceparent = _hop_of(request).trace_context.get("traceparent", "")
        hop = HopCall(token, state.request_id, traceparent, state.remaining(), history)
        return await self.streams.open(agent, request, hop)

    # -- one agent's part of the turn ----------------------------------------------------

    async def _run_agent(
        self,
        state: TurnState,
        agent: str,
        request: types_pb2.ChatRequest,
        history: Sequence[ChatMessage],
        stack: list[str],
        source: str = "",
    ) -> Outcome:
        """Relay one agent's events until its final; runs its CONSULTs concurrently.
        ``history``: the conversation as this agent gets it (the stream fills it in)."""
        if not telemetry.state.tracing:
            return await self._relay(state, agent, request, history, stack, source)
        hop = _hop_of(request)
        mode = ""
        if request.HasField("handoff"):
            mode = MODE_FROM_PB.get(int(request.handoff.mode), "") or ""
        span = telemetry.tracing.hop_span(
            agent, state.conversation_id, hop.hop_path, hop.hops_remaining, mode, source
        )
        carrier = telemetry.tracing.carrier(span, state.trace_context)
        hop.trace_context.clear()
        hop.trace_context.update(carrier)
        with telemetry.tracing.scope(span):
            return await self._relay(state, agent, request, history, stack, source)

    async def _relay(
        self,
        state: TurnState,
        agent: str,
        request: types_pb2.ChatRequest,
        history: Sequence[ChatMessage],
        stack: list[str],
        source: str,
    ) -> Outcome:
        call, data = await self._open(state, agent, request, history, source)
        if telemetry.state.tracing:
            telemetry.tracing.replica(telemetry.tracing.current(), call.address)
        outcome = Outcome(agent)
        reusable = False
        flowed = False
        try:
            async with asyncio.TaskGroup() as consults:
                while True:
                    kind = peek_kind(data)
                    if kind == KIND_FINAL:
                        final = types_pb2.ChatEvent.FromString(data).final
                        outcome.final = final
                        state.input_tokens += final.usage.input_tokens
                        state.output_tokens += final.usage.output_tokens
                        reusable = True  # the agent waits for the next turn on this stream
                        break
                    if kind == KIND_HANDOFF:
                        event = types_pb2.ChatEvent.FromString(data)
                        self._handoff(state, agent, event, outcome, call, stack, consults)
                    elif kind == KIND_APPROVAL:
                        asked = types_pb2.ChatEvent.FromString(data).approval_request
                        state.emit(data)
                        if state.answerable:
                            state.approvals[asked.approval_id] = call
                        else:
                            await call.send(
                                types_pb2.ChatRequest(approval=_unanswerable(asked.approval_id))
                            )
                    elif kind != KIND_ERROR:  # the status that follows says it once
                        state.emit(data)
                        if kind == KIND_DELTA and not state.first_delta:
                            state.first_delta = True
                            telemetry.metrics.time_to_first_delta.labels("router", agent).observe(
                                time.perf_counter() - state.started
                            )
                    flowed = True
                    next_data = await self._read(call, agent, flowed)
                    if next_data is None:
                        break
                    data = next_data
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            for approval_id in [k for k, v in state.approvals.items() if v is call]:
                del state.approvals[approval_id]
            call.finish(reusable)
        if outcome.final is None:
            raise Unavailable(f"agent {agent} ended its stream without a final event")
        return outcome

    def _handoff(
        self,
        state: TurnState,
        agent: str,
        event: types_pb2.ChatEvent,
        outcome: Outcome,
        call: AgentCall,
        stack: list[str],
        consults: asyncio.TaskGroup,
    ) -> None:
        handoff = event.handoff
        if handoff.mode == CONSULT:
            inner = [*stack, agent]
            self.core.take_handoff(state.budget, agent, handoff.target, inner)
            state.emit(event)
            consults.create_task(self._consult(state, agent, handoff, call, inner))
        elif handoff.mode == TRANSFER:
            self.core.check_handoff(state.budget, agent, handoff.target, None)
            outcome.transfer = handoff
            handoff.return_strategy = STRATEGY_PB[self.core.return_strategy(agent, handoff.target)]
            state.emit(event)
        elif handoff.mode == END:
            outcome.ended = True
            state.emit(event)
        mode = MODE_FROM_PB.get(int(handoff.mode), "") or ""
        telemetry.metrics.handoffs.labels(mode, agent, handoff.target).inc()
        if telemetry.state.tracing:
            span = telemetry.tracing.current()
            telemetry.tracing.handoff_event(span, mode, agent, handoff.target)

    async def _read(self, call: AgentCall, agent: str, flowed: bool) -> bytes | None:
        try:
            return await call.read()
        except MeshError as err:
            if flowed and err.code.name == "UNAVAILABLE" and err.reason in ("", "UNAVAILABLE"):
                raise Unavailable(
                    f"agent {agent} at {call.address} failed mid-turn ({err.message}); "
                    "events already sent were not replayed",
                    metadata={"agent": agent, "endpoint": call.address},
                ) from None
            raise

    async def _consult(
        self,
        state: TurnState,
        source: str,
        handoff: types_pb2.HandoffEvent,
        parent: AgentCall,
        stack: list[str],
    ) -> None:
        history = [*state.history, ChatMessage("user", state.message)]
        request = self._handoff_turn(
            state,
            source,
            handoff.target,
            CONSULT,
            handoff.reason,
            handoff.message,
            dict(handoff.context),
        )
        outcome = await self._run_agent(state, handoff.target, request, history, stack, source)
        assert outcome.final is not None
        result = types_pb2.ConsultResult(
            call_id=handoff.call_id, agent=handoff.target, content=outcome.final.content
        )
        await parent.send(types_pb2.ChatRequest(consult_result=result))

    # -- a whole turn ------------------------------------------------------------------

    async def run_turn(self, state: TurnState, target: str) -> types_pb2.ChatEvent:
        """Run the turn to its end; returns the final event (already stored)."""
        user = ChatMessage("user", state.message)
        plan = self.core.plan(target)
        outcome: Outcome | None = None
        for index, agent in enumerate(plan.steps):
            if index == 0:
                state.path.append(agent)
                request = self._chat_turn(state, agent)
                outcome = await self._run_agent(state, agent, request, state.history, [])
            else:
                assert outcome is not None and outcome.final is not None
                previous = outcome.agent
                self.core.take_handoff(state.budget, previous, agent, None)
                request = self._handoff_turn(
                    state,
                    previous,
                    agent,
                    TRANSFER,
                    f"step {index + 1} of sequence {target}",
                    outcome.final.content or f"{previous} gave no answer",
                    {},
                )
                history = [*state.history, user]
                outcome = await self._run_agent(state, agent, request, history, [], previous)
            outcome = await follow(self, state, outcome, user, [])
            if outcome.ended or outcome.strategy == "bubble_up":
                break  # the conversation ended, or a TRANSFER's target took the turn over
        assert outcome is not None and outcome.final is not None
        return await self._finish(state, plan, outcome, user)

    async def _finish(
        self, state: TurnState, plan: Plan, outcome: Outcome, user: ChatMessage
    ) -> types_pb2.ChatEvent:
        assert outcome.final is not None
        final = types_pb2.FinalMessage()
        final.CopyFrom(outcome.final)
        final.usage.input_tokens = state.input_tokens
        final.usage.output_tokens = state.output_tokens
        del final.hop_path[:]
        final.hop_path.extend(state.path)
        final.history_dropped = state.history_dropped
        if outcome.ended:
            final.stop_reason = types_pb2.STOP_REASON_END_CONVERSATION
        active = self.core.next_active(plan, outcome.agent, outcome.strategy, outcome.ended)
        stored = time.perf_counter()
        await self.store.append(
            state.store_key or state.conversation_id,
            [user, ChatMessage("assistant", final.content, agent=outcome.agent)],
            active,
        )
        took = time.perf_counter() - stored
        telemetry.metrics.store_commit.labels(self.store_kind).observe(took)
        if telemetry.state.tracing:
            span = telemetry.tracing.current()
            span.set_attribute("mesh.store.latency_ms", round(took * 1000, 3))
            span.set_attribute("mesh.hop_path", list(state.path))
            telemetry.tracing.usage(span, state.input_tokens, state.output_tokens)
        return types_pb2.ChatEvent(agent=outcome.agent, final=final)

    async def transfer(self, state: TurnState, outcome: Outcome, user: ChatMessage) -> Outcome:
        handoff = outcome.transfer
        assert handoff is not None and outcome.final is not None
        history = [*state.history, user]
        if outcome.final.content:
            history.append(ChatMessage("assistant", outcome.final.content, agent=outcome.agent))
        self.core.take_handoff(state.budget, outcome.agent, handoff.target, None)
        request = self._handoff_turn(
            state,
            outcome.agent,
            handoff.target,
            TRANSFER,
            handoff.reason,
            handoff.message or state.message,
            dict(handoff.context),
        )
        return await self._run_agent(state, handoff.target, request, history, [], outcome.agent)

    async def hand_over(
        self,
        state: TurnState,
        source: str,
        target: str,
        reason: str,
        message: str,
        history: list[ChatMessage],
    ) -> Outcome:
        request = self._handoff_turn(state, source, target, TRANSFER, reason, message, {})
        return await self._run_agent(state, target, request, history, [], source)


def _unanswerable(approval_id: str) -> types_pb2.ApprovalAnswer:
    return types_pb2.ApprovalAnswer(
        approval_id=approval_id,
        approved=False,
        reason="the client closed its side of the stream: nobody can approve",
    )


def _hop_of(request: types_pb2.ChatRequest) -> types_pb2.HopContext:
    """The per-turn hop context a request to an agent carries."""
    return request.handoff.hop if request.HasField("handoff") else request.turn.hop
