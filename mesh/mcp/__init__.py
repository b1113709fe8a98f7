"""MCP on both sides of the mesh.

- Agents use tools from MCP servers (:class:`McpToolset`, wired by
  :func:`attach_toolset` from ``build_runtime``);
- ``mesh mcp`` serves the mesh's agents as MCP tools (:mod:`mesh.mcp._serve`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mesh.mcp._schema import render_result, schema_problem, tool_name
from mesh.mcp._tools import McpServerConnection, McpTool, MetaProvider
from mesh.mcp._toolset import McpToolset, reserved_names

if TYPE_CHECKING:
    from mesh.agent._runtime import AgentRuntime
    from mesh.server import MeshServer

log = logging.getLogger("mesh.mcp")

_TOOLSETS: weakref.WeakKeyDictionary[AgentRuntime, McpToolset] = weakref.WeakKeyDictionary()


def attach_toolset(runtime: AgentRuntime, *, meta: MetaProvider | None = None) -> McpToolset:
    """Add the agent's MCP tools to ``runtime.tools`` (beside its function tools).

    Nothing starts yet: :func:`bind_server` starts the sessions with the agent's server
    (or call :meth:`McpToolset.start` when running the runtime without one).
    """
    toolset = McpToolset(
        runtime.mesh,
        runtime.name,
        runtime.tools,
        reserved=reserved_names(runtime.mesh, runtime.name),
        meta=meta,
    )
    _TOOLSETS[runtime] = toolset
    return toolset


def toolset_of(runtime: AgentRuntime) -> McpToolset | None:
    """The MCP toolset attached to ``runtime`` (None when the agent has no MCP servers)."""
    return _TOOLSETS.get(runtime)


def bind_server(runtime: AgentRuntime, server: MeshServer, services: Sequence[str]) -> None:
    """Start the agent's MCP sessions with its server; required MCP servers drive its
    health (NOT_SERVING while one is down, the reason in the log)."""
    toolset = _TOOLSETS.get(runtime)
    if toolset is None:
        return

    async def report(serving: bool, reason: str) -> None:
        if not serving:
            log.error("agent %s NOT_SERVING: required MCP server down (%s)", runtime.name, reason)
        for name in ("", *services):
            await server.set_serving(name, serving)

    toolset.on_health = report
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # started by whoever runs the loop (McpToolset.start)
    toolset.start()


async def close_toolset(runtime: AgentRuntime) -> None:
    """Stop the agent's MCP sessions (stdio children exit)."""
    toolset = _TOOLSETS.pop(runtime, None)
    if toolset is not None:
        await toolset.aclose()


__all__ = [
    "McpServerConnection",
    "McpTool",
    "McpToolset",
    "MetaProvider",
    "attach_toolset",
    "bind_server",
    "close_toolset",
    "render_result",
    "reserved_names",
    "schema_problem",
    "tool_name",
    "toolset_of",
]
