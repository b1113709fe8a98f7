"""The embedded STS's HTTP layer: HTTPS on a thread per connection, routing, limits.

Only parsing and answering lives here; :mod:`mesh.auth.sts_grants` decides. No request
body, header, token or secret is ever logged, and a client that disconnects mid-request
costs one debug line (the exception's type), never a traceback on stderr.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from mesh.auth.sts_grants import OAuthError

if TYPE_CHECKING:
    from mesh.auth.sts import TokenService

log = logging.getLogger("mesh.auth.sts")
_MAX_BODY = 64 * 1024


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

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

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
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self._send(413, {"error": "invalid_request", "error_description": "body too large"})
            self.close_connection = True
            return None
        return self.rfile.read(length).decode("utf-8", errors="replace")

    def do_POST(self) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != f"/{service.tenant}/oauth2/v2.0/token":
            self._send(404, {"error": "not_found"})
            return
        service.count("token")
        body = self._read_body()
        if body is None:
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
