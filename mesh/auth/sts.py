"""The embedded token service (``mesh sts``): a small OAuth2/OIDC issuer for local
runs and tests.

- HTTPS only, with a dev CA persisted under ``<data_dir>/sts/tls`` (msal refuses http).
- OpenID discovery at ``/.well-known/openid-configuration`` and, Entra-shaped, at
  ``/<tenant>/v2.0/.well-known/openid-configuration``; the token endpoint is
  ``/<tenant>/oauth2/v2.0/token`` and the JWKS ``/<tenant>/discovery/v2.0/keys``.
- JWKS with rotation: :meth:`KeyStore.rotate` makes a new signing key active and
  keeps the old one published until every token it signed has expired. Keys live in
  ``<data_dir>/sts/signing-keys.json`` (mode 0600) and are reloaded when the file
  changes, so ``mesh sts --rotate`` from another process reaches a running STS.
- Grants: ``client_credentials``; Entra-style on-behalf-of (``grant_type=
  urn:ietf:params:oauth:grant-type:jwt-bearer``, ``requested_token_use=on_behalf_of``,
  ``assertion``, ``scope``); RFC 8693 token exchange. Both delegation grants record
  the chain as nested ``act`` claims (``{"sub": <client>, "act": <previous act>}``).
  Clients authenticate with a secret (body or HTTP Basic) or a ``private_key_jwt``
  assertion verified with their registered certificate.
- ``/_stats`` (loopback callers only) reports request counters; tests read them too
  straight from :attr:`TokenService.stats`.

No request body, token or secret is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mesh.auth.devca import ensure_dev_tls, generate_rsa_private_pem
from mesh.auth.jwt import (
    TokenValidator,
    is_app_only,
    public_jwk,
    scopes_of,
    sign,
    unverified_claims,
    verify_client_assertion,
)
from mesh.auth.runtime import (
    URL_FILE,
    RegisteredClient,
    known_audiences,
    registered_clients,
    resolve_issuer,
    sts_dir,
)
from mesh.config import MeshConfig
from mesh.errors import MeshError, Unauthenticated

log = logging.getLogger("mesh.auth.sts")

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
#: User claims carried from a subject token into the exchanged token.
CARRIED_CLAIMS = ("scp", "amr", "name", "preferred_username", "oid", "tid", "email")
_MAX_BODY = 64 * 1024
_KEYS_FILE = "signing-keys.json"
CLI_CLIENT_ID = "mesh-cli"


# -- signing keys --------------------------------------------------------------------------


class KeyStore:
    """RS256 signing keys persisted in one JSON file (0600), reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: tuple[int, int, int] | None = None
        self._data: dict[str, Any] = {"active": "", "keys": []}

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            mtime: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime == self._mtime:
            return
        if mtime is None:
            self._data = {"active": "", "keys": []}
            self._add_key_and_save()
            return
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError(f"{self.path}: not a signing key file")
        self._data = data
        self._mtime = mtime

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(self._data, out)
        os.replace(tmp, self.path)
        st = self.path.stat()
        self._mtime = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _add_key_and_save(self) -> str:
        kid = secrets.token_urlsafe(12)
        self._data["keys"].append(
            {
                "kid": kid,
                "pem": generate_rsa_private_pem(),
                "created": time.time(),
                "retire_at": None,
            }
        )
        self._data["active"] = kid
        self._save()
        return kid

    def signing_key(self) -> tuple[str, str]:
        """``(kid, private PEM)`` of the active key (created on first use)."""
        with self._lock:
            self._reload()
            active = self._data.get("active")
            for key in self._data["keys"]:
                if key["kid"] == active:
                    return str(key["kid"]), str(key["pem"])
            kid = self._add_key_and_save()
            return kid, str(self._data["keys"][-1]["pem"])

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public keys still published: the active one and retired ones whose
        tokens may not have expired yet."""
        now = time.time() if now is None else now
        self.signing_key()
        with self._lock:
            keys = [
                public_jwk(k["pem"], k["kid"])
                for k in self._data["keys"]
                if k["retire_at"] is None or k["retire_at"] > now
            ]
        return {"keys": keys}

    def rotate(self, publish_old_for_s: float) -> str:
        """Make a new key active; the old one stays published ``publish_old_for_s``."""
        with self._lock:
            self._reload()
            now = time.time()
            for key in self._data["keys"]:
                if key["retire_at"] is None:
                    key["retire_at"] = now + publish_old_for_s
            self._data["keys"] = [
                k for k in self._data["keys"] if k["retire_at"] is None or k["retire_at"] > now
            ]
            return self._add_key_and_save()


def key_store(config: MeshConfig) -> KeyStore:
    return KeyStore(sts_dir(config) / _KEYS_FILE)


def rotate_keys(config: MeshConfig) -> str:
    """Rotate the STS signing key on disk (a running STS picks it up); returns the new kid."""
    ttl = config.auth.sts.token_ttl_s + config.auth.leeway_s
    return key_store(config).rotate(ttl)


def mint(
    config: MeshConfig,
    *,
    sub: str,
    audience: str,
    scopes: list[str] | None = None,
    ttl_s: int | None = None,
    issuer: str | None = None,
    extra: Mapping[str, Any] | None = None,
    store: KeyStore | None = None,
) -> str:
    """A token signed with the STS's active key (``mesh token``, tests, the STS)."""
    kid, pem = (store or key_store(config)).signing_key()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer or resolve_issuer(config),
        "sub": sub,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + (ttl_s or config.auth.sts.token_ttl_s),
        "jti": secrets.token_urlsafe(16),
        "azp": CLI_CLIENT_ID,
        "tid": config.auth.sts.tenant,
    }
    if scopes:
        claims["scp"] = " ".join(scopes)
    claims.update(extra or {})
    return sign(claims, pem, kid)


