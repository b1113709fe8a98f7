"""``mesh.v1.Router`` over the turn engine: a thin adapter plus stream mechanics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from mesh.agent._servicer import abort_with
from mesh.config import MeshConfig
from mesh.context import MD_AUTHORIZATION, check_conversation_id, current_hop_path
from mesh.errors import InvalidArgument, MeshError, NotFound
from mesh.interceptors import text_metadata
from mesh.router._engine import Router, StreamCache, TurnState
from mesh.router._pool import AgentPool
from mesh.server import Lifecycle, next_request
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

log = logging.getLogger("mesh.router")

_EOF = object()
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class _Done:
    final: types_pb2.ChatEvent | None = None
    error: MeshError | None = None


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self, config: MeshConfig, router: Router, pool: AgentPool, lifecycle: Lifecycle
    ) -> None:
        self.config = config
        self.router = router
        self.pool = pool
        self.lifecycle = lifecycle

    # -- Chat ------------------------------------------------------------------------

    async def Chat(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[types_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        try:
            async with self.lifecycle.work():
                async for event in _ChatStream(self, context).run(request_iterator):
                    yield event
        except MeshError as err:
            await abort_with(context, err)

    # -- listing ---------------------------------------------------------------------

    def _entry(self, name: str) -> router_pb2.AgentEntry:
        info = self.pool.infos.get(name)
        if info is None:
            configured = self.config.agents.get(name)
            info = types_pb2.AgentInfo(
                name=name, description=configured.description if configured else ""
            )
        endpoints = [
            router_pb2.Endpoint(
                address=e.address,
                health=e.health,
                source=",".join(sorted(e.sources)),
                active_streams=max(0, e.active),
            )
            for e in self.pool.endpoints.get(name, {}).values()
        ]
        return router_pb2.AgentEntry(info=info, endpoints=endpoints)

    async def ListAgents(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.ListAgentsResponse:
        names = sorted(self.pool.endpoints)
        return router_pb2.ListAgentsResponse(agents=[self._entry(n) for n in names])

    async def DescribeAgent(  # noqa: N802 - gRPC method name
        self, request: router_pb2.DescribeAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> types_pb2.AgentInfo:
        if request.name not in self.pool.endpoints and request.name not in self.config.agents:
            await abort_with(context, NotFound(f"no agent named {request.name!r}", field="name"))
        return self._entry(request.name).info

    # -- Register --------------------------------------------------------------------

    async def Register(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[router_pb2.RegisterRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_pb2.RegisterResponse]:
        if not self.config.router.discovery.registration:
            await abort_with(context, MeshError("registration is turned off on this router"))
        registered: tuple[str, str] | None = None
        try:
            async for request in request_iterator:
                if registered is not None:
                    continue  # later messages are keep-alives
                if not _NAME.match(request.name):
                    await abort_with(
                        context, InvalidArgument("name must be a valid agent name", field="name")
                    )
                if not _ADDRESS.match(request.address):
                    await abort_with(
                        context, InvalidArgument("address must be host:port", field="address")
                    )
                endpoint = await self.pool.add(request.name, request.address, "registered")
                registered = (request.name, request.address)
                timeout = self.config.router.connect_timeout_s
                if not await self.pool.wait_healthy(request.name, timeout) or not endpoint.healthy:
                    yield router_pb2.RegisterResponse(
                        accepted=False,
                        message=f"{request.address} did not report SERVING within {timeout:g}s",
                    )
                    return
                log.info("agent %s registered at %s", request.name, request.address)
                yield router_pb2.RegisterResponse(accepted=True, message="listed")
        finally:
            if registered is not None:
                await self.pool.remove(*registered, "registered")


class _ChatStream:
    def __init__(self, servicer: RouterServicer, context: grpc.aio.ServicerContext[Any, Any]):
        self.s = servicer
        self.context = context
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.turn_task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self.seq = 0
        router_config = servicer.config.router
        keep, most = router_config.keep_agent_streams_s, router_config.keep_agent_streams_max
        self.streams = StreamCache(keep, most) if keep > 0 and most > 0 else None

    async def _read(self, requests: AsyncIterator[types_pb2.ChatRequest]) -> None:
        first = True
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if first and kind != "turn":
                    raise InvalidArgument("the first request must carry `turn`", field="turn")
                first = False
                if kind == "turn":
                    if not request.turn.message.strip():
                        raise InvalidArgument(
                            "turn.message is required: the user's message", field="turn.message"
                        )
                    check_conversation_id(request.turn.conversation_id, "turn.conversation_id")
                    self.inbox.put_nowait(request.turn)
                elif kind == "cancel":
                    if self.turn_task is not None and not self.turn_task.done():
                        self.cancel_requested = True
                        self.turn_task.cancel()
                else:
                    raise InvalidArgument(
                        "clients send `turn` or `cancel`; `consult_result` is the router's own",
                        field="kind",
                    )
        except MeshError as err:
            self.inbox.put_nowait(err)
        finally:
            self.inbox.put_nowait(_EOF)

    def _stamp(self, event: types_pb2.ChatEvent, state: TurnState) -> types_pb2.ChatEvent:
        self.seq += 1
        event.seq = self.seq
        event.conversation_id = state.conversation_id
        event.turn_id = state.turn_id
        return event

    async def _turn(self, state: TurnState, target: str, out: asyncio.Queue[object]) -> None:
        try:
            final = await self.s.router.run_turn(state, target)
            out.put_nowait(_Done(final=final))
        except asyncio.CancelledError:
            if self.cancel_requested:
                self.cancel_requested = False
                out.put_nowait(
                    _Done(
                        final=types_pb2.ChatEvent(
                            agent=state.path[-1] if state.path else "",
                            final=types_pb2.FinalMessage(
                                stop_reason="cancelled", hop_path=state.path
                            ),
                        )
                    )
                )
                return
            raise
        except MeshError as err:
            out.put_nowait(_Done(error=err))
        except Exception:
            log.exception("turn failed in the router")
            out.put_nowait(_Done(error=MeshError("internal error in the router")))

    async def run(
        self, requests: AsyncIterator[types_pb2.ChatRequest]
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        router = self.s.router
        metadata = text_metadata(self.context.invocation_metadata())
        metadata.pop(MD_AUTHORIZATION, None)  # routes match on metadata; never on a token
        reader = asyncio.ensure_future(self._read(requests))
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await next_request(
                    self.inbox, self.s.lifecycle, self.s.config.server.idle_stream_timeout_s
                )
                if item is _EOF:
                    return
                if isinstance(item, MeshError):
                    raise item
                assert isinstance(item, types_pb2.Turn)
                conversation = item.conversation_id or uuid.uuid4().hex
                store = router.store
                limit = self.s.config.router.store.history_limit
                history, active = await store.load(conversation, limit)
                target = router.choose(item, metadata, active)
                remaining = self.context.time_remaining()
                budget = self.s.config.router.default_deadline_s if remaining is None else remaining
                out: asyncio.Queue[object] = asyncio.Queue()
                incoming = list(current_hop_path.get())
                state = TurnState(
                    conversation_id=conversation,
                    turn_id=item.turn_id or uuid.uuid4().hex[:12],
                    message=item.message,
                    context=dict(item.context),
                    history=history,
                    emit=out.put_nowait,
                    deadline=loop.time() + budget,
                    path=incoming,
                    hops=len(incoming),
                    streams=self.streams,
                )
                self.turn_task = asyncio.ensure_future(self._turn(state, target, out))
                while True:
                    event = await out.get()
                    if isinstance(event, _Done):
                        break
                    assert isinstance(event, types_pb2.ChatEvent)
                    yield self._stamp(event, state)
                if event.error is not None:
                    err = event.error
                    yield self._stamp(
                        types_pb2.ChatEvent(
                            agent=state.path[-1] if state.path else "router",
                            error=types_pb2.ErrorEvent(
                                code=err.code.name, message=err.message, reason=err.reason
                            ),
                        ),
                        state,
                    )
                    raise err
                assert event.final is not None
                yield self._stamp(event.final, state)
                if event.final.final.stop_reason == "end_conversation":
                    return
        finally:
            reader.cancel()
            if self.turn_task is not None and not self.turn_task.done():
                self.turn_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.turn_task
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self.streams is not None:
                await self.streams.close()
