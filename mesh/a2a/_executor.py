"""The A2A executor: one A2A task is one router turn (task id = turn id, context id =
conversation id); cancel cancels the router call, and with it every hop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from a2a.helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import (
    Message,
    Part,
    Role,
    TaskState,
)
from google.protobuf.json_format import MessageToDict, ParseDict

from mesh.a2a._auth import Identity, bearer_of, trace_of
from mesh.a2a._cards import CardBook
from mesh.a2a._errors import a2a_code, task_state_for
from mesh.client import AgentClient, ChatStream, create_channel, turn_request
from mesh.convert import error_code_name
from mesh.errors import MeshError, RemoteError, Unavailable
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

log = logging.getLogger("mesh.a2a")
_DESCRIBE_TIMEOUT_S = 5.0
_BATCH_S = 0.1
_BATCH_CHARS = 4096
_flushing: set[asyncio.Task[None]] = set()
_STATUS_TIMEOUT_S = 5.0

# -- the router --------------------------------------------------------------------------


@dataclass
class RouterLink:
    """One long-lived channel to the router, and the turns running on it by task id."""

    address: str
    credentials: grpc.ChannelCredentials | None = None
    timeout_s: float = 300.0
    running: dict[str, ChatStream] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    waiting: dict[str, tuple[ChatStream, str, _Relay]] = field(default_factory=dict)
    """Tasks in ``input-required``: the open router call, the approval it waits on, and
    the task's relay (the answer artifact continues where it stopped)."""
    _channel: grpc.aio.Channel | None = None

    def client(self) -> AgentClient:
        if self._channel is None:
            self._channel = create_channel(self.address, credentials=self.credentials)
        return AgentClient(self._channel, router=True)

    async def describe(self, name: str, token: str | None) -> types_pb2.AgentInfo | None:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        stub = router_pb2_grpc.RouterServiceStub(self.client().channel)
        try:
            response = await stub.DescribeAgent(
                router_pb2.DescribeAgentRequest(name=name),
                metadata=metadata,
                timeout=_DESCRIBE_TIMEOUT_S,
            )
        except grpc.RpcError:
            return None
        return response.info

    def cancel(self, task_id: str) -> bool:
        stream = self.running.get(task_id)
        waiting = self.waiting.pop(task_id, None)
        if stream is None and waiting is not None:
            stream = waiting[0]  # waiting for an approval: its router call is still open
        if stream is None:
            return False
        self.cancelled.add(task_id)
        stream.cancel()
        return True

    async def aclose(self) -> None:
        for stream in [*self.running.values(), *(w[0] for w in self.waiting.values())]:
            stream.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# -- the executor ------------------------------------------------------------------------


def _agent_message(text: str, task_id: str, context_id: str, meta: dict[str, Any]) -> Message:
    message = Message(
        message_id=uuid.uuid4().hex,
        role=Role.ROLE_AGENT,
        parts=[Part(text=text)],
        task_id=task_id,
        context_id=context_id,
    )
    ParseDict({"mesh": meta}, message.metadata)
    return message


