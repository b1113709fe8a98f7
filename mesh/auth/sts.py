"""The embedded token service (``mesh sts``): a small OAuth2/OIDC issuer for local
runs and tests.

- HTTPS only, with a dev CA persisted under ``<data_dir>/sts/tls`` (msal refuses http)
  and a certificate of its own named for the STS.
- OpenID discovery at ``/.well-known/openid-configuration`` and, Entra-shaped, at
  ``/<tenant>/v2.0/.well-known/openid-configuration``; the token endpoint is
  ``/<tenant>/oauth2/v2.0/token`` and the JWKS ``/<tenant>/discovery/v2.0/keys``.
- Signing keys and minting: :mod:`mesh.auth.sts_keys`; grants and client
  authentication: :mod:`mesh.auth.sts_grants`; HTTP: :mod:`mesh.auth.sts_http`. This
  module starts and stops the service and re-exports the names other code uses.
- ``/_stats`` (loopback callers only) reports request counters; tests read them too
  straight from :attr:`TokenService.stats`.

No request body, token or secret is ever logged.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh.auth.devca import ensure_dev_tls
from mesh.auth.runtime import URL_FILE, sts_dir, write_private
from mesh.auth.sts_grants import (
    ASSERTION_TYPE,
    CLIENT_AUTH_FAILED,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_JWT_BEARER,
    GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS,
    TOKEN_TYPE_JWT,
    Grants,
    OAuthError,
)
from mesh.auth.sts_http import HttpsServer
from mesh.auth.sts_keys import (
    ACCESS_TOKEN_TYP,
    CLI_CLIENT_ID,
    KeyStore,
    key_store,
    mint,
    mint_user_token,
    rotate_keys,
)
from mesh.config import MeshConfig

log = logging.getLogger("mesh.auth.sts")
#: The name (CN and file stem) of the STS's own certificate from the dev CA.
STS_TLS_NAME = "sts"


class TokenService:
    """The embedded STS. ``start()`` serves in a background thread; use as a context
    manager in tests. ``url`` is known once started (port 0 allowed)."""

    def __init__(
        self, config: MeshConfig, *, host: str | None = None, port: int | None = None
    ) -> None:
        self.config = config
        self.host = host if host is not None else config.auth.sts.host
        self.port = port if port is not None else config.auth.sts.port
        self.tenant = config.auth.sts.tenant
        self.keys = key_store(config)
        self.tls = ensure_dev_tls(
            sts_dir(config) / "tls", extra_hosts=(self.host,), name=STS_TLS_NAME
        )
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._server: HttpsServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.grants = Grants(config, self.keys, self)

    # lifecycle

    def start(self) -> TokenService:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        self._server = HttpsServer((self.host, self.port), context, self)
        bound_host, bound_port = self._server.server_address[:2]
        if isinstance(bound_host, bytes):
            bound_host = bound_host.decode()
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if shown in ("0.0.0.0", "[::]"):
            shown = "127.0.0.1"
        self.port = int(bound_port)
        self.url = f"https://{shown}:{self.port}"
        self._write_url()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="mesh-sts",
            daemon=True,
        )
        self._thread.start()
        log.info("token service listening on %s (issuer %s)", self.url, self.issuer)
        return self

    def _write_url(self) -> None:
        write_private(sts_dir(self.config) / URL_FILE, self.url + "\n")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TokenService:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until stopped (the CLI's foreground mode)."""
        if self._thread is not None:
            self._thread.join()

    # addresses

    @property
    def issuer(self) -> str:
        return self.config.auth.issuer or self.url

    @property
    def public_url(self) -> str:
        """Where clients reach this service: the configured issuer (e.g. a Kubernetes
        Service name) when set, else the address it bound."""
        return self.config.auth.issuer.rstrip("/") or self.url

    @property
    def authority(self) -> str:
        """The Entra-style authority for msal: ``https://host:port/<tenant>``."""
        return f"{self.public_url}/{self.tenant}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.authority}/discovery/v2.0/keys"

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_cert

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.authority}/oauth2/v2.0/authorize",
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [
                GRANT_CLIENT_CREDENTIALS,
                GRANT_JWT_BEARER,
                GRANT_TOKEN_EXCHANGE,
            ],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
            "tenant_region_scope": None,
        }

    def rotate_keys(self) -> str:
        """Rotate the signing key now; returns the new kid."""
        ttl = self.config.auth.sts.token_ttl_s + self.config.auth.leeway_s
        return self.keys.rotate(ttl)

    def count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    def stats_snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self.stats)

    def handle_token(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        """Serve one token request (form already parsed); raises OAuthError."""
        return self.grants.handle(form, authorization)


__all__ = [
    "ACCESS_TOKEN_TYP",
    "ASSERTION_TYPE",
    "CLIENT_AUTH_FAILED",
    "CLI_CLIENT_ID",
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_JWT_BEARER",
    "GRANT_TOKEN_EXCHANGE",
    "TOKEN_TYPE_ACCESS",
    "TOKEN_TYPE_JWT",
    "KeyStore",
    "OAuthError",
    "TokenService",
    "key_store",
    "mint",
    "mint_user_token",
    "rotate_keys",
]