def mint_user_token(
    config: MeshConfig,
    sub: str,
    scopes: list[str] | None = None,
    ttl_s: int | None = None,
    *,
    audience: str | None = None,
    amr: list[str] | None = None,
) -> str:
    """A user token for the router (what ``mesh token`` prints)."""
    return mint(
        config,
        sub=sub,
        audience=audience or config.auth.audience_for("router"),
        scopes=scopes if scopes is not None else list(config.auth.sts.default_scopes),
        ttl_s=ttl_s,
        extra={"amr": amr or ["pwd"], "idtyp": "user", "name": sub},
    )


# -- OAuth errors --------------------------------------------------------------------------


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


class _LocalKeys:
    """The STS's own keys as a :class:`mesh.auth.jwt.KeyProvider`."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def key_for(self, kid: str) -> Mapping[str, Any]:
        for key in self.store.jwks()["keys"]:
            if key["kid"] == kid:
                return dict(key)
        raise Unauthenticated("token signed with an unknown key (kid)")


def _nest_act(previous: object, actor: str) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": actor}
    if isinstance(previous, dict):
        act["act"] = previous
    return act


# -- the service ---------------------------------------------------------------------------


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
        self.tls = ensure_dev_tls(sts_dir(config) / "tls", extra_hosts=(self.host,))
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._server: _HttpsServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[str, RegisteredClient] = registered_clients(config)
        self._audiences = known_audiences(config)
        self.url = ""

    # lifecycle

    def start(self) -> TokenService:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        self._server = _HttpsServer((self.host, self.port), _Handler, context, self)
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
        path = sts_dir(self.config) / URL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.url + "\n", encoding="utf-8")

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

    # minting

    def issue(
        self, *, sub: str, audience: str, client_id: str, claims: Mapping[str, Any] | None = None
    ) -> tuple[str, int]:
        ttl = self.config.auth.sts.token_ttl_s
        extra = {"azp": client_id, **(claims or {})}
        token = mint(
            self.config,
            sub=sub,
            audience=audience,
            ttl_s=ttl,
            issuer=self.issuer,
            extra=extra,
            store=self.keys,
        )
        return token, ttl

    # the token endpoint

    def handle_token(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        """Serve one token request (form fields already parsed); raises OAuthError."""
        grant = form.get("grant_type", "")
        self.count(f"grant:{grant or 'none'}")
        client = self._authenticate(form, authorization)
        if grant == GRANT_CLIENT_CREDENTIALS:
            return self._client_credentials(client, form)
        if grant == GRANT_JWT_BEARER:
            if form.get("requested_token_use") != "on_behalf_of":
                raise OAuthError("invalid_request", "requested_token_use must be on_behalf_of")
            return self._on_behalf_of(client, form)
        if grant == GRANT_TOKEN_EXCHANGE:
            return self._token_exchange(client, form)
        raise OAuthError("unsupported_grant_type", "grant_type not supported")

    def _authenticate(self, form: Mapping[str, str], authorization: str | None) -> str:
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                raw = base64.b64decode(authorization[6:], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
            user, _, password = raw.partition(":")
            client_id, secret = urllib.parse.unquote(user), urllib.parse.unquote(password)
        assertion = form.get("client_assertion")
        if assertion is not None and form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_client", "unsupported client_assertion_type", 401)
        client = self._clients.get(client_id)
        if client is None:
            raise OAuthError("invalid_client", "unknown client", 401)
        if assertion is not None:
            if client.public_key_pem is None:
                raise OAuthError("invalid_client", "client has no registered certificate", 401)
            try:
                verify_client_assertion(
                    assertion,
                    public_pem=client.public_key_pem,
                    client_id=client_id,
                    audiences=(self.token_endpoint, self.issuer, self.authority),
                    thumbprints=client.thumbprints,
                    leeway_s=self.config.auth.leeway_s,
                )
            except Unauthenticated as err:
                raise OAuthError("invalid_client", err.message, 401) from None
            return client_id
        if secret is not None and any(
            hmac.compare_digest(secret.encode(), known.encode()) for known in client.secrets
        ):
            return client_id
        raise OAuthError("invalid_client", "client authentication failed", 401)

    def _validate(self, token: str, audience: str, what: str) -> dict[str, Any]:
        validator = TokenValidator(
            issuer=self.issuer,
            audience=audience,
            keys=_LocalKeys(self.keys),
            algorithms=("RS256",),
            leeway_s=self.config.auth.leeway_s,
            max_token_bytes=self.config.auth.max_token_bytes,
        )
        try:
            return asyncio.run(validator.validate(token))
        except MeshError as err:
            raise OAuthError("invalid_grant", f"{what}: {err.message}") from None

    def _target(self, form: Mapping[str, str]) -> tuple[str, set[str]]:
        """(audience, requested permissions) from ``audience``/``resource``/``scope``."""
        audience = form.get("audience") or form.get("resource") or ""
        perms: set[str] = set()
        resources: set[str] = set()
        for item in form.get("scope", "").split():
            if item in RESERVED_SCOPES:
                continue
            if "/" in item:
                resource, _, perm = item.rpartition("/")
                resources.add(resource)
                if perm != ".default":
                    perms.add(perm)
            else:
                perms.add(item)
        if not audience:
            if len(resources) != 1:
                raise OAuthError("invalid_scope", "request exactly one resource (<aud>/.default)")
            audience = resources.pop()
        if audience not in self._audiences:
            raise OAuthError("invalid_target", f"unknown audience {audience!r}")
        return audience, perms

    def _delegated_scopes(self, subject: Mapping[str, Any], perms: set[str]) -> list[str]:
        have = set(scopes_of({"scp": subject.get("scp"), "scope": subject.get("scope")}))
        if perms:
            missing = perms - have
            if missing:
                raise OAuthError(
                    "invalid_scope", "subject token lacks: " + " ".join(sorted(missing))
                )
            return sorted(perms)
        return sorted(have)

    def _step_up(self, subject: Mapping[str, Any], audience: str) -> None:
        if audience not in self.config.auth.sts.step_up_audiences:
            return
        amr = subject.get("amr")
        if isinstance(amr, list) and "mfa" in amr:
            return
        challenge = json.dumps({"access_token": {"amr": {"essential": True, "values": ["mfa"]}}})
        raise OAuthError(
            "interaction_required",
            "AADSTS50076: multi-factor authentication is required for this audience",
            extra={"suberror": "basic_action", "claims": challenge},
        )

    def _delegate(
        self, client_id: str, subject: dict[str, Any], form: Mapping[str, str], *, holder: str = ""
    ) -> tuple[str, int, list[str], str]:
        if is_app_only(subject):
            raise OAuthError("invalid_grant", "app-only tokens cannot be exchanged for a user")
        audience, perms = self._target(form)
        scopes = self._delegated_scopes(subject, perms)
        self._step_up(subject, audience)
        claims = {k: subject[k] for k in CARRIED_CLAIMS if k in subject}
        claims["scp"] = " ".join(scopes)
        previous = subject.get("act")
        if holder:
            # The subject token was issued to another service (``holder``) that acted on it;
            # it stays in the delegation chain between the earlier actors and this client.
            previous = _nest_act(previous, holder)
        claims["act"] = _nest_act(previous, client_id)
        claims["idtyp"] = "user"
        token, ttl = self.issue(
            sub=str(subject["sub"]), audience=audience, client_id=client_id, claims=claims
        )
        return token, ttl, scopes, audience

    def _on_behalf_of(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        assertion = form.get("assertion", "")
        subject = self._validate(assertion, client_id, "assertion")
        token, ttl, scopes, audience = self._delegate(client_id, subject, form)
        return {
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": ttl,
            "ext_expires_in": ttl,
            "scope": " ".join(f"{audience}/{s}" for s in scopes) or f"{audience}/.default",
        }

    def _exchangeable_subject(self, client_id: str, token: str) -> tuple[dict[str, Any], str]:
        """The subject token's claims, and the service it was issued to when not ``client_id``.

        A client may exchange a token meant for itself, or one issued to another service
        with this client as its current actor: the router re-exchanging the token it
        obtained for agent A when A hands the turn to B, so that B's token records
        ``router > A > router`` rather than losing A.
        """
        try:
            return self._validate(token, client_id, "subject_token"), ""
        except OAuthError as first:
            try:
                audience = unverified_claims(token).get("aud")
            except MeshError:
                raise first from None
            if not isinstance(audience, str) or audience not in self._audiences:
                raise
            subject = self._validate(token, audience, "subject_token")
            act = subject.get("act")
            if not isinstance(act, dict) or act.get("sub") != client_id:
                raise OAuthError(
                    "invalid_grant",
                    "subject_token was neither issued to nor acted on by the client",
                ) from None
            return subject, audience

    def _token_exchange(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("subject_token_type") not in (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT):
            raise OAuthError("invalid_request", "unsupported subject_token_type")
        subject, holder = self._exchangeable_subject(client_id, form.get("subject_token", ""))
        actor_token = form.get("actor_token")
        if actor_token is not None:
            if form.get("actor_token_type") not in (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT):
                raise OAuthError("invalid_request", "unsupported actor_token_type")
            actor = self._validate(actor_token, self.issuer, "actor_token")
            if actor.get("sub") != client_id:
                raise OAuthError("invalid_grant", "actor_token does not name the client")
        token, ttl, scopes, _ = self._delegate(client_id, subject, form, holder=holder)
        return {
            "token_type": "Bearer",
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_ACCESS,
            "expires_in": ttl,
            "scope": " ".join(scopes),
        }

    def _client_credentials(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("audience") or form.get("resource") or form.get("scope"):
            audience, _ = self._target(form)
        else:
            audience = self.issuer
        token, ttl = self.issue(
            sub=client_id,
            audience=audience,
            client_id=client_id,
            claims={"idtyp": "app", "roles": []},
        )
        return {
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": ttl,
            "ext_expires_in": ttl,
        }


# -- HTTP plumbing ---------------------------------------------------------------------------


class _HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        service: TokenService,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = context
        self.service = service
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a failed handshake (e.g. a client that does not trust the dev CA)
        try:
            _Handler(tls, client_address, self)
        finally:
            tls.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _HttpsServer
    protocol_version = "HTTP/1.1"
    server_version = "mesh-sts"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # Never the query string or body: only method and path.
        log.debug("%s %s", self.command, self.path.split("?", 1)[0])

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
            with service._stats_lock:
                self._send(200, dict(service.stats))
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

    def do_POST(self) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != f"/{service.tenant}/oauth2/v2.0/token":
            self._send(404, {"error": "not_found"})
            return
        service.count("token")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self._send(413, {"error": "invalid_request", "error_description": "body too large"})
            self.close_connection = True
            return
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        try:
            if ctype != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request", "use application/x-www-form-urlencoded")
            pairs = urllib.parse.parse_qsl(body, keep_blank_values=True)
            form: dict[str, str] = {}
            for key, value in pairs:
                if key in form:
                    raise OAuthError("invalid_request", f"parameter {key!r} repeated")
                form[key] = value
            result = service.handle_token(form, self.headers.get("Authorization"))
        except OAuthError as err:
            service.count(f"error:{err.error}")
            self._send(err.status, err.body())
            return
        except Exception as err:  # noqa: BLE001 - answer 500, log the type only (no secrets)
            log.error("token endpoint failed: %s", type(err).__name__)
            self._send(500, {"error": "server_error", "error_description": "internal error"})
            return
        self._send(200, result)
