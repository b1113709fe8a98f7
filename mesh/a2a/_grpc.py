"""The A2A gRPC binding of the edge: the SDK's ``A2AService`` on one mesh gRPC server.

One server serves every agent: the A2A ``tenant`` of a request names the agent or
sequence ("" is the mesh itself, routed by the router's rules), and each card lists
its gRPC interface with its tenant, so the SDK client fills it in. The mesh's own
server interceptors validate the bearer (audience ``auth.audience_for("a2a")``): a
missing or bad token ends the call UNAUTHENTICATED, as the spec's gRPC binding says.
The server is a :class:`~mesh.server.MeshServer` (health, reflection, limits, drain).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import (
    GrpcHandler,
    GrpcServerCallContextBuilder,
    RequestHandler,
)
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.utils.errors import InvalidParamsError

from mesh.a2a._auth import _STATE_TOKEN, Bearer, MeshUser
from mesh.config import MeshConfig
from mesh.context import current_principal, current_token
from mesh.interceptors import server_interceptors
from mesh.interceptors import service_credentials as server_credentials
from mesh.lifecycle import Lifecycle
from mesh.server import MeshServer, Service

A2A_GRPC_SERVICE = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name


class _GrpcContexts(GrpcServerCallContextBuilder):
    """The call context from what the mesh's auth interceptor validated."""

    def build(self, context: grpc.aio.ServicerContext[Any, Any]) -> ServerCallContext:
        principal = current_principal.get()
        return ServerCallContext(
            user=MeshUser(principal.subject if principal else ""),
            state={_STATE_TOKEN: Bearer(current_token.get()), "grpc_context": context},
        )


class TenantHandlers(RequestHandler):
    """Sends each request to the handler of the agent its ``tenant`` names."""

    def __init__(self, handlers: Mapping[str, RequestHandler]) -> None:
        self.handlers = handlers

    def _for(self, params: Any) -> RequestHandler:
        handler = self.handlers.get(getattr(params, "tenant", ""))
        if handler is None:
            known = ", ".join(sorted(n for n in self.handlers if n))
            raise InvalidParamsError(f"no agent {params.tenant!r} (known: {known})")
        return handler

    async def on_get_task(self, params: Any, context: ServerCallContext) -> Any:
        return await self._for(params).on_get_task(params, context)

    async def on_list_tasks(self, params: Any, context: ServerCallContext) -> Any:
        return await self._for(params).on_list_tasks(params, context)

    async def on_cancel_task(self, params: Any, context: ServerCallContext) -> Any:
        return await self._for(params).on_cancel_task(params, context)

    async def on_message_send(self, params: Any, context: ServerCallContext) -> Any:
        return await self._for(params).on_message_send(params, context)

    async def on_message_send_stream(
        self, params: Any, context: ServerCallContext
    ) -> AsyncGenerator[Any, None]:
        async for event in self._for(params).on_message_send_stream(params, context):
            yield event

    async def on_subscribe_to_task(
        self, params: Any, context: ServerCallContext
    ) -> AsyncGenerator[Any, None]:
        async for event in self._for(params).on_subscribe_to_task(params, context):
            yield event

    async def on_create_task_push_notification_config(
        self, params: Any, context: ServerCallContext
    ) -> Any:
        return await self._for(params).on_create_task_push_notification_config(params, context)

    async def on_get_task_push_notification_config(
        self, params: Any, context: ServerCallContext
    ) -> Any:
        return await self._for(params).on_get_task_push_notification_config(params, context)

    async def on_list_task_push_notification_configs(
        self, params: Any, context: ServerCallContext
    ) -> Any:
        return await self._for(params).on_list_task_push_notification_configs(params, context)

    async def on_delete_task_push_notification_config(
        self, params: Any, context: ServerCallContext
    ) -> Any:
        return await self._for(params).on_delete_task_push_notification_config(params, context)

    async def on_get_extended_agent_card(self, params: Any, context: ServerCallContext) -> Any:
        return await self._for(params).on_get_extended_agent_card(params, context)


def build_grpc_server(config: MeshConfig, handlers: Mapping[str, RequestHandler]) -> MeshServer:
    """The edge's gRPC server (start it with ``await server.start(host, port)``)."""
    servicer = GrpcHandler(TenantHandlers(handlers), _GrpcContexts())
    lifecycle = Lifecycle(config.server.max_concurrent_streams)

    def add(server: grpc.aio.Server) -> None:
        add_servicer: Any = a2a_pb2_grpc.add_A2AServiceServicer_to_server  # untyped upstream
        add_servicer(servicer, server)

    return MeshServer(
        config.server,
        [Service(A2A_GRPC_SERVICE, add)],
        interceptors=server_interceptors(config, "a2a"),
        lifecycle=lifecycle,
        label="a2a",
        server_credentials=server_credentials(config, "a2a"),
    )
