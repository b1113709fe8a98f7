"""A tiny plaintext HTTP/1.1 endpoint on the event loop: ``/metrics``, ``/healthz``, ``/readyz``.

No thread: each connection is one short task that reads the request head (8 KiB and 5 s
at most), answers and closes. ``/readyz`` answers 200 while the server's overall health
is SERVING and 503 otherwise (a drain flips it), so HTTP probes and the Prometheus
scrape can share this port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("mesh.telemetry")

_MAX_HEAD = 8192


class MetricsServer:
    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_port=False, limit=_MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = line.partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, ctype, body = self._answer(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            if self.ready():
                return "200 OK", text, b"ready\n"
            return "503 Service Unavailable", text, b"not ready\n"
        return "404 Not Found", text, b"/metrics, /healthz or /readyz\n"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
