"""Remote A2A agents as handoff targets: a second adapter of the router's agent-stream port.

:class:`MeshStreams` is the port the engine calls: agents configured with
``a2a: {url, audience}`` go to :class:`A2aAgents`, every other agent to the gRPC
:class:`~mesh.router.StreamPool`. The engine has already checked the hop budget and
the consult stack, and computed the hop's token (the user's, exchanged for this
agent's audience through the handing agent), so this adapter only translates:

- the turn or handoff becomes one A2A message (``message/stream``) whose context id is
  the conversation id; the history, reason, source agent and hop path travel in the
  message's metadata (``mesh``);
- the task's artifact chunks become ``delta`` events, its completion the ``final``
  event; a failed, rejected, canceled, auth-required or input-required task becomes
  the mapped mesh error (:mod:`mesh.a2a._errors`);
- a cancelled turn (the engine drops the call, or a ``cancel`` request) sends
  ``tasks/cancel`` for the remote task.

The A2A client is the ``a2a-sdk``'s own, on one pooled ``httpx`` client per agent;
the agent's card is fetched once and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from a2a.client import Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskState,
)
from google.protobuf.json_format import ParseDict

from mesh.a2a._errors import error_for_state, from_a2a_error
from mesh.config import A2aRemoteConfig, MeshConfig
from mesh.convert import message_to_pb
from mesh.errors import MeshError, Unavailable
from mesh.router._port import AgentCall, AgentStreams, HopCall, history_body
from mesh.v1 import types_pb2

log = logging.getLogger("mesh.a2a")

_TERMINAL = {
    TaskState.TASK_STATE_COMPLETED,
    TaskState.TASK_STATE_FAILED,
    TaskState.TASK_STATE_CANCELED,
    TaskState.TASK_STATE_REJECTED,
    TaskState.TASK_STATE_INPUT_REQUIRED,
    TaskState.TASK_STATE_AUTH_REQUIRED,
}
_CANCEL_TIMEOUT_S = 5.0
_CARD_TIMEOUT_S = 10.0
_END = object()


def _text(parts: Any) -> str:
    return "".join(part.text for part in parts if part.text)


def _history(messages: Any) -> list[dict[str, str]]:
    role = types_pb2.Message.Role.Name
    return [{"role": role(m.role), "agent": m.agent, "content": m.content} for m in messages]


def a2a_message(request: types_pb2.ChatRequest) -> Message:
    """The A2A message for a mesh turn or handoff (context id = conversation id)."""
    kind = request.WhichOneof("kind")
    meta: dict[str, Any]
    if kind == "turn":
        turn = request.turn
        conversation, text = turn.conversation_id, turn.message
        meta = {
            "turn_id": turn.turn_id,
            "history": _history(turn.history),
            "context": dict(turn.context),
            "hop_path": list(turn.hop.hop_path),
            "hops_remaining": turn.hop.hops_remaining,
        }
    elif kind == "handoff":
        handoff = request.handoff
        conversation, text = handoff.conversation_id, handoff.message
        meta = {
            "turn_id": handoff.turn_id,
            "mode": types_pb2.HandoffMode.Name(handoff.mode),
            "source_agent": handoff.source_agent,
            "reason": handoff.reason,
            "history": _history(handoff.history),
            "context": dict(handoff.context),
            "hop_path": list(handoff.hop_path),
            "hops_remaining": handoff.hops_remaining,
        }
    else:
        raise Unavailable(f"an A2A agent cannot open a turn with {kind!r}")
    message = Message(
        message_id=uuid.uuid4().hex,
        context_id=conversation,
        role=Role.ROLE_USER,
        parts=[Part(text=text)],
    )
    ParseDict({"mesh": meta}, message.metadata)
    return message


class A2aCall:
    """One turn at a remote A2A agent, read as serialized ChatEvents."""

    def __init__(self, remote: RemoteAgent, request: types_pb2.ChatRequest, hop: HopCall) -> None:
        self.remote = remote
        self.agent = remote.name
        self.address = remote.config.url
        self._hop = hop
        self._request = request
        turn = request.turn if request.WhichOneof("kind") == "turn" else request.handoff
        self._conversation = turn.conversation_id
        self._turn_id = turn.turn_id
        self._events: asyncio.Queue[bytes | MeshError | object] = asyncio.Queue()
        self._seq = 0
        self._text: list[str] = []
        self._task_id = ""
        self._done = False
        self._pump: asyncio.Task[None] | None = None

    def _context(self) -> ClientCallContext:
        params = {"Authorization": f"Bearer {self._hop.token}"} if self._hop.token else None
        timeout = self.remote.config.timeout_s
        if self._hop.timeout is not None:
            timeout = min(timeout, self._hop.timeout)
        return ClientCallContext(service_parameters=params, timeout=timeout)

    def _event(self, **kind: Any) -> bytes:
        self._seq += 1
        event = types_pb2.ChatEvent(
            agent=self.agent,
            seq=self._seq,
            conversation_id=self._conversation,
            turn_id=self._turn_id,
            **kind,
        )
        return event.SerializeToString()

    def start(self) -> None:
        self._pump = asyncio.ensure_future(self._run())

    async def _stream(self) -> AsyncGenerator[StreamResponse, None]:
        client = await self.remote.client()
        request = SendMessageRequest(message=a2a_message(self._request))
        async for response in client.send_message(request, context=self._context()):
            yield response

    async def _run(self) -> None:
        try:
            async with contextlib.aclosing(self._stream()) as stream:
                async for response in stream:
                    if self._on(response):
                        return  # the remote task ended: close its event stream now
            self._events.put_nowait(
                Unavailable(f"A2A agent {self.agent} ended its stream before its task ended")
            )
        except MeshError as err:
            self._events.put_nowait(err)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the SDK's errors, mapped in one place
            self._events.put_nowait(from_a2a_error(err, self.agent))

    def _on(self, response: StreamResponse) -> bool:
        """Translate one A2A event; True once the remote task has ended."""
        kind = response.WhichOneof("payload")
        if kind == "task":
            self._task_id = response.task.id
            return self._status(response.task.status.state, response.task.status.message)
        if kind == "artifact_update":
            self._task_id = response.artifact_update.task_id or self._task_id
            text = _text(response.artifact_update.artifact.parts)
            if text:
                self._text.append(text)
                self._events.put_nowait(self._event(delta=types_pb2.TextDelta(text=text)))
            return False
        if kind == "status_update":
            self._task_id = response.status_update.task_id or self._task_id
            status = response.status_update.status
            return self._status(status.state, status.message)
        if kind == "message":  # a direct answer, no task
            self._final(_text(response.message.parts))
            return True
        return False

    def _status(self, state: Any, message: Message) -> bool:
        if state not in _TERMINAL:
            return False
        said = _text(message.parts)
        err = error_for_state(state, self.agent, said)
        if err is not None:
            self._events.put_nowait(err)
        else:
            self._final("".join(self._text) or said)
        return True

    def _final(self, content: str) -> None:
        self._done = True
        final = types_pb2.FinalMessage(content=content, stop_reason=types_pb2.STOP_REASON_END_TURN)
        self._events.put_nowait(self._event(final=final))
        self._events.put_nowait(_END)

    async def read(self) -> bytes | None:
        item = await self._events.get()
        if item is _END:
            return None
        if isinstance(item, MeshError):
            self._done = True
            raise item
        assert isinstance(item, bytes)
        return item

    async def send(self, request: types_pb2.ChatRequest) -> None:
        if request.WhichOneof("kind") == "cancel":
            self.finish(False)  # CONSULT results never come: an A2A agent does not consult

    def finish(self, reusable: bool) -> None:
        """The turn is over: stop reading and, if the task still runs, cancel it."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        if not self._done and self._task_id:
            self._done = True
            self.remote.cancel_later(self._task_id, self._context())


