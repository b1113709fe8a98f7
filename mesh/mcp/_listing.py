"""A ``tools/list`` answer with one malformed tool loses only that tool.

The SDK validates a listing as a whole: one tool that breaks the MCP schema (a missing
name, an ``inputSchema`` that is not an object schema) fails it, and with it every tool
of the server. :class:`ListingGuard` sits on the session's transport streams: it notes
the ids of the ``tools/list`` requests going out and, in each answer, checks every tool
the way the SDK would check a listing of that tool alone. Bad tools are dropped (one
WARNING line each, naming the server and the tool; the SDK then sees a valid listing
of the rest); when every tool is bad, the answer passes unchanged and fails as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mcp_types
from mcp.shared.message import SessionMessage
from mcp_types import methods
from pydantic import ValidationError

log = logging.getLogger("mesh.mcp")

_LIST = "tools/list"
_FALLBACK_VERSION = "2025-11-25"  # what the SDK checks against before a version is agreed


class ListingGuard:
    """Drops the tools of a ``tools/list`` answer that the SDK would refuse."""

    def __init__(self, server: str, warned: set[tuple[str, str]]) -> None:
        self.server = server
        self.version: Callable[[], str | None] = lambda: None
        """The session's negotiated protocol version (set once the client exists)."""
        self._warned = warned  # (tool, problem) already logged: once per connection
        self._pending: set[Any] = set()

    def outbound(self, item: Any) -> None:
        message = getattr(item, "message", None)
        if isinstance(message, mcp_types.JSONRPCRequest) and message.method == _LIST:
            self._pending.add(message.id)

    def inbound(self, item: Any) -> Any:
        message = getattr(item, "message", None)
        if not isinstance(message, mcp_types.JSONRPCResponse | mcp_types.JSONRPCError):
            return item
        if message.id not in self._pending:
            return item
        self._pending.discard(message.id)
        if isinstance(message, mcp_types.JSONRPCError):
            return item
        kept = self._kept(message.result)
        if kept is None:
            return item
        result = {**message.result, "tools": kept}
        answer = mcp_types.JSONRPCResponse(jsonrpc="2.0", id=message.id, result=result)
        return SessionMessage(message=answer, metadata=item.metadata)

    def _kept(self, result: dict[str, Any]) -> list[Any] | None:
        """The valid tools, or None to pass the answer unchanged (all valid, or all bad)."""
        tools = result.get("tools")
        if not isinstance(tools, list) or not tools:
            return None
        try:
            version = self.version() or _FALLBACK_VERSION
        except RuntimeError:  # no session yet
            version = _FALLBACK_VERSION
        kept: list[Any] = []
        skipped: list[tuple[str, str]] = []
        for index, tool in enumerate(tools):
            problem = tool_problem(result, tool, version)
            if problem is None:
                kept.append(tool)
            else:
                skipped.append((_label(tool, index), problem))
        if not skipped or not kept:
            return None
        for label, problem in skipped:
            level = logging.DEBUG if (label, problem) in self._warned else logging.WARNING
            self._warned.add((label, problem))
            log.log(level, "MCP server %s: tool %s skipped: %s", self.server, label, problem)
        return kept


def tool_problem(result: dict[str, Any], tool: object, version: str) -> str | None:
    """Why the SDK would refuse a listing of ``tool`` alone, or None when it would not."""
    try:
        try:
            methods.validate_server_result(_LIST, version, {**result, "tools": [tool]})
        except ValidationError:
            raise
        except (KeyError, ValueError):  # no schema for this version: the SDK skips it too
            pass
        mcp_types.Tool.model_validate(tool, by_name=False)
    except ValidationError as err:
        return _first_error(err)
    return None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    if loc[:2] == ["tools", 0]:
        loc = loc[2:]
    where = ".".join(str(part) for part in loc) or "its top"
    return f"its entry breaks the MCP schema at {where}: {first['msg']}"


def _label(tool: object, index: int) -> str:
    name = tool.get("name") if isinstance(tool, dict) else None
    if isinstance(name, str) and name:
        return repr(name[:64])
    return f"#{index + 1} (no name)"
