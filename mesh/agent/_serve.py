"""Build and run one agent's server from the mesh config."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import grpc

from mesh.agent._runtime import AgentRuntime
from mesh.agent._servicer import AgentServicer
from mesh.config import MeshConfig
from mesh.interceptors import server_interceptors
from mesh.interceptors import service_credentials as server_credentials
from mesh.lifecycle import Lifecycle
from mesh.providers.base import Provider, ProviderContext
from mesh.providers.registry import create_provider
from mesh.server import MeshServer, Service
from mesh.tools import load_tools
from mesh.v1 import agent_pb2, agent_pb2_grpc
from mesh.version import __version__

log = logging.getLogger("mesh.agent")

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def build_runtime(
    config: MeshConfig, name: str, *, provider: Provider | None = None
) -> AgentRuntime:
    """The runtime for agent ``name``: its provider (from config unless given) and tools."""
    agent = config.agent(name)
    if provider is None:
        provider = create_provider(
            agent.provider.kind,
            agent.provider.model,
            agent.provider.options,
            ProviderContext(agent=name, instructions=agent.instructions, environ=dict(os.environ)),
        )
    tools = load_tools(agent.tools, config.base_dir)
    runtime = AgentRuntime(agent, config, provider, tools, version=__version__)
    if agent.mcp_servers:
        from mesh.mcp import attach_toolset

        attach_toolset(runtime)  # MCP tools join runtime.tools (sessions: build_agent_server)
    return runtime


def build_agent_server(
    config: MeshConfig,
    name: str,
    *,
    provider: Provider | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[MeshServer, AgentRuntime]:
    """A ready-to-start server for one agent (``mesh agent`` and the tests use this)."""
    runtime = build_runtime(config, name, provider=provider)
    lifecycle = Lifecycle(config.server.max_concurrent_streams)
    servicer = AgentServicer(runtime, lifecycle, idle_timeout=config.server.idle_stream_timeout_s)
    add: Callable[[grpc.aio.Server], None] = lambda server: (  # noqa: E731
        agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    )
    server = MeshServer(
        config.server,
        [Service(AGENT_SERVICE, add)],
        interceptors=[*server_interceptors(config, name), *extra_interceptors],
        lifecycle=lifecycle,
        label=f"agent {name}",
        server_credentials=server_credentials(config, name),
    )
    if runtime.config.mcp_servers:
        from mesh.mcp import bind_server

        bind_server(runtime, server, [AGENT_SERVICE])  # sessions start; required ones gate health
    return server, runtime
