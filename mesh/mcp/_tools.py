"""MCP servers as tool sources of an agent (the client side).

Each configured server gets one :class:`McpServerConnection`: a supervisor task that
opens the transport (stdio child process, legacy SSE, or streamable HTTP), lists the
tools, and when the transport dies waits (backoff doubling up to a cap) and starts
again. Its tools are :class:`McpTool` objects with the same interface as
:class:`mesh.tools.FunctionTool` (``name``, ``description``, ``parameters``, ``spec``,
``async run(arguments, *, timeout)``), published into the agent runtime's tool map.

Every failure is a tool error the model sees: server down, call timeout, invalid
arguments, a malformed ``inputSchema``, an oversized result. Cancelling the awaiting
task (a cancelled turn) makes the SDK send ``notifications/cancelled`` on stdio/SSE
and abort the POST on streamable HTTP (the 2026-07-28 cancellation signal there).

Identity: a server with an ``audience`` gets, per call, a token for that resource
exchanged on behalf of the caller (sub = user, act = this agent); the incoming token
is never forwarded. Listing tools happens as the agent itself (client credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx2
import mcp_types
from jsonschema import Draft202012Validator
from jsonschema import ValidationError as SchemaValidationError
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from mesh.config import McpServerConfig, MeshConfig
from mesh.context import current_token
from mesh.mcp._listing import ListingGuard
from mesh.mcp._schema import render_result, schema_problem
from mesh.mcp._transport import _BEARER, _BearerAuth, _describe, _headers, _watched
from mesh.providers.base import ToolSpec
from mesh.tools import ToolOutcome

log = logging.getLogger("mesh.mcp")

State = Literal["connecting", "ready", "down", "closed"]


#: Trace-context seam: returns extra ``_meta`` for a tools/call (W3C traceparent etc.).
MetaProvider = Callable[[], Mapping[str, Any] | None]


class McpTool:
    """One tool of an MCP server, shaped like :class:`mesh.tools.FunctionTool`."""

    def __init__(self, server: McpServerConnection, remote: mcp_types.Tool, name: str) -> None:
        self.server = server
        self.remote_name = remote.name
        self.name = name
        self.problem = schema_problem(remote.input_schema)
        about = remote.description or remote.title or remote.name.replace("_", " ")
        self.description = f"{about} (MCP server {server.name})"
        if self.problem is None:
            self.parameters: dict[str, Any] = dict(remote.input_schema)
            self.parameters.setdefault("type", "object")
            self.parameters.setdefault("properties", {})
            self._validator: Draft202012Validator | None = Draft202012Validator(self.parameters)
        else:
            self.parameters = {"type": "object", "properties": {}}
            self.description += f" [unusable: {self.problem}]"
            self._validator = None

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    async def run(self, arguments: Mapping[str, Any], *, timeout: float) -> ToolOutcome:
        label = f"{self.name} (MCP server {self.server.name})"
        if self.problem is not None or self._validator is None:
            return ToolOutcome(f"{label} cannot be called: {self.problem}", True)
        try:
            self._validator.validate(dict(arguments))
        except SchemaValidationError as err:
            where = ".".join(str(p) for p in err.absolute_path) or "(arguments)"
            return ToolOutcome(f"invalid arguments for {self.name}: {where}: {err.message}", True)
        return await self.server.call(
            self.remote_name, dict(arguments), timeout=timeout, label=label
        )


class McpServerConnection:
    """One configured MCP server: its supervisor, its session and its tools."""

    def __init__(
        self,
        config: McpServerConfig,
        mesh: MeshConfig,
        agent: str,
        *,
        on_tools: Callable[[], None],
        on_state: Callable[[], Awaitable[None]],
        meta: MetaProvider | None = None,
    ) -> None:
        self.config = config
        self.mesh = mesh
        self.agent = agent
        self.name = config.name
        self._on_tools = on_tools
        self._on_state = on_state
        self._meta = meta
        self.state: State = "connecting"
        self.remote_tools: list[mcp_types.Tool] = []
        self.connects = 0
        """Sessions opened so far (a restart counter for tests and logs)."""
        self.last_error = ""
        self._client: Client | None = None
        self._ended = asyncio.Event()
        self._ready = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._service_token: tuple[str, float] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._skipped: set[tuple[str, str]] = set()
        """Malformed tools of its listings already logged (tool, problem)."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"mcp-{self.name}"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        self.state = "closed"
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _set_state(self, state: State, error: str = "") -> None:
        changed = state != self.state
        self.state = state
        if error:
            self.last_error = error
        if changed or state == "down":
            await self._on_state()

    async def _supervise(self) -> None:
        failures = 0
        while True:
            await self._set_state("connecting")
            self._ended = asyncio.Event()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    client = await self._open(stack)
                    await self._list_tools(client)
                    self._client = client
                    self.connects += 1
                    failures = 0
                    self._ready.set()
                    self.first_attempt.set()
                    log.info(
                        "MCP server %s (%s): connected, %d tools",
                        self.name,
                        self.config.transport,
                        len(self.remote_tools),
                    )
                    await self._set_state("ready")
                    await self._ended.wait()
                    self._ready.clear()
                    self._client = None
                    self.last_error = "the server went away"
            except asyncio.CancelledError:
                self._client = None
                raise
            except Exception as err:  # noqa: BLE001 - any failure means retry later
                self.last_error = _describe(err)
            finally:
                self._ready.clear()
                self._client = None
            failures += 1
            delay = min(
                self.config.restart_backoff_s * 2 ** (failures - 1),
                self.config.restart_backoff_max_s,
            )
            level = logging.ERROR if self.config.required else logging.WARNING
            log.log(
                level,
                "MCP server %s (%s) unavailable: %s; retrying in %.1fs",
                self.name,
                self.config.transport,
                self.last_error,
                delay,
            )
            self.first_attempt.set()
            await self._set_state("down")
            await asyncio.sleep(delay)  # backoff between restarts, not a synchronisation

    async def _open(self, stack: contextlib.AsyncExitStack) -> Client:
        cfg = self.config
        transport: Any
        if cfg.stdio is not None:
            command = sys.executable if cfg.stdio.command in ("python", "python3") else None
            cwd = cfg.stdio.cwd
            base = self.mesh.base_dir
            # Like function tools, server modules import from the config's folder first.
            path = [str(base), *filter(None, [os.environ.get("PYTHONPATH")])]
            workdir = (base / cwd) if cwd else base
            program = command or cfg.stdio.command
            if not _runnable(program, workdir):
                raise FileNotFoundError(f"no command {program!r} (its `command`) to start")
            params = StdioServerParameters(
                command=command or cfg.stdio.command,
                args=list(cfg.stdio.args),
                env={"PYTHONPATH": os.pathsep.join(path), **cfg.stdio.env},
                cwd=str(workdir),
            )
            transport = stdio_client(params)
        elif cfg.sse is not None:
            transport = sse_client(
                cfg.sse.url,
                headers=_headers(cfg.sse),
                timeout=cfg.connect_timeout_s,
                sse_read_timeout=max(300.0, cfg.call_timeout_s),
                auth=_BearerAuth(),
            )
        else:
            assert cfg.streamable_http is not None
            http = create_mcp_http_client(
                headers=_headers(cfg.streamable_http),
                auth=_BearerAuth(),
                timeout=httpx2.Timeout(cfg.connect_timeout_s, read=max(300.0, cfg.call_timeout_s)),
            )
            await stack.enter_async_context(http)
            transport = streamable_http_client(cfg.streamable_http.url, http_client=http)
        # The SDK's response cache is off: the tool list is cached here (cache_tools).
        guard = ListingGuard(self.name, self._skipped)
        client = Client(
            _watched(transport, self._ended, guard), message_handler=self._on_message, cache=None
        )
        guard.version = lambda: client.session.protocol_version
        token = _BEARER.set(await self._service_bearer())
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await stack.enter_async_context(client)
        except TimeoutError:
            raise TimeoutError(f"no session within {cfg.connect_timeout_s:g}s") from None
        finally:
            _BEARER.reset(token)
        return client

    async def _on_message(self, message: Any) -> None:
        # Re-list in a task: the notification handler runs inside the session's read loop,
        # which must keep reading for the listing's answer to arrive.
        client = self._client
        if isinstance(message, mcp_types.ToolListChangedNotification) and client is not None:
            task = asyncio.get_running_loop().create_task(self._relist(client))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _relist(self, client: Client) -> None:
        try:
            await self._list_tools(client)
        except Exception as err:  # noqa: BLE001 - the old list stays; the next connect re-lists
            log.info("MCP server %s: re-listing tools failed: %s", self.name, _describe(err))

    async def _list_tools(self, client: Client) -> None:
        token = _BEARER.set(await self._service_bearer())
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                listing = await client.list_tools()
        finally:
            _BEARER.reset(token)
        allowed = set(self.config.tools)
        tools = [t for t in listing.tools if not allowed or t.name in allowed]
        self.remote_tools = tools
        self._on_tools()

    # -- identity ----------------------------------------------------------------------

    async def _service_bearer(self) -> str | None:
        """The agent's own token for this server (listing tools happens as the agent)."""
        if not self.config.audience or not self.mesh.auth.enabled:
            return None
        from mesh.auth.exchange import exchanger_for

        now = time.time()
        if self._service_token is None or self._service_token[1] - 60 <= now:
            inner = exchanger_for(self.mesh, self.agent).inner
            self._service_token = await inner.client_token(self.config.audience)
        return self._service_token[0]

    async def _user_bearer(self) -> str | None:
        """A token for this server on behalf of the caller; never the incoming token."""
        if not self.config.audience or not self.mesh.auth.enabled:
            return None
        incoming = current_token.get()
        if not incoming:
            raise PermissionError("no caller token to delegate to this MCP server")
        from mesh.auth.exchange import exchanger_for

        exchanged = await exchanger_for(self.mesh, self.agent).token_for(
            incoming, self.config.audience
        )
        if exchanged == incoming:  # defence in depth: the exchange must mint a new token
            raise PermissionError("token exchange returned the incoming token")
        return exchanged

    async def wait_ready(self, timeout: float) -> None:
        """Until a session is open (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    # -- calls -------------------------------------------------------------------------

    async def _wait_ready(self, timeout: float) -> Client | None:
        """The live session; waits while one is being opened, not while backing off."""
        if self._client is not None:
            return self._client
        if self.state != "connecting":
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._client

    async def call(
        self, remote: str, arguments: dict[str, Any], *, timeout: float, label: str
    ) -> ToolOutcome:
        limit = min(timeout, self.config.call_timeout_s)
        client = await self._wait_ready(min(limit, self.config.connect_timeout_s))
        if client is None:
            why = f": {self.last_error}" if self.last_error else ""
            return ToolOutcome(f"{label} is unavailable (server down{why}); try again later", True)
        try:
            bearer = await self._user_bearer()
        except Exception as err:  # noqa: BLE001 - exchange failures are the model's to see
            return ToolOutcome(f"{label}: no token for the server: {_describe(err)}", True)
        meta: mcp_types.RequestParamsMeta | None = None
        if self._meta is not None:
            extra = self._meta()
            if extra:
                meta = mcp_types.RequestParamsMeta(**extra)  # type: ignore[typeddict-item]  # open TypedDict (extra_items=Any): trace keys
        token = _BEARER.set(bearer)
        try:
            async with asyncio.timeout(limit):
                result = await client.call_tool(remote, arguments, meta=meta)
        except TimeoutError:
            return ToolOutcome(f"{label} timed out after {limit:g}s", True)
        except MCPError as err:
            if err.error.code == mcp_types.CONNECTION_CLOSED:
                self._ended.set()
                again = "restarting it" if self.config.stdio is not None else "reconnecting"
                return ToolOutcome(f"{label} failed: the server went away; {again}", True)
            return ToolOutcome(f"{label} failed: {err.error.message}", True)
        except Exception as err:  # noqa: BLE001 - transport failure: reconnect, tell the model
            self._ended.set()
            return ToolOutcome(f"{label} failed: {_describe(err)}", True)
        finally:
            _BEARER.reset(token)
        if not self.config.cache_tools:
            await self._relist(client)
        return render_result(result, self.config.max_result_bytes, label)


def _runnable(program: str, workdir: Path) -> bool:
    """Whether a stdio server's command can start: a path (from its working directory)
    to an executable, or a name on PATH."""
    if "/" in program:
        return os.access(Path(program) if os.path.isabs(program) else workdir / program, os.X_OK)
    return shutil.which(program) is not None
