"""The router's turn engine: runs one turn across agents through the agent-stream port.

One turn: the routing core picks the agent (or sequence); the engine hands it the
history and relays its events. A TRANSFER moves the turn to the target; a CONSULT
runs the target concurrently and writes its answer back into the caller's open
stream; a sequence runs its steps in order. Every handoff is checked by the core
before anything is forwarded. The finished turn is stored before its final event
is sent, so an acknowledged turn survives a router restart.

Events the router only forwards (text deltas, tool calls and results) are relayed
as the agent serialized them; only finals, handoffs and errors are parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mesh.convert import message_to_pb
from mesh.errors import MeshError, Unavailable
from mesh.providers.base import ChatMessage
from mesh.router._agents import (
    KIND_ERROR,
    KIND_FINAL,
    KIND_HANDOFF,
    AgentCall,
    AgentStreams,
    HopCall,
    peek_kind,
)
from mesh.router._core import HopBudget, RoutingCore
from mesh.router._store import ConversationStore
from mesh.v1 import types_pb2

TRANSFER = types_pb2.HANDOFF_MODE_TRANSFER
CONSULT = types_pb2.HANDOFF_MODE_CONSULT
END = types_pb2.HANDOFF_MODE_END_CONVERSATION

Emit = Callable[[types_pb2.ChatEvent | bytes], None]
TokenFor = Callable[[str, str | None, str | None, int], Awaitable[str | None]]
"""(agent, the caller's token, the token the handing agent held or None, hops used so far)
-> the bearer for that agent."""


@dataclass
class TurnState:
    """One turn as it moves through the mesh."""

    conversation_id: str
    turn_id: str
    message: str
    context: dict[str, str]
    history: list[ChatMessage]
    emit: Emit
    deadline: float
    """Loop time by which the whole turn must be done."""
    budget: HopBudget = field(default_factory=HopBudget)
    request_id: str = ""
    trace_context: dict[str, str] = field(default_factory=dict)
    subject_token: str | None = None
    """The caller's validated bearer (None with auth off); exchanged per hop."""
    history_dropped: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    """The bearer each agent of this turn got (the next hop's ``previous``)."""
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def path(self) -> list[str]:
        return self.budget.path

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


@dataclass
class Outcome:
    agent: str
    final: types_pb2.FinalMessage | None = None
    transfer: types_pb2.HandoffEvent | None = None
    ended: bool = False


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
    ) -> None:
        self.core = core
        self.streams = streams
        self.store = store
        self.token_for = token_for

    # -- requests to agents ------------------------------------------------------------

    def _hop(self, state: TurnState, hops_remaining: int) -> types_pb2.HopContext:
        remaining_ms = int(state.remaining() * 1000)
        return types_pb2.HopContext(
            hop_path=state.path,
            request_id=state.request_id,
            trace_context=state.trace_context,
            timeout_ms=max(1, remaining_ms),
            hops_remaining=hops_remaining,
        )

    def _chat_turn(self, state: TurnState, agent: str) -> types_pb2.ChatRequest:
        return types_pb2.ChatRequest(
            turn=types_pb2.Turn(
                conversation_id=state.conversation_id,
                message=state.message,
                history=[message_to_pb(m) for m in state.history],
                context=state.context,
                turn_id=state.turn_id,
                hop=self._hop(state, self.core.hops_remaining(agent, state.budget)),
            )
        )

    def _handoff_turn(
        self,
        state: TurnState,
        source: str,
        target: str,
        mode: types_pb2.HandoffMode.ValueType,
        reason: str,
        message: str,
        context: dict[str, str],
        history: list[ChatMessage],
    ) -> types_pb2.ChatRequest:
        hops = self.core.hops_remaining(target, state.budget)
        return types_pb2.ChatRequest(
            handoff=types_pb2.HandoffTurn(
                conversation_id=state.conversation_id,
                source_agent=source,
                mode=mode,
                reason=reason,
                message=message,
                history=[message_to_pb(m) for m in history],
                context=context,
                hop_path=list(state.path),
                turn_id=state.turn_id,
                hops_remaining=hops,
                hop=self._hop(state, hops),
            )
        )

    async def _open(
        self, state: TurnState, agent: str, request: types_pb2.ChatRequest, source: str
    ) -> tuple[AgentCall, bytes]:
        token = None
        if self.token_for is not None:
            previous = state.tokens.get(source) if source else None
            token = await self.token_for(agent, state.subject_token, previous, state.budget.hops)
            if token is not None:
                state.tokens[agent] = token
        traceparent = state.trace_context.get("traceparent", "")
        hop = HopCall(token, state.request_id, traceparent, state.remaining())
        return await self.streams.open(agent, request, hop)

    # -- one agent's part of the turn ----------------------------------------------------

    async def _run_agent(
        self,
        state: TurnState,
        agent: str,
        request: types_pb2.ChatRequest,
        stack: list[str],
        source: str = "",
    ) -> Outcome:
        """Relay one agent's events until its final; runs its CONSULTs concurrently."""
        call, data = await self._open(state, agent, request, source)
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
                    elif kind != KIND_ERROR:  # the status that follows says it once
                        state.emit(data)
                    flowed = True
                    next_data = await self._read(call, agent, flowed)
                    if next_data is None:
                        break
                    data = next_data
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
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
            state.emit(event)
        elif handoff.mode == END:
            outcome.ended = True
            state.emit(event)

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
            history,
        )
        outcome = await self._run_agent(state, handoff.target, request, stack, source)
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
                outcome = await self._run_agent(state, agent, self._chat_turn(state, agent), [])
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
                    outcome.final.content,
                    {},
                    [*state.history, user],
                )
                outcome = await self._run_agent(state, agent, request, [], previous)
            while outcome.transfer is not None:
                outcome = await self._transfer(state, outcome, user)
        assert outcome is not None and outcome.final is not None
        final = types_pb2.FinalMessage()
        final.CopyFrom(outcome.final)
        final.usage.input_tokens = state.input_tokens
        final.usage.output_tokens = state.output_tokens
        del final.hop_path[:]
        final.hop_path.extend(state.path)
        final.history_dropped = state.history_dropped
        if outcome.ended:
            final.stop_reason = types_pb2.STOP_REASON_END_CONVERSATION
        active = target if plan.sequence else outcome.agent
        await self.store.append(
            state.conversation_id,
            [user, ChatMessage("assistant", final.content, agent=outcome.agent)],
            active,
        )
        return types_pb2.ChatEvent(agent=outcome.agent, final=final)

    async def _transfer(self, state: TurnState, outcome: Outcome, user: ChatMessage) -> Outcome:
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
            history,
        )
        return await self._run_agent(state, handoff.target, request, [], outcome.agent)
