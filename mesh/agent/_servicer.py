"""The thin gRPC adapter over :class:`~mesh.agent.AgentRuntime`.

It converts wire messages to runtime inputs and runtime events to wire events,
maps errors through :mod:`mesh.errors`, and owns the stream mechanics: a reader
task takes follow-up turns, CONSULT answers and cancels off the request stream
while the current turn's events flow out; an idle stream is closed; a client
cancel or an expired deadline cancels the turn (and so the model call and tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from mesh.agent._runtime import (
    AgentRuntime,
    ConsultAnswer,
    ConsultBroker,
    ErrorInfo,
    Final,
    RuntimeEvent,
    TurnInput,
)
from mesh.context import check_conversation_id, current_hop_path
from mesh.convert import MODE_FROM_PB, MODE_TO_PB, event_to_pb, history_from_pb, to_struct
from mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
)
from mesh.server import Lifecycle, next_request
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("mesh.agent")

Req = TypeVar("Req", agent_pb2.HandoffRequest, types_pb2.ChatRequest)


@dataclass(frozen=True)
class _TurnEnd:
    error: MeshError | None = None


_EOF = object()


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: MeshError) -> None:
    """End the call with the error's status and rich details."""
    await context.abort(err.code, err.message, err.trailing_metadata())


def parse_chat_turn(request: types_pb2.ChatRequest) -> TurnInput:
    turn = request.turn
    if not turn.message.strip():
        raise InvalidArgument("turn.message is required: the user's message", field="turn.message")
    check_conversation_id(turn.conversation_id, "turn.conversation_id")
    return TurnInput(
        conversation_id=turn.conversation_id or uuid.uuid4().hex,
        message=turn.message,
        history=history_from_pb(turn.history),
        context=dict(turn.context),
        turn_id=turn.turn_id or uuid.uuid4().hex[:12],
        hop_path=current_hop_path.get(),
    )


def parse_handoff(request: agent_pb2.HandoffRequest) -> TurnInput:
    handoff = request.handoff
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
        history=history_from_pb(handoff.history),
        context=dict(handoff.context),
        turn_id=handoff.turn_id or uuid.uuid4().hex[:12],
        hop_path=tuple(handoff.hop_path) or current_hop_path.get(),
        source_agent=handoff.source_agent,
        mode=mode,
        reason=handoff.reason,
        hops_remaining=handoff.hops_remaining,
    )


