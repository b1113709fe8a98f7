"""The router's turn engine: routing, handoffs, the hop budget, memory.

One turn: pick the agent (named by the client, else CONDITIONAL routes, else the
agent that answered last in this conversation, else the default), hand it the
history, and relay its events. A TRANSFER moves the turn to the target on
``Agent.Handoff``; a CONSULT runs the target concurrently and writes its answer
back into the caller's still-open stream; a sequence runs its steps in order.
Every handoff is checked against the hop budget and the CONSULT stack before
anything is forwarded. The finished turn is stored before its final event is
sent, so an acknowledged turn survives a router restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh.config import MeshConfig
from mesh.context import (
    MD_CONVERSATION_ID,
    MD_HOP_PATH,
    MD_REQUEST_ID,
    current_request_id,
    current_token,
    format_hop_path,
)
from mesh.convert import message_to_pb
from mesh.errors import (
    AgentNotFound,
    HandoffCycle,
    HandoffNotAllowed,
    HopBudgetExceeded,
    MeshError,
    Unavailable,
    decode_details,
    from_rpc_error,
    from_status,
)
from mesh.providers.base import ChatMessage
from mesh.router._pool import AgentPool, Endpoint
from mesh.router._store import ConversationStore
from mesh.v1 import agent_pb2, types_pb2

log = logging.getLogger("mesh.router")

TRANSFER = types_pb2.HandoffMode.TRANSFER
CONSULT = types_pb2.HandoffMode.CONSULT
END = types_pb2.HandoffMode.END_CONVERSATION
OPEN_ATTEMPTS = 3

Emit = Callable[[types_pb2.ChatEvent], None]
Delegate = Callable[[str], Awaitable[str | None]]
"""agent -> the token that agent holds for this turn (None: keep the caller's token)."""


@dataclass(eq=False)
class OpenStream:
    """An agent Chat stream kept open between the turns of one client stream."""

    agent: str
    call: Any
    endpoint: Endpoint
    conversation_id: str
    deadline: float
    """Loop time at which the call's own deadline runs out."""
    owner: StreamCache | None = None
    timer: asyncio.TimerHandle | None = None


_closing: set[asyncio.Task[None]] = set()


async def _close_gracefully(entry: OpenStream) -> None:
    # Half-close so the agent ends the stream cleanly (OK), not as a cancel.
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
        async with asyncio.timeout(1.0):
            await entry.call.done_writing()
            await entry.call.read()
    entry.call.cancel()


def _release(entry: OpenStream) -> None:
    task = asyncio.ensure_future(_close_gracefully(entry))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class StreamCache:
    """The agent Chat streams one client stream keeps open for its next turns.

    A turn then costs a message on an open stream instead of a new call (and, with
    auth on, a token validation at the agent). A stream is reused only for the same
    agent and conversation, while its deadline still covers the new turn; it is
    closed after ``keep_s`` idle, on any failure or cancel, and at once when its
    agent runs out of streams (:func:`evict`).
    """

    def __init__(self, keep_s: float, max_per_endpoint: int = 256) -> None:
        self.keep_s = keep_s
        self.max_per_endpoint = max_per_endpoint
        self._open: dict[str, OpenStream] = {}

    def detach(self, entry: OpenStream) -> None:
        """Stop keeping ``entry`` (its timer, its slot here and at its endpoint)."""
        if self._open.get(entry.agent) is entry:
            del self._open[entry.agent]
        if entry.timer is not None:
            entry.timer.cancel()
        entry.endpoint.kept.discard(entry)
        entry.owner = None

    def take(self, agent: str, conversation_id: str, deadline: float) -> OpenStream | None:
        entry = self._open.get(agent)
        if entry is None:
            return None
        self.detach(entry)
        if (
            entry.conversation_id != conversation_id
            or entry.deadline + 1.0 < deadline
            or not entry.endpoint.healthy
            or entry.call.done()
        ):
            _release(entry)
            return None
        return entry

    def keep(self, entry: OpenStream) -> None:
        old = self._open.get(entry.agent)
        if old is not None:
            self.drop(old)
        if len(entry.endpoint.kept) >= self.max_per_endpoint:
            _release(entry)
            return
        self._open[entry.agent] = entry
        entry.owner = self
        entry.endpoint.kept.add(entry)
        entry.timer = asyncio.get_running_loop().call_later(self.keep_s, self.drop, entry)

    def drop(self, entry: OpenStream) -> None:
        """Close a kept stream now (idle too long, or replaced)."""
        self.detach(entry)
        _release(entry)

    async def close(self) -> None:
        entries = list(self._open.values())
        for entry in entries:
            self.detach(entry)
        await asyncio.gather(*(_close_gracefully(e) for e in entries))


async def evict(endpoint: Endpoint) -> bool:
    """Close every idle kept stream to ``endpoint``; True when there were any."""
    entries = list(endpoint.kept)
    for entry in entries:
        if entry.owner is not None:
            entry.owner.detach(entry)
    await asyncio.gather(*(_close_gracefully(e) for e in entries))
    return bool(entries)


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
    path: list[str] = field(default_factory=list)
    """Agents that worked on this turn, in order (the incoming path first)."""
    hops: int = 0
    """Handoffs taken so far, counting the hops of an incoming path."""
    input_tokens: int = 0
    output_tokens: int = 0
    streams: StreamCache | None = None
    """Agent streams kept open across this client stream's turns (None: no reuse)."""

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
        config: MeshConfig,
        pool: AgentPool,
        store: ConversationStore,
        *,
        delegate: Delegate | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.delegate = delegate

    # -- routing ---------------------------------------------------------------------

    def known(self, name: str) -> bool:
        return (
            name in self.config.agents
            or name in self.config.router.sequences
            or name in self.pool.endpoints
        )

    def choose(self, turn: types_pb2.Turn, metadata: Mapping[str, str], active: str) -> str:
        if turn.agent:
            if not self.known(turn.agent):
                known = sorted(
                    {*self.config.agents, *self.config.router.sequences, *self.pool.endpoints}
                )
                raise AgentNotFound(
                    f"no agent or sequence named {turn.agent!r} (known: {', '.join(known)})",
                    field="turn.agent",
                )
            return turn.agent
        for route in self.config.router.routes:
            if route.applies(turn.message, turn.context, metadata):
                return route.agent
        if active and self.known(active):
            return active
        if self.config.router.default_agent:
            return self.config.router.default_agent
        raise AgentNotFound(
            "the turn names no agent, no route matched and no default agent is configured",
            field="turn.agent",
        )

    # -- budget ----------------------------------------------------------------------

    def _check_handoff(
        self, state: TurnState, source: str, target: str, stack: list[str] | None
    ) -> None:
        limit = self.config.max_hops_for(source)
        route = " > ".join([*state.path, target])
        if state.hops + 1 > limit:
            raise HopBudgetExceeded(
                f"hop budget of {limit} spent; refused handoff from {source} to {target}; "
                f"path: {route}",
                metadata={"path": format_hop_path([*state.path, target]), "max_hops": str(limit)},
            )
        if stack is not None and target in stack:
            cycle = " > ".join([*stack, target])
            raise HandoffCycle(
                f"consult cycle refused: {cycle} ({target} is already waiting on a consult)",
                metadata={"path": format_hop_path([*stack, target])},
            )
        if target not in self.config.agents and target not in self.pool.endpoints:
            raise HandoffNotAllowed(f"{source} handed off to unknown agent {target!r}")

    # -- calling agents --------------------------------------------------------------

    def _metadata(self, state: TurnState) -> tuple[tuple[str, str], ...]:
        return (
            (MD_HOP_PATH, format_hop_path(state.path)),
            (MD_CONVERSATION_ID, state.conversation_id),
            (MD_REQUEST_ID, current_request_id.get() or uuid.uuid4().hex[:16]),
        )

    async def _open(
        self, state: TurnState, agent: str, request: Any, method: str, source: str = ""
    ) -> tuple[Any, Any, Endpoint]:
        """Open a stream on a healthy replica and read its first event.

        A replica that fails before its first event is skipped and another tried;
        nothing has reached the client yet, so nothing is replayed.
        """
        tried: set[str] = set()
        evicted = False
        last: MeshError | None = None
        subject = current_token.get()
        if source and self.delegate is not None and subject is not None:
            # The handoff comes from ``source``: the next token is exchanged from the one
            # ``source`` held, so the delegation chain records it (router > source > ...).
            subject = await self.delegate(source) or subject
        for _attempt in range(OPEN_ATTEMPTS):
            endpoint = self.pool.pick(agent, tried)
            if endpoint is None:
                if not tried and agent in self.pool.endpoints:
                    # Give a starting replica up to the connect timeout to turn healthy.
                    wait = min(self.config.router.connect_timeout_s, state.remaining())
                    if await self.pool.wait_healthy(agent, wait):
                        endpoint = self.pool.pick(agent, tried)
                if endpoint is None:
                    break
            tried.add(endpoint.address)
            # The generated stubs type calls as sync iterators; these are aio stream calls.
            stub_method: Any = endpoint.stub.Chat if method == "chat" else endpoint.stub.Handoff
            # Client interceptors read the subject token when the call is created.
            reset = current_token.set(subject)
            try:
                call = stub_method(metadata=self._metadata(state), timeout=state.remaining())
            finally:
                current_token.reset(reset)
            endpoint.active += 1
            try:
                try:
                    await call.write(request)
                    first = await call.read()
                except asyncio.InvalidStateError:
                    first = grpc.aio.EOF  # the call failed before it started (an interceptor)
                if first is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details() or ""
                    trailing = [(str(k), v) for k, v in (await call.trailing_metadata() or ())]
                else:
                    return call, first, endpoint
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details() or ""
                trailing = [(str(k), v) for k, v in (err.trailing_metadata() or ())]
            endpoint.active -= 1
            call.cancel()
            mapped = from_status(code, details, trailing)
            # Only a replica that is down or draining is worth trying another for; our own
            # failures (a token exchange, a refusal) would fail on every replica alike.
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not evicted:
                # The agent is out of streams: give back the idle ones we keep there.
                evicted = True
                if await evict(endpoint):
                    tried.discard(endpoint.address)
                    continue
            if code != grpc.StatusCode.UNAVAILABLE or decode_details(trailing)[0] not in (
                "",
                "DRAINING",
            ):
                raise mapped from None
            self.pool.mark_failed(endpoint)
            log.warning(
                "replica %s of %s unavailable before its first event: %s",
                endpoint.address,
                agent,
                mapped.message,
            )
            last = mapped
        detail = f": {last.message}" if last else ""
        raise Unavailable(f"no healthy replica of agent {agent!r}{detail}")

    async def _run_agent(
        self,
        state: TurnState,
        agent: str,
        request: Any,
        method: str,
        stack: list[str],
        source: str = "",
    ) -> Outcome:
        """Relay one agent's events until its final; runs its CONSULTs concurrently."""
        reusable = method == "chat" and state.streams is not None
        opened = await self._reuse(state, agent, request) if reusable else None
        if opened is None:
            call_deadline = state.deadline  # _open sets the call's timeout from it
            call, event, endpoint = await self._open(state, agent, request, method, source)
        else:
            call, event, endpoint, call_deadline = opened
        outcome = Outcome(agent)
        flowed = False
        kept = False
        try:
            async with asyncio.TaskGroup() as consults:
                while event is not grpc.aio.EOF:
                    assert isinstance(event, types_pb2.ChatEvent)
                    kind = event.WhichOneof("kind")
                    if kind == "final":
                        outcome.final = event.final
                        state.input_tokens += event.final.usage.input_tokens
                        state.output_tokens += event.final.usage.output_tokens
                        if reusable and state.streams is not None:
                            # The agent's turn is over and its stream waits for the next:
                            # keep it for this client stream's next turn.
                            state.streams.keep(
                                OpenStream(
                                    agent, call, endpoint, state.conversation_id, call_deadline
                                )
                            )
                            kept = True
                            break
                        if method == "chat":
                            with contextlib.suppress(
                                grpc.aio.AioRpcError, asyncio.InvalidStateError
                            ):
                                await call.done_writing()
                    elif kind == "handoff":
                        handoff = event.handoff
                        if handoff.mode == CONSULT:
                            self._check_handoff(state, agent, handoff.target, [*stack, agent])
                            state.hops += 1
                            state.path.append(handoff.target)
                            state.emit(event)
                            consults.create_task(
                                self._consult(state, agent, handoff, call, method, [*stack, agent])
                            )
                        elif handoff.mode == TRANSFER:
                            self._check_handoff(state, agent, handoff.target, None)
                            outcome.transfer = handoff
                            state.emit(event)
                        elif handoff.mode == END:
                            outcome.ended = True
                            state.emit(event)
                    else:
                        state.emit(event)
                    flowed = True
                    event = await self._read(call, agent, endpoint, flowed)
                code = await call.code() if not kept else grpc.StatusCode.OK
                if code != grpc.StatusCode.OK:
                    raise from_status(
                        code, await call.details() or "", list(await call.trailing_metadata() or ())
                    )
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            endpoint.active -= 1
            if not kept:
                call.cancel()
        if outcome.final is None:
            raise Unavailable(f"agent {agent} ended its stream without a final event")
        return outcome

    async def _reuse(
        self, state: TurnState, agent: str, request: Any
    ) -> tuple[Any, Any, Endpoint, float] | None:
        """Send the turn on the agent stream the previous turn left open, if any.

        None when there is none or it turns out closed before its first event (an
        agent that drained or timed the idle stream out): then a new stream is opened.
        """
        assert state.streams is not None
        entry = state.streams.take(agent, state.conversation_id, state.deadline)
        if entry is None:
            return None
        entry.endpoint.active += 1
        try:
            await entry.call.write(request)
            first = await entry.call.read()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            first = grpc.aio.EOF
        if first is grpc.aio.EOF:
            entry.endpoint.active -= 1
            entry.call.cancel()
            return None
        return entry.call, first, entry.endpoint, entry.deadline

    async def _read(self, call: Any, agent: str, endpoint: Endpoint, flowed: bool) -> Any:
        try:
            return await call.read()
        except grpc.aio.AioRpcError as err:
            mapped = from_rpc_error(err)
            if err.code() == grpc.StatusCode.UNAVAILABLE and flowed:
                self.pool.mark_failed(endpoint)
                raise Unavailable(
                    f"agent {agent} at {endpoint.address} failed mid-turn ({mapped.message}); "
                    "events already sent were not replayed",
                    metadata={"agent": agent, "endpoint": endpoint.address},
                ) from None
            raise mapped from None

    def _handoff_turn(
        self,
        state: TurnState,
        source: str,
        mode: int,
        reason: str,
        message: str,
        context: Mapping[str, str],
        history: list[ChatMessage],
    ) -> agent_pb2.HandoffRequest:
        limit = self.config.max_hops
        return agent_pb2.HandoffRequest(
            handoff=agent_pb2.HandoffTurn(
                conversation_id=state.conversation_id,
                source_agent=source,
                mode=mode,  # type: ignore[arg-type]  # a HandoffMode.Mode value
                reason=reason,
                message=message,
                history=[message_to_pb(m) for m in history],
                context=dict(context),
                hop_path=list(state.path),
                turn_id=state.turn_id,
                hops_remaining=max(0, limit - state.hops),
            )
        )

    async def _consult(
        self,
        state: TurnState,
        source: str,
        handoff: types_pb2.HandoffEvent,
        parent: Any,
        parent_method: str,
        stack: list[str],
    ) -> None:
        history = [*state.history, ChatMessage("user", state.message)]
        request = self._handoff_turn(
            state, source, CONSULT, handoff.reason, handoff.message, handoff.context, history
        )
        outcome = await self._run_agent(state, handoff.target, request, "handoff", stack, source)
        assert outcome.final is not None
        result = types_pb2.ConsultResult(
            call_id=handoff.call_id, agent=handoff.target, content=outcome.final.content
        )
        if parent_method == "chat":
            await parent.write(types_pb2.ChatRequest(consult_result=result))
        else:
            await parent.write(agent_pb2.HandoffRequest(consult_result=result))

    # -- a whole turn ----------------------------------------------------------------

    async def run_turn(self, state: TurnState, target: str) -> types_pb2.ChatEvent:
        """Run the turn to its end; returns the final event (already stored)."""
        user = ChatMessage("user", state.message)
        sequence = self.config.router.sequences.get(target)
        steps = list(sequence.steps) if sequence else [target]
        outcome: Outcome | None = None
        for index, agent in enumerate(steps):
            if index == 0:
                state.path.append(agent)
                request: Any = types_pb2.ChatRequest(
                    turn=types_pb2.Turn(
                        conversation_id=state.conversation_id,
                        message=state.message,
                        history=[message_to_pb(m) for m in state.history],
                        context=state.context,
                        turn_id=state.turn_id,
                    )
                )
                outcome = await self._run_agent(state, agent, request, "chat", [])
            else:
                assert outcome is not None and outcome.final is not None
                previous = outcome.agent
                self._check_handoff(state, previous, agent, None)
                state.hops += 1
                state.path.append(agent)
                request = self._handoff_turn(
                    state,
                    previous,
                    TRANSFER,
                    f"step {index + 1} of sequence {target}",
                    outcome.final.content,
                    {},
                    [*state.history, user],
                )
                outcome = await self._run_agent(state, agent, request, "handoff", [], previous)
            while outcome.transfer is not None:
                handoff = outcome.transfer
                assert outcome.final is not None
                spoken = outcome.final.content
                history = [*state.history, user]
                if spoken:
                    history.append(ChatMessage("assistant", spoken, agent=outcome.agent))
                state.hops += 1
                state.path.append(handoff.target)
                request = self._handoff_turn(
                    state,
                    outcome.agent,
                    TRANSFER,
                    handoff.reason,
                    handoff.message or state.message,
                    handoff.context,
                    history,
                )
                outcome = await self._run_agent(
                    state, handoff.target, request, "handoff", [], outcome.agent
                )
        assert outcome is not None and outcome.final is not None
        final = types_pb2.FinalMessage()
        final.CopyFrom(outcome.final)
        final.usage.input_tokens = state.input_tokens
        final.usage.output_tokens = state.output_tokens
        del final.hop_path[:]
        final.hop_path.extend(state.path)
        if outcome.ended:
            final.stop_reason = "end_conversation"
        active = target if sequence else outcome.agent
        await self.store.append(
            state.conversation_id,
            [user, ChatMessage("assistant", final.content, agent=outcome.agent)],
            active,
        )
        return types_pb2.ChatEvent(agent=outcome.agent, final=final)
