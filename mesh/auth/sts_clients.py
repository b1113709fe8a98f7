"""Client authentication at the embedded STS, and its OAuth error type.

Clients authenticate with their own secret (body or HTTP Basic) or a ``private_key_jwt``
assertion (RFC 7523: short-lived, ``aud`` the token endpoint, each ``jti`` once). Every
failure gets the same answer, so client ids cannot be enumerated; the reason is logged
at INFO without the client's input.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

from mesh.auth.jwt import verify_client_assertion
from mesh.auth.runtime import RegisteredClient, registered_clients
from mesh.config import MeshConfig
from mesh.errors import Unauthenticated

log = logging.getLogger("mesh.auth.sts")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: The one answer to every client-authentication failure (no client-id enumeration).
CLIENT_AUTH_FAILED = "client authentication failed"
_MAX_REPLAY_ENTRIES = 100_000
_DUMMY_SECRET = b"\x00" * 43


class OAuthError(Exception):
    """An OAuth2 error response."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.description, **self.extra}


def _client_failed() -> OAuthError:
    return OAuthError("invalid_client", CLIENT_AUTH_FAILED, 401)


class TokenEndpoint(Protocol):
    """Where the STS's token endpoint is (known once it is listening)."""

    @property
    def token_endpoint(self) -> str: ...


class ReplayCache:
    """``jti`` of client assertions already used, each kept until it expires."""

    def __init__(self, clock: Any = time.time) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def first_use(self, client_id: str, jti: str, expires_at: float) -> bool:
        """True the first time ``(client_id, jti)`` is presented before it expires."""
        now = self._clock()
        with self._lock:
            if len(self._seen) >= _MAX_REPLAY_ENTRIES:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
            if len(self._seen) >= _MAX_REPLAY_ENTRIES:
                return False  # full of live assertions: refuse rather than forget one
            key = (client_id, jti)
            if key in self._seen and self._seen[key] >= now:
                return False
            self._seen[key] = expires_at
            return True


class ClientAuthenticator:
    """The STS's registered clients and how each proves who it is."""

    def __init__(self, config: MeshConfig, endpoints: TokenEndpoint) -> None:
        self.config = config
        self.endpoints = endpoints
        self.clients: dict[str, RegisteredClient] = registered_clients(config)
        self.replay = ReplayCache()

    def authenticate(self, form: Mapping[str, str], authorization: str | None) -> str:
        """The authenticated client id; one generic 401 for every failure."""
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                raw = base64.b64decode(authorization[6:], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise _client_failed() from None
            user, _, password = raw.partition(":")
            client_id, secret = urllib.parse.unquote(user), urllib.parse.unquote(password)
        assertion = form.get("client_assertion")
        client = self.clients.get(client_id)
        if assertion is not None:
            if form.get("client_assertion_type") != ASSERTION_TYPE or client is None:
                raise _client_failed()
            self._check_assertion(client, assertion)
            return client_id
        known = client.secrets if client is not None else ()
        given = (secret or "").encode()
        matched = False
        for candidate in known or (_DUMMY_SECRET.decode(),):
            matched |= hmac.compare_digest(given, candidate.encode())
        if client is None or secret is None or not known or not matched:
            log.info("token request refused: client authentication failed")
            raise _client_failed()
        return client_id

    def _check_assertion(self, client: RegisteredClient, assertion: str) -> None:
        if client.public_key_pem is None:
            raise _client_failed()
        try:
            claims = verify_client_assertion(
                assertion,
                public_pem=client.public_key_pem,
                client_id=client.client_id,
                token_endpoint=self.endpoints.token_endpoint,
                thumbprints=client.thumbprints,
                max_lifetime_s=self.config.auth.assertion_max_lifetime_s,
                leeway_s=self.config.auth.leeway_s,
            )
        except Unauthenticated as err:
            log.info("token request refused: %s", err.message)
            raise _client_failed() from None
        if not self.replay.first_use(client.client_id, str(claims["jti"]), float(claims["exp"])):
            log.info("token request refused: client assertion replayed")
            raise _client_failed()


__all__ = [
    "ASSERTION_TYPE",
    "CLIENT_AUTH_FAILED",
    "ClientAuthenticator",
    "OAuthError",
    "ReplayCache",
]