class _Stream:
    """One Chat or Handoff call."""

    def __init__(
        self,
        runtime: AgentRuntime,
        context: grpc.aio.ServicerContext[Any, Any],
        lifecycle: Lifecycle,
        idle_timeout: float,
        opening_field: str,
    ) -> None:
        self.runtime = runtime
        self.context = context
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout
        self.opening_field = opening_field
        self.broker = ConsultBroker()
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.turn_task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self.seq = 0

    def cancel_turn(self) -> None:
        if self.turn_task is not None and not self.turn_task.done():
            self.cancel_requested = True
            self.turn_task.cancel()

    async def read(self, requests: AsyncIterator[Req], parse: Callable[[Req], TurnInput]) -> None:
        first = True
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if first and kind != self.opening_field:
                    raise InvalidArgument(
                        f"the first request must carry `{self.opening_field}`",
                        field=self.opening_field,
                    )
                first = False
                if kind == "consult_result":
                    answer = request.consult_result
                    if not self.broker.resolve(
                        answer.call_id,
                        ConsultAnswer(answer.content, answer.is_error, answer.agent),
                    ):
                        log.warning("consult answer for unknown call %r ignored", answer.call_id)
                elif kind == "cancel":
                    self.cancel_turn()
                elif kind == self.opening_field:
                    self.inbox.put_nowait(parse(request))
                else:
                    raise InvalidArgument(
                        f"a request must carry `{self.opening_field}`, `consult_result` or "
                        "`cancel`",
                        field="kind",
                    )
        except MeshError as err:
            self.inbox.put_nowait(err)
        finally:
            self.inbox.put_nowait(_EOF)

    def _stamp(self, event: RuntimeEvent, turn: TurnInput) -> types_pb2.ChatEvent:
        self.seq += 1
        out = event_to_pb(event)
        out.agent = self.runtime.name
        out.seq = self.seq
        out.conversation_id = turn.conversation_id
        out.turn_id = turn.turn_id
        if isinstance(event, Final):
            out.final.hop_path.extend([*turn.hop_path, self.runtime.name])
        return out

    async def _produce(self, turn: TurnInput, out: asyncio.Queue[object]) -> None:
        timeout = self.runtime.config.limits.turn_timeout_s
        remaining = self.context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        try:
            async with asyncio.timeout(timeout):
                async for event in self.runtime.run_turn(turn, self.broker):
                    out.put_nowait(event)
            out.put_nowait(_TurnEnd())
        except asyncio.CancelledError:
            if self.cancel_requested:
                self.cancel_requested = False
                out.put_nowait(Final("", 0, 0, "cancelled"))
                out.put_nowait(_TurnEnd())
                return
            raise
        except TimeoutError:
            self._fail(out, DeadlineExceeded(f"turn did not finish within {timeout:.3g}s"))
        except MeshError as err:
            self._fail(out, err)
        except Exception:
            log.exception("turn failed in agent %s", self.runtime.name)
            self._fail(out, MeshError("internal error in the agent"))

    @staticmethod
    def _fail(out: asyncio.Queue[object], err: MeshError) -> None:
        out.put_nowait(ErrorInfo(err.code.name, err.message, err.reason))
        out.put_nowait(_TurnEnd(err))

    async def run(
        self, requests: AsyncIterator[Req], parse: Callable[[Req], TurnInput]
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        reader = asyncio.ensure_future(self.read(requests, parse))
        try:
            while True:
                item = await next_request(self.inbox, self.lifecycle, self.idle_timeout)
                if item is _EOF:
                    return
                if isinstance(item, MeshError):
                    raise item
                assert isinstance(item, TurnInput)
                out: asyncio.Queue[object] = asyncio.Queue()
                self.turn_task = asyncio.ensure_future(self._produce(item, out))
                while True:
                    event = await out.get()
                    if isinstance(event, _TurnEnd):
                        if event.error is not None:
                            raise event.error
                        break
                    assert isinstance(event, RuntimeEvent)
                    yield self._stamp(event, item)
                await self.turn_task
                self.turn_task = None
                if self.opening_field == "handoff":
                    return  # a handoff carries one turn
        finally:
            reader.cancel()
            if self.turn_task is not None:
                self.turn_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.turn_task
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """``mesh.v1.Agent`` over one :class:`AgentRuntime`."""

    def __init__(
        self, runtime: AgentRuntime, lifecycle: Lifecycle, *, idle_timeout: float = 300.0
    ) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout

    async def _serve(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext[Any, Any],
        opening: str,
        parse: Callable[[Req], TurnInput],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        try:
            async with self.lifecycle.work():
                stream = _Stream(self.runtime, context, self.lifecycle, self.idle_timeout, opening)
                async for event in stream.run(requests, parse):
                    yield event
        except MeshError as err:
            await abort_with(context, err)

    # grpc.aio recognises streaming handlers by being async generator functions.
    async def Chat(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[types_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async for event in self._serve(request_iterator, context, "turn", parse_chat_turn):
            yield event

    async def Handoff(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[agent_pb2.HandoffRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        async for event in self._serve(request_iterator, context, "handoff", parse_handoff):
            yield event

    async def Info(  # noqa: N802 - gRPC method name
        self, request: agent_pb2.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> types_pb2.AgentInfo:
        return agent_info(self.runtime)


def agent_info(runtime: AgentRuntime) -> types_pb2.AgentInfo:
    config = runtime.config
    modes: dict[str, list[types_pb2.HandoffMode.Mode.ValueType]] = {}
    for handoff in config.handoffs:
        modes[handoff.target] = [MODE_TO_PB[m] for m in handoff.modes]
    return types_pb2.AgentInfo(
        name=config.name,
        description=config.description,
        skills=[types_pb2.Skill(name=s.name, description=s.description) for s in config.skills],
        model=types_pb2.ModelInfo(provider=runtime.provider.kind, model=runtime.provider.model),
        handoff_targets=[
            types_pb2.HandoffTarget(
                agent=h.target, modes=modes[h.target], description=h.description
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