class RemoteAgent:
    """One remote A2A agent: its card (fetched once) and an SDK client over pooled HTTP."""

    def __init__(self, name: str, config: A2aRemoteConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self.config = config
        self._http = http
        self._client: Client | None = None
        self._card: AgentCard | None = None
        self._lock = asyncio.Lock()
        self._cancels: set[asyncio.Task[None]] = set()

    async def client(self) -> Client:
        async with self._lock:
            if self._client is None:
                try:
                    resolver = A2ACardResolver(self._http, self.config.url)
                    self._card = await resolver.get_agent_card(
                        http_kwargs={"timeout": _CARD_TIMEOUT_S}
                    )
                except Exception as err:  # noqa: BLE001 - mapped in one place
                    raise from_a2a_error(err, self.name) from None
                factory = ClientFactory(ClientConfig(streaming=True, httpx_client=self._http))
                self._client = factory.create(self._card)
            return self._client

    def cancel_later(self, task_id: str, context: ClientCallContext) -> None:
        task = asyncio.ensure_future(self._cancel(task_id, context))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, task_id: str, context: ClientCallContext) -> None:
        context.timeout = _CANCEL_TIMEOUT_S
        try:
            client = await self.client()
            await client.cancel_task(CancelTaskRequest(id=task_id), context=context)
        except Exception as err:  # noqa: BLE001 - a task that already ended is fine
            log.info(
                "cancel of task at A2A agent %s: %s", self.name, from_a2a_error(err, self.name)
            )

    async def aclose(self) -> None:
        for task in list(self._cancels):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                    await task
        if self._client is not None:
            await self._client.close()


class A2aAgents:
    """The A2A adapter of the agent-stream port."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), trust_env=False)
        self.agents = {
            name: RemoteAgent(name, agent.a2a, self._http)
            for name, agent in config.agents.items()
            if agent.a2a is not None
        }

    def __contains__(self, agent: object) -> bool:
        return agent in self.agents

    async def open(
        self, agent: str, request: types_pb2.ChatRequest, hop: HopCall
    ) -> tuple[AgentCall, bytes]:
        if hop.history is not None:  # an A2A agent keeps nothing: the whole history, always
            body = history_body(request)
            del body.history[:]
            body.history.extend(message_to_pb(m) for m in hop.history)
        call = A2aCall(self.agents[agent], request, hop)
        call.start()
        try:
            first = await call.read()
        except BaseException:
            call.finish(False)
            raise
        if first is None:
            raise Unavailable(f"A2A agent {agent} ended without an event")
        return call, first

    async def aclose(self) -> None:
        for remote in self.agents.values():
            await remote.aclose()
        await self._http.aclose()


class MeshStreams:
    """The composite port: remote A2A agents by config, the gRPC pool for the rest."""

    def __init__(self, grpc_streams: AgentStreams, a2a_agents: A2aAgents) -> None:
        self.grpc = grpc_streams
        self.a2a = a2a_agents

    async def open(
        self, agent: str, request: types_pb2.ChatRequest, hop: HopCall
    ) -> tuple[AgentCall, bytes]:
        if agent in self.a2a:
            return await self.a2a.open(agent, request, hop)
        return await self.grpc.open(agent, request, hop)


__all__ = ["A2aAgents", "A2aCall", "MeshStreams", "RemoteAgent", "a2a_message"]
