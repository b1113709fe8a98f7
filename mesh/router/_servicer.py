"""``mesh.v1.RouterService`` over the turn engine: a thin adapter.

Chat streams run on the shared turn-stream plumbing (:mod:`mesh.streams`); the
engine's relayed events may be the agent's own bytes, so the Router service is
registered with a serializer that passes bytes through (:func:`add_router_service`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from mesh import telemetry
from mesh.config import MeshConfig
from mesh.context import (
    MD_AUTHORIZATION,
    check_conversation_id,
    current_hop_path,
    current_principal,
    current_request_id,
    current_token,
    current_trace_context,
)
from mesh.convert import error_code
from mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from mesh.interceptors import text_metadata
from mesh.lifecycle import Lifecycle
from mesh.logs import safe_text
from mesh.router._core import HopBudget
from mesh.router._engine import Router
from mesh.router._owners import conversation_key, user_key
from mesh.router._pool import AgentPool
from mesh.router._registration import authorize_registration
from mesh.router._requests import window_history
from mesh.router._turn import TurnState
from mesh.router._wire import encode_seq
from mesh.streams import (
    Emitter,
    TurnEnd,
    TurnStream,
    abort_with,
    refuse_after_first,
    serve_stream,
)
from mesh.v1 import router_pb2, router_pb2_grpc, types_pb2

log = logging.getLogger("mesh.router")

_SOURCES = {
    "static": types_pb2.ENDPOINT_SOURCE_STATIC,
    "registered": types_pb2.ENDPOINT_SOURCE_REGISTERED,
    "dns": types_pb2.ENDPOINT_SOURCE_DNS,
}
_REFUSALS = ("HOP_BUDGET_EXCEEDED", "HANDOFF_CYCLE")


@dataclass
class _Pending:
    """A turn as accepted from the wire, and its state once it runs."""

    turn: types_pb2.Turn
    state: TurnState | None = None


class _ChatStream(TurnStream[types_pb2.ChatRequest, _Pending]):
    def __init__(
        self, servicer: RouterServicer, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        server = servicer.config.server
        super().__init__(servicer.lifecycle, server.idle_stream_timeout_s, server.max_message_bytes)
        self.s = servicer
        self.context = context
        metadata = text_metadata(context.invocation_metadata())
        metadata.pop(MD_AUTHORIZATION, None)  # routes match on metadata; never on a token
        self.metadata = metadata
        self.trace = current_trace_context.get({})
        self.request_id = current_request_id.get() or uuid.uuid4().hex[:16]
        self.token = current_token.get()
        self.principal = current_principal.get()
        self.incoming = servicer.trusted_hop_path()
        self.current: _Pending | None = None
        self._answers: set[asyncio.Task[None]] = set()
        self.client_done = False
        """The client half-closed (its later turns' approvals are denied at once)."""

    def accept(self, request: types_pb2.ChatRequest, first: bool) -> _Pending | None:
        kind = request.WhichOneof("kind")
        if first and kind != "turn":
            raise InvalidArgument("the first request must carry `turn`", field="turn")
        if kind == "turn":
            if not request.turn.message.strip():
                raise InvalidArgument(
                    "turn.message is required: the user's message", field="turn.message"
                )
            check_conversation_id(request.turn.conversation_id, "turn.conversation_id")
            return _Pending(request.turn)
        if kind == "cancel":
            self.cancel_turn()
            return None
        if kind == "approval":
            task = asyncio.ensure_future(self._approve(request.approval))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)
            return None
        raise InvalidArgument(
            "clients send `turn`, `cancel` or `approval`; the other requests are the router's own",
            field="kind",
        )

    def requests_ended(self) -> None:
        self.client_done = True
        task = asyncio.ensure_future(self._deny_unanswerable())
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _deny_unanswerable(self) -> None:
        """Answers the client wrote before it half-closed go through first."""
        await asyncio.gather(*[t for t in self._answers if t is not asyncio.current_task()])
        state = self.current.state if self.current is not None else None
        if state is not None:
            await self.s.router.deny_unanswerable(state)

    async def _approve(self, answer: types_pb2.ApprovalAnswer) -> None:
        """Pass an approval answer to the agent stream of the turn in flight that asked."""
        pending = self.current
        state = pending.state if pending is not None else None
        if state is None or not await self.s.router.answer_approval(state, answer):
            log.info("approval answer for unknown request %r ignored", answer.approval_id[:64])

    async def produce(self, pending: _Pending, emitter: Emitter) -> TurnEnd:
        s = self.s
        item = pending.turn
        conversation = item.conversation_id or uuid.uuid4().hex
        key = conversation_key(conversation, self.principal)
        store = s.config.router.store
        history, active = await s.router.store.load(key, store.history_limit)
        budget_bytes = min(store.history_max_bytes, s.config.server.max_message_bytes // 2)
        size = len(item.message.encode())
        if size > budget_bytes:
            raise ResourceExhausted(
                f"turn.message is {size} bytes; the limit is {budget_bytes} "
                "(router.store.history_max_bytes, at most half of server.max_message_bytes)",
                field="turn.message",
            )
        history, dropped = window_history(history, budget_bytes - size)
        remaining = self.context.time_remaining()
        budget = s.config.router.default_deadline_s if remaining is None else remaining
        state = TurnState(
            conversation_id=conversation,
            turn_id=item.turn_id or uuid.uuid4().hex[:12],
            message=item.message,
            context=dict(item.context),
            history=history,
            emit=emitter.emit,
            deadline=asyncio.get_running_loop().time() + budget,
            budget=HopBudget.incoming(self.incoming),
            request_id=self.request_id,
            trace_context=self.trace,
            subject_token=self.token,
            history_dropped=dropped,
            answerable=not self.client_done,
            store_key=key,
        )
        pending.state = state
        self.current = pending
        try:
            final = await self._run(state, item.agent, active, budget)
        finally:
            self.current = None  # an idle stream keeps nothing of its last turn
        return TurnEnd(
            final=final, last=final.final.stop_reason == types_pb2.STOP_REASON_END_CONVERSATION
        )

    async def _run(
        self, state: TurnState, named: str, active: str, budget: float
    ) -> types_pb2.ChatEvent:
        """Route and run the turn within its budget, in its span (when tracing), counted in
        metrics."""
        span = None
        started = state.started = time.perf_counter()
        agent, outcome = "", "error"  # "": no agent chosen yet (labelled below)
        try:
            async with asyncio.timeout(budget):
                target = agent = await self.s.router.choose(state, named, self.metadata, active)
                if telemetry.state.tracing:
                    span = telemetry.tracing.router_turn_span(
                        self.trace, state.conversation_id, self.request_id, target
                    )
                with telemetry.tracing.scope(span):
                    log.debug("turn %s of %s to %s", state.turn_id, state.conversation_id, target)
                    final = await self.s.router.run_turn(state, target)
            agent, outcome = final.agent, "ok"
        except TimeoutError:
            outcome = "DEADLINE_EXCEEDED"
            raise DeadlineExceeded(f"turn did not finish within {budget:.3g}s") from None
        except MeshError as err:
            outcome = err.reason or err.code.name
            if outcome in _REFUSALS:
                telemetry.metrics.refusals.labels(outcome).inc()
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            agent = agent or self._label(named)  # only a turn that failed before routing
            metrics = telemetry.metrics
            metrics.turns.labels("router", agent, outcome).inc()
            metrics.turn_duration.labels("router", agent).observe(time.perf_counter() - started)
        return final

    def _label(self, named: str) -> str:
        """The metrics label for the agent a client named: a name the router does not
        know is "unknown" (a client's free text must not mint a series per value)."""
        if not named:
            return "router"
        known = self.s.pool.endpoints.keys() | self.s.config.agents.keys()
        return named if named in known or named in self.s.config.router.sequences else "unknown"

    def _agent(self, pending: _Pending) -> str:
        path = pending.state.path if pending.state is not None else []
        return path[-1] if path else "router"

    def cancelled(self, pending: _Pending) -> types_pb2.ChatEvent:
        path = pending.state.path if pending.state is not None else []
        return types_pb2.ChatEvent(
            agent=self._agent(pending),
            final=types_pb2.FinalMessage(
                stop_reason=types_pb2.STOP_REASON_CANCELLED, hop_path=path
            ),
        )

    def failed(self, pending: _Pending, err: MeshError) -> types_pb2.ChatEvent:
        return types_pb2.ChatEvent(
            agent=self._agent(pending),
            error=types_pb2.ErrorEvent(
                code=error_code(err.code.name), message=err.message, reason=err.reason
            ),
        )

    def stamp(self, event: types_pb2.ChatEvent | bytes, pending: _Pending) -> Any:
        self.seq += 1
        if isinstance(event, bytes):
            return event + encode_seq(self.seq)  # the agent set conversation and turn ids
        event.seq = self.seq
        if pending.state is not None:
            event.conversation_id = pending.state.conversation_id
            event.turn_id = pending.state.turn_id
        else:
            event.conversation_id = pending.turn.conversation_id
            event.turn_id = pending.turn.turn_id
        return event


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self, config: MeshConfig, router: Router, pool: AgentPool, lifecycle: Lifecycle
    ) -> None:
        self.config = config
        self.router = router
        self.pool = pool
        self.lifecycle = lifecycle
        self._user_streams: dict[str, int] = {}
        """Chat streams open per user (auth on), for ``router.max_streams_per_user``."""
        auth = config.auth
        self._mesh_clients = (
            {auth.client_id_for(a) for a in config.agents} | {auth.client_id_for("router")}
            if auth.enabled
            else set()
        )

    def trusted_hop_path(self) -> tuple[str, ...]:
        """The incoming hop path, when the caller authenticated as a mesh service.

        An end user's path starts empty: a forged ``x-mesh-hop-path`` neither spends
        budget nor reaches agents' audit lines.
        """
        path = current_hop_path.get()
        if not path:
            return ()
        principal = current_principal.get()
        if principal is None:
            return ()
        client = str(principal.claims.get("azp") or principal.claims.get("client_id") or "")
        return path if client and client in self._mesh_clients else ()

    # -- Chat --------------------------------------------------------------------------

    async def Chat(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[types_pb2.ChatRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[types_pb2.ChatEvent]:
        stream = _ChatStream(self, context)
        user = user_key(stream.principal)
        limit = self.config.router.max_streams_per_user
        if user and limit and self._user_streams.get(user, 0) >= limit:
            await refuse_after_first(request_iterator)
            await abort_with(context, _too_many(limit))
        self._user_streams[user] = self._user_streams.get(user, 0) + 1
        try:
            async for event in serve_stream(stream, request_iterator, context):
                yield event
        finally:
            left = self._user_streams.pop(user) - 1
            if left:
                self._user_streams[user] = left

    # -- listing -----------------------------------------------------------------------

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
                health=e.health_pb,
                sources=sorted(_SOURCES[s] for s in e.sources),
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
    ) -> router_pb2.DescribeAgentResponse:
        if request.name not in self.pool.endpoints and request.name not in self.config.agents:
            await abort_with(
                context, NotFound(f"no agent named {safe_text(request.name)!r}", field="name")
            )
        return router_pb2.DescribeAgentResponse(info=self._entry(request.name).info)

    # -- Register ----------------------------------------------------------------------

    async def Register(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[router_pb2.RegisterRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_pb2.RegisterResponse]:
        registered: tuple[str, str] | None = None
        try:
            async for request in request_iterator:
                if registered is not None:
                    continue  # later messages are keep-alives
                if not self.config.router.discovery.registration:
                    raise PermissionDenied("registration is turned off on this router")
                authorize_registration(self.config, self.pool, request, context.peer())
                endpoint = await self.pool.add(request.name, request.address, "registered")
                registered = (request.name, request.address)
                timeout = self.config.router.connect_timeout_s
                if not await self.pool.wait_endpoint(endpoint, timeout):
                    yield router_pb2.RegisterResponse(
                        accepted=False,
                        message=f"{request.address} did not report SERVING within {timeout:g}s",
                    )
                    return
                log.info("agent %s registered at %s", request.name, request.address)
                yield router_pb2.RegisterResponse(accepted=True, message="listed")
        except MeshError as err:
            await abort_with(context, err)
        finally:
            if registered is not None:
                await self.pool.remove(*registered, "registered")


def _too_many(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"this user already has {limit} Chat streams open (router.max_streams_per_user); "
        "close one, or send the next turn on an open stream"
    )


def _serialize_event(event: types_pb2.ChatEvent | bytes) -> bytes:
    return event if isinstance(event, bytes) else event.SerializeToString()


def add_router_service(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """Register ``mesh.v1.RouterService``; Chat's events may be relayed bytes."""
    handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Chat": grpc.stream_stream_rpc_method_handler(
            servicer.Chat,
            request_deserializer=types_pb2.ChatRequest.FromString,
            response_serializer=_serialize_event,
        ),
        "ListAgents": grpc.unary_unary_rpc_method_handler(
            servicer.ListAgents,
            request_deserializer=router_pb2.ListAgentsRequest.FromString,
            response_serializer=router_pb2.ListAgentsResponse.SerializeToString,
        ),
        "DescribeAgent": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeAgent,
            request_deserializer=router_pb2.DescribeAgentRequest.FromString,
            response_serializer=router_pb2.DescribeAgentResponse.SerializeToString,
        ),
        "Register": grpc.stream_stream_rpc_method_handler(
            servicer.Register,
            request_deserializer=router_pb2.RegisterRequest.FromString,
            response_serializer=router_pb2.RegisterResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("mesh.v1.RouterService", dict(handlers)),)
    )
