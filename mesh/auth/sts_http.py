"""The embedded STS's HTTP layer: HTTPS on a thread per connection, routing, limits.

Only parsing and answering lives here; :mod:`mesh.auth.sts_grants` decides. No request
body, header, token or secret is ever logged, and a client that disconnects mid-request
costs one debug line (the exception's type), never a traceback on stderr.

A request body is read in bounded time and size: at most :data:`_MAX_BODY` bytes, all
within :data:`_BODY_SECONDS`. A body too large (up to :data:`_MAX_DRAIN`) is read and
thrown away before the 413, so that a client still sending it reads the answer instead
of a connection reset; a client that asks ``Expect: 100-continue`` gets the 413 before
it sends anything. A request whose framing is refused closes its connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from mesh.auth.sts_grants import OAuthError

if TYPE_CHECKING:
    from mesh.auth.sts import TokenService

log = logging.getLogger("mesh.auth.sts")
_MAX_BODY = 64 * 1024
#: A refused body up to this size is read and dropped, so that its sender reads the 413.
_MAX_DRAIN = 4 * 1024 * 1024
#: How long one request's body may take to arrive, in all.
_BODY_SECONDS = 10.0
_CHUNK = 64 * 1024


class HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], context: ssl.SSLContext, service: TokenService
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = context
        self.service = service
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a failed handshake (e.g. a client that does not trust the dev CA)
        try:
            Handler(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A broken connection: one line with the exception type (the default prints a
        traceback, which may quote request data)."""
        error = sys.exc_info()[1]
        log.debug("token service connection ended: %s", type(error).__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_form(body: str, content_type: str) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; repeated parameters are refused."""
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "use application/x-www-form-urlencoded")
    form: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        if key in form:
            raise OAuthError("invalid_request", "a parameter is repeated")
        form[key] = value
    return form


class _Refused(Exception):
    """A request refused for its framing: the status and one line for the client."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status, self.description = status, description


def _declared_length(headers: Message) -> int:
    """The body's ``Content-Length`` (0 without one); :class:`_Refused` when it is not one
    plain number, or when the body is chunked (not supported)."""
    if "Transfer-Encoding" in headers:
        raise _Refused(411, "send the body with a Content-Length")
    values = headers.get_all("Content-Length") or ["0"]
    value = values[0].strip()
    if len(values) > 1 or not (value.isascii() and value.isdigit()):
        raise _Refused(400, "invalid Content-Length")
    # More digits than any body has: too large, without converting them all.
    return int(value) if len(value) <= 18 else _MAX_DRAIN + 1


class Handler(BaseHTTPRequestHandler):
    server: HttpsServer
    protocol_version = "HTTP/1.1"
    server_version = "mesh-sts"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Never the query string, a header or the body: only the method.
        log.debug("token service request: %s", str(self.command)[:16])

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("token service: malformed request")

    def _send(self, status: int, body: Mapping[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")  # sets close_connection too
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, refused: _Refused) -> None:
        """Answer a refused request and close the connection (what follows on it could be
        the rest of a body, not a request)."""
        log.debug("token service: request refused (%d)", refused.status)
        error = {"error": "invalid_request", "error_description": refused.description}
        self._send(refused.status, error, close=True)

    def handle_expect_100(self) -> bool:
        """``100 Continue`` only for a body that will be read: a client that waits before
        sending one that is refused gets the refusal at once."""
        try:
            if _declared_length(self.headers) > _MAX_BODY:
                raise _Refused(413, "body too large")
        except _Refused as refused:
            self._refuse(refused)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0].rstrip("/")
        tenant = service.tenant
        if path in (
            "/.well-known/openid-configuration",
            f"/{tenant}/v2.0/.well-known/openid-configuration",
            f"/{tenant}/.well-known/openid-configuration",
        ):
            service.count("discovery")
            self._send(200, service.discovery())
        elif path in (f"/{tenant}/discovery/v2.0/keys", "/jwks"):
            service.count("jwks")
            self._send(200, service.keys.jwks())
        elif path == "/_stats" and _is_loopback(self.client_address[0]):
            self._send(200, service.stats_snapshot())
        elif path == f"/{tenant}/oauth2/v2.0/authorize":
            self._send(
                400,
                {
                    "error": "unsupported_response_type",
                    "error_description": "no interactive flows; use `mesh token`",
                },
            )
        else:
            self._send(404, {"error": "not_found"})

    def _read_body(self) -> str | None:
        """The request's body, or None once it has been refused (answered, and the
        connection closes). A body too large is read and dropped first, up to
        :data:`_MAX_DRAIN` and within :data:`_BODY_SECONDS`, so that a client still sending
        it reads the 413 (closing with unread data would reset the connection); beyond
        that, or when it takes longer, the 413 goes out anyway."""
        try:
            length = _declared_length(self.headers)
            if length > _MAX_BODY:
                if length <= _MAX_DRAIN:
                    with contextlib.suppress(_Refused):
                        self._receive(length, keep=False)
                raise _Refused(413, "body too large")
            body = self._receive(length, keep=True)
        except _Refused as refused:
            self._refuse(refused)
            return None
        return body.decode("utf-8", errors="replace")

    def _receive(self, length: int, keep: bool) -> bytes:
        """``length`` bytes of body, kept or dropped, in reads of at most :data:`_CHUNK`
        bytes that all end within :data:`_BODY_SECONDS`."""
        sock = self.connection
        timeout = sock.gettimeout()
        deadline = time.monotonic() + _BODY_SECONDS
        chunks: list[bytes] = []
        try:
            while length > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = self.rfile.read1(min(length, _CHUNK))  # one read at most
                if not chunk:
                    raise _Refused(400, "the body ended before its Content-Length")
                length -= len(chunk)
                if keep:
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(408, f"the body took more than {_BODY_SECONDS:g} s") from None
        finally:
            sock.settimeout(timeout)
        return b"".join(chunks)

    def do_POST(self) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0].rstrip("/")
        token = path == f"/{service.tenant}/oauth2/v2.0/token"
        if token:
            service.count("token")
        # Read elsewhere too: a body left unread would be taken for the next request.
        body = self._read_body()
        if body is None:
            return
        if not token:
            self._send(404, {"error": "not_found"})
            return
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        try:
            form = parse_form(body, ctype)
            service.count(f"grant:{_grant_label(form.get('grant_type', ''))}")
            result = service.grants.handle(form, self.headers.get("Authorization"))
        except OAuthError as err:
            service.count(f"error:{err.error}")
            self._send(err.status, err.body())
            return
        except Exception as err:  # noqa: BLE001 - answer 500, log the type only (no secrets)
            log.error("token endpoint failed: %s", type(err).__name__)
            self._send(500, {"error": "server_error", "error_description": "internal error"})
            return
        self._send(200, result)


def _grant_label(grant: str) -> str:
    """A bounded stats label for a caller-controlled grant type."""
    from mesh.auth.sts_grants import (
        GRANT_CLIENT_CREDENTIALS,
        GRANT_JWT_BEARER,
        GRANT_TOKEN_EXCHANGE,
    )

    known = (GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE)
    return grant if grant in known else ("none" if not grant else "other")
