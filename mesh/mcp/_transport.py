"""MCP transport helpers: bearer auth on httpx, stream watching (the end of the read
side; the listing guard on both), headers and error text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Generator
from contextvars import ContextVar
from typing import Any

import anyio
import httpx2

from mesh.config import McpHttpConfig
from mesh.mcp._listing import ListingGuard

log = logging.getLogger("mesh.mcp")


#: The bearer token the next HTTP request to an MCP server carries (set per call; the
#: SDK carries the sender's context into the task that makes the request).
_BEARER: ContextVar[str | None] = ContextVar("mesh_mcp_bearer", default=None)


class _BearerAuth(httpx2.Auth):
    """Puts the per-call token (if any) on each request; never logs it."""

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        token = _BEARER.get()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


class _WatchedRead:
    """The transport's read stream, noting when it ends (the server went away); the
    guard drops the malformed tools of ``tools/list`` answers."""

    def __init__(self, inner: Any, ended: asyncio.Event, guard: ListingGuard | None) -> None:
        self._inner = inner
        self._ended = ended
        self._guard = guard

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            item = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._ended.set()
            raise
        return item if self._guard is None else self._guard.inbound(item)

    def __aiter__(self) -> _WatchedRead:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._ended.set()
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedRead:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _GuardedWrite:
    """The transport's write stream, showing each request to the listing guard."""

    def __init__(self, inner: Any, guard: ListingGuard) -> None:
        self._inner = inner
        self._guard = guard

    async def send(self, item: Any, /) -> None:
        self._guard.outbound(item)
        await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _GuardedWrite:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@contextlib.asynccontextmanager
async def _watched(
    transport: Any, ended: asyncio.Event, guard: ListingGuard | None = None
) -> AsyncIterator[tuple[Any, Any]]:
    try:
        async with transport as (read, write):
            sink = write if guard is None else _GuardedWrite(write, guard)
            yield _WatchedRead(read, ended, guard), sink
    finally:
        ended.set()


def _headers(cfg: McpHttpConfig) -> dict[str, str]:
    headers = dict(cfg.headers)
    for header, variable in cfg.headers_env.items():
        value = os.environ.get(variable)
        if value:
            headers[header] = value
    return headers


def _describe(err: BaseException) -> str:
    """A one-line, token-free description of a failure."""
    if isinstance(err, BaseExceptionGroup):
        leaves = [e for e in _leaves(err)]
        if leaves:
            return _describe(leaves[0])
    from pydantic import ValidationError

    from mesh.auth.jwt import redact

    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, ValidationError) and err.errors():
        first = err.errors()[0]  # where the server's answer breaks the MCP schema
        where = ".".join(str(part) for part in first["loc"])
        text = f"{err.title} does not follow the MCP schema at {where}: {first['msg']}"
    return redact(f"{type(err).__name__}: {text}" if text else type(err).__name__)[:300]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
