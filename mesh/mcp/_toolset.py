"""The MCP tools of one agent: its server connections, their tools, the names it may use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mesh.config import MeshConfig
from mesh.mcp._schema import tool_name
from mesh.mcp._tools import McpServerConnection, McpTool, MetaProvider

log = logging.getLogger("mesh.mcp")


class McpToolset:
    """An agent's MCP servers, publishing their tools into the runtime's tool map."""

    def __init__(
        self,
        mesh: MeshConfig,
        agent: str,
        tools: MutableMapping[str, Any],
        *,
        reserved: set[str] | None = None,
        meta: MetaProvider | None = None,
    ) -> None:
        self.mesh = mesh
        self.agent = agent
        self._tools = tools
        self._static = set(tools) | set(reserved or ())
        self._published: set[str] = set()
        self.on_health: Callable[[bool, str], Awaitable[None]] | None = None
        """Called with (serving, reason) when the required servers' state may have changed."""
        config = mesh.agent(agent)
        self.servers = [
            McpServerConnection(
                server, mesh, agent, on_tools=self._publish, on_state=self._health, meta=meta
            )
            for server in config.mcp_servers
        ]

    @property
    def healthy(self) -> bool:
        return all(s.state == "ready" for s in self.servers if s.config.required)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    async def wait_started(self, timeout: float | None = None) -> None:
        """Until every server has made its first attempt (connected or failed)."""
        limit = timeout or max((s.config.connect_timeout_s for s in self.servers), default=1.0)
        async with asyncio.timeout(limit + 5):
            for server in self.servers:
                await server.first_attempt.wait()

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()

    async def _health(self) -> None:
        if self.on_health is None or not any(s.config.required for s in self.servers):
            return  # optional servers never touch the agent's health
        down = [
            f"{s.name}: {s.last_error or s.state}"
            for s in self.servers
            if s.config.required and s.state != "ready"
        ]
        await self.on_health(not down, "; ".join(down))

    def _publish(self) -> None:
        """Rebuild the MCP entries of the tool map (prefixing names that clash)."""
        counts: dict[str, int] = {}
        for server in self.servers:
            for remote in server.remote_tools:
                base = tool_name(remote.name)
                counts[base] = counts.get(base, 0) + 1
        fresh: dict[str, McpTool] = {}
        for server in self.servers:
            for remote in server.remote_tools:
                base = tool_name(remote.name)
                name = base
                if counts[base] > 1 or base in self._static:
                    name = tool_name(f"{server.name}_{remote.name}")
                if name in fresh or name in self._static:
                    log.warning(
                        "MCP tool %s of %s clashes even prefixed; skipped", name, server.name
                    )
                    continue
                fresh[name] = McpTool(server, remote, name)
        for name in self._published - set(fresh):
            self._tools.pop(name, None)
        self._tools.update(fresh)
        self._published = set(fresh)


def reserved_names(mesh: MeshConfig, agent: str) -> set[str]:
    """Tool names the runtime uses for handoffs (an MCP tool never takes them)."""
    config = mesh.agent(agent)
    names = {"end_conversation"} if config.can_end_conversation else set()
    for handoff in config.handoffs:
        if "transfer" in handoff.modes:
            names.add(f"transfer_to_{handoff.target}")
        if "consult" in handoff.modes:
            names.add(f"ask_{handoff.target}")
    return names
