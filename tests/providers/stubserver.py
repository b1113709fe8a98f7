"""A tiny HTTP/1.1 server on 127.0.0.1:0 that replays scripted provider responses.

Each request is recorded (method, path, query, headers, body) and answered with
the next queued :class:`Reply`: a whole body, or a body streamed with chunked
transfer encoding (SSE or NDJSON), optionally pausing at a :data:`HOLD` until the
client goes away, which sets :attr:`StubServer.disconnected`. Connections are
kept alive as real servers do, so SDK connection pooling is exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit


class _Hold:
    def __repr__(self) -> str:
        return "HOLD"


#: In a streamed reply: stop sending and wait for the client to disconnect.
HOLD = _Hold()
#: One piece of a streamed reply.
Chunk = bytes | _Hold


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    chunks: Sequence[Chunk] | None = None
    """Streamed with chunked encoding when set (``body`` is then ignored)."""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body=json.dumps(payload).encode(), headers=dict(headers or {}))


class StubServer:
    """See the module docstring. Use ``async with StubServer() as server``."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Recorded] = []
        self.holding = asyncio.Event()
        """Set when a streamed reply reached a HOLD (the client has the first part)."""
        self.disconnected = asyncio.Event()
        """Set when the client closed the connection during a HOLD."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def __aenter__(self) -> StubServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a handler that ends on shutdown is not an error
        finally:
            self._tasks.discard(task)
            writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            parts = urlsplit(target)
            self.requests.append(Recorded(method, parts.path, parse_qs(parts.query), headers, body))
            reply = (
                self.replies.pop(0)
                if self.replies
                else json_reply(500, {"error": "the test queued no reply for this request"})
            )
            if not await self._respond(reply, reader, writer):
                return

    async def _respond(
        self, reply: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Send one reply; False when the connection is finished."""
        reason = HTTPStatus(reply.status).phrase
        head = [f"HTTP/1.1 {reply.status} {reason}", f"Content-Type: {reply.content_type}"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        if reply.chunks is None:
            head.append(f"Content-Length: {len(reply.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
            await writer.drain()
            return True
        head += ["Transfer-Encoding: chunked", "Cache-Control: no-cache"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        for chunk in reply.chunks:
            if isinstance(chunk, _Hold):
                await writer.drain()
                self.holding.set()
                await self._wait_for_disconnect(reader)
                return False
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _wait_for_disconnect(self, reader: asyncio.StreamReader) -> None:
        try:
            async with asyncio.timeout(30):
                while await reader.read(4096):
                    pass
        except (ConnectionError, TimeoutError):
            pass
        self.disconnected.set()


# ----------------------------------------------------------------- wire formats


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event (``data`` is JSON-encoded unless it is a string)."""
    payload = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


def ndjson(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()