class _Relay:
    """Router events as A2A task events: deltas as chunks of the ``answer`` artifact,
    tool calls, results and handoffs as ``working`` status messages, the final as the
    completed task."""

    def __init__(self, updater: TaskUpdater, say: Callable[..., Message], answer: str) -> None:
        self.updater = updater
        self.say = say
        self.answer = answer
        self.chunks = 0
        self._text: list[str] = []
        """Deltas not yet appended to the answer artifact."""
        self._size = 0
        self._agent = ""
        self._flushed = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        """One task event at a time, in order (a flush may run from the timer)."""

    async def _note(self, text: str, **meta: Any) -> None:
        await self.updater.update_status(TaskState.TASK_STATE_WORKING, self.say(text, **meta))

    async def _delta(self, text: str, agent: str) -> None:
        """Deltas reach the answer artifact in batches: at most every 0.1 s or 4 KiB,
        and before any other event. The SDK copies the whole task for every artifact
        append, so one append per model chunk made a long answer cost its length
        squared (160,000 characters in 12-character chunks took 16 s)."""
        if agent != self._agent:
            await self._flush()
            self._agent = agent
        self._text.append(text)
        self._size += len(text)
        loop = asyncio.get_running_loop()
        if self._size >= _BATCH_CHARS or loop.time() - self._flushed >= _BATCH_S:
            await self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(_BATCH_S, self._flush_later)

    def stop(self) -> None:
        """The turn is over (or was cancelled): no batch is written after it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._flush())
        _flushing.add(task)
        task.add_done_callback(_flushing.discard)

    async def _flush(self) -> None:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._text:
                return
            text, self._text, self._size = "".join(self._text), [], 0
            self._flushed = asyncio.get_running_loop().time()
            await self.updater.add_artifact(
                [Part(text=text)],
                artifact_id=self.answer,
                name="answer",
                append=self.chunks > 0,
                metadata={"agent": self._agent},
            )
            self.chunks += 1

    async def event(self, event: types_pb2.ChatEvent) -> bool | str:
        """Relay one event; True once the turn is over, "input" when it waits for the
        person (a tool approval: the task goes ``input-required``), "error" when the
        turn failed (the call's status says how)."""
        kind, agent = event.WhichOneof("kind"), event.agent
        if kind != "delta":
            await self._flush()
        if kind == "approval_request":
            asked = event.approval_request
            text = f"{asked.requested_by} asks to run {asked.call.name}: answer approve or deny"
            message = self.say(
                text,
                kind=kind,
                agent=agent,
                approval_id=asked.approval_id,
                tool=asked.call.name,
                arguments=MessageToDict(asked.call.arguments),
                timeout_ms=asked.timeout_ms,
            )
            await self.updater.update_status(TaskState.TASK_STATE_INPUT_REQUIRED, message)
            return "input"
        if kind == "delta":
            await self._delta(event.delta.text, agent)
        elif kind == "tool_call":
            tool = event.tool_call.name
            await self._note(f"[{agent} calls {tool}]", kind=kind, agent=agent, tool=tool)
        elif kind == "tool_result":
            tool = event.tool_result.name
            await self._note(f"[{tool} answered {agent}]", kind=kind, agent=agent, tool=tool)
        elif kind == "handoff":
            handoff = event.handoff
            mode = types_pb2.HandoffMode.Name(handoff.mode)
            note = f"[{agent} hands over to {handoff.target} ({mode})]"
            await self._note(
                note,
                kind=kind,
                agent=agent,
                target=handoff.target,
                mode=mode,
                reason=handoff.reason,
            )
        elif kind == "final":
            await self._final(event)
            return True
        elif kind == "error":
            return "error"
        return False

    async def _final(self, event: types_pb2.ChatEvent) -> None:
        final = event.final
        if self.chunks:
            await self.updater.add_artifact(
                [], artifact_id=self.answer, name="answer", append=True, last_chunk=True
            )
        else:
            await self.updater.add_artifact(
                [Part(text=final.content)], artifact_id=self.answer, name="answer"
            )
        message = self.say(
            final.content,
            kind="final",
            agent=event.agent,
            hop_path=list(final.hop_path),
            input_tokens=final.usage.input_tokens,
            output_tokens=final.usage.output_tokens,
        )
        await self.updater.complete(message)


class MeshExecutor(AgentExecutor):
    """Runs an A2A task as one router turn to ``target`` ("" = the router's choice)."""

    def __init__(self, target: str, link: RouterLink, identity: Identity, cards: CardBook):
        self.target = target
        self.link = link
        self.identity = identity
        self.cards = cards

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        if context.current_task is None and context.message is not None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        updater = TaskUpdater(event_queue, task_id, context_id)
        await updater.start_work()

        def say(text: str, **meta: Any) -> Message:
            return _agent_message(text, task_id, context_id, meta)

        try:
            token = await self.identity(bearer_of(context.call_context.state))
            if self.target:
                await self.cards.describe(self.target, token)
            await self._turn(context, updater, token, say)
        except MeshError as err:
            if task_id in self.link.cancelled:
                return  # cancel() reports the task canceled
            state = task_state_for(err)
            meta = {"code": err.code.name, "reason": err.reason, "a2a_code": a2a_code(err)}
            await updater.update_status(state, say(f"{err.code.name}: {err.message}", **meta))
        finally:
            self.link.running.pop(task_id, None)
            self.link.cancelled.discard(task_id)

    async def _turn(
        self,
        context: RequestContext,
        updater: TaskUpdater,
        token: str | None,
        say: Callable[..., Message],
    ) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        waiting = self.link.waiting.pop(task_id, None)
        if waiting is not None:
            # The person answered an approval: it goes into the turn's open router call.
            stream, approval_id, relay = waiting
            relay.updater, relay.say = updater, say
            await stream.send(types_pb2.ChatRequest(approval=_answer(context, approval_id)))
            events = _events(stream)
        else:
            bearer = (("authorization", f"Bearer {token}"),) if token else ()
            metadata = (*bearer, *trace_of(context.call_context.state))
            stream = self.link.client().open(metadata=metadata, timeout=self.link.timeout_s)
            relay = _Relay(updater, say, f"{task_id}-answer")
            request = turn_request(context.get_user_input(), conversation_id=context_id)
            request.turn.agent = self.target
            request.turn.turn_id = task_id
            events = stream.turn(request)
        self.link.running[task_id] = stream
        keep = False
        try:
            async for event in events:
                outcome = await relay.event(event)
                if outcome == "input":
                    approval_id = event.approval_request.approval_id
                    self.link.waiting[task_id] = (stream, approval_id, relay)
                    keep = True
                    return
                if outcome == "error":
                    raise await _failure(stream, event.error)
                if outcome:
                    await stream.close()  # half-close: the router ends the call OK
                    return
            raise Unavailable("the router ended the turn without a final event")
        finally:
            if not keep:
                relay.stop()
                stream.cancel()  # a no-op once the call has ended

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the router call (every hop of the turn stops), then the task."""
        task_id = context.task_id or ""
        self.link.cancel(task_id)
        updater = TaskUpdater(event_queue, task_id, context.context_id or "")
        await updater.cancel()


_YES = {"approve", "approved", "yes", "y", "ok", "allow"}


def _answer(context: RequestContext, approval_id: str) -> types_pb2.ApprovalAnswer:
    """The person's answer to an approval: ``approve`` (or yes/ok/allow) runs the tool,
    anything else denies it, the text being the reason the model sees."""
    text = context.get_user_input().strip()
    approved = text.lower().rstrip(".!") in _YES
    return types_pb2.ApprovalAnswer(
        approval_id=approval_id, approved=approved, reason="" if approved else text
    )


async def _failure(stream: ChatStream, error: types_pb2.ErrorEvent) -> MeshError:
    """What a turn's error event stands for: the router call's status, which follows it
    with the rich details (the reason, the field), or the event itself if none comes."""
    with contextlib.suppress(TimeoutError, grpc.RpcError):
        async with asyncio.timeout(_STATUS_TIMEOUT_S):
            failure = await stream.status_error()
            if failure is not None:
                return failure
    status = grpc.StatusCode[error_code_name(error.code)]
    return RemoteError(status, error.message or "the turn failed", error.reason)


async def _events(stream: ChatStream) -> AsyncIterator[types_pb2.ChatEvent]:
    """The rest of a turn's events on an open stream (after an approval answer)."""
    while True:
        event = await stream.call.read()
        if event is grpc.aio.EOF:
            return
        assert isinstance(event, types_pb2.ChatEvent)
        yield event
        if event.WhichOneof("kind") in ("final", "error"):
            return
