"""The embedded STS's signing keys and the tokens it signs.

JWKS with rotation: :meth:`KeyStore.rotate` makes a new signing key active and keeps
the old one published until every token it signed has expired. Keys live in
``<data_dir>/sts/signing-keys.json`` (mode 0600, folder 0700) and are reloaded when the
file changes, so ``mesh sts --rotate`` from another process reaches a running STS.
Every token is an RFC 9068 access token (``typ: at+jwt``).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh.auth.devca import generate_rsa_private_pem
from mesh.auth.jwt import public_jwk, sign
from mesh.auth.runtime import private_dir, resolve_issuer, sts_dir
from mesh.config import MeshConfig
from mesh.errors import Unauthenticated

_KEYS_FILE = "signing-keys.json"
CLI_CLIENT_ID = "mesh-cli"
#: JOSE ``typ`` of every access token the STS signs (RFC 9068).
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type, not a secret


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
        private_dir(self.path.parent)
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
    return sign(claims, pem, kid, headers={"typ": ACCESS_TOKEN_TYP})


def mint_user_token(
    config: MeshConfig,
    sub: str,
    scopes: list[str] | None = None,
    ttl_s: int | None = None,
    *,
    audience: str | None = None,
    amr: list[str] | None = None,
) -> str:
    """A user token for the router (what ``mesh token`` prints), minted with the STS's
    signing key on disk: an operator's tool, not a client of the STS.

    For an agent's audience the token is shaped as the router would have obtained it
    (``act``/``azp`` naming the router), since agents take users' tokens only through
    the router: ``grpcurl`` straight at an agent keeps working for whoever holds the key.
    """
    router = config.auth.audience_for("router")
    aud = audience or router
    extra: dict[str, Any] = {"amr": amr or ["pwd"], "idtyp": "user", "name": sub}
    agents = {config.auth.audience_for(a) for a in config.agents}
    if aud != router and aud in agents:
        client = config.auth.client_id_for("router")
        extra.update(azp=client, act={"sub": client})
    return mint(
        config,
        sub=sub,
        audience=aud,
        scopes=scopes if scopes is not None else list(config.auth.sts.default_scopes),
        ttl_s=ttl_s,
        extra=extra,
    )


class LocalKeys:
    """The STS's own public keys by ``kid``, looked up synchronously."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def __call__(self, kid: str) -> Mapping[str, Any]:
        for key in self.store.jwks()["keys"]:
            if key["kid"] == kid:
                return dict(key)
        raise Unauthenticated("token signed with an unknown key (kid)")


__all__ = [
    "ACCESS_TOKEN_TYP",
    "CLI_CLIENT_ID",
    "KeyStore",
    "LocalKeys",
    "key_store",
    "mint",
    "mint_user_token",
    "rotate_keys",
]
