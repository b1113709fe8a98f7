"""The one wrapper over python-jose: validate bearer JWTs safely, and sign them.

python-jose 3.5 is unsafe by default (it trusts the header's ``alg``, does not
require ``aud`` or ``exp``, ignores ``kid`` with a key set and has no size cap),
so every call into it goes through here:

- the raw token is size-capped and shape-checked before anything parses it;
- the algorithm comes from an allow-list (RS256, ES256), never from the header alone,
  and must match the key type picked by ``kid`` from a :class:`KeyProvider`;
- ``exp``, ``aud``, ``iss`` and ``sub`` are required, ``iss`` is exact, ``aud`` is
  this service, ``exp``/``nbf``/``iat`` get a small leeway.

Every failure is :class:`mesh.errors.Unauthenticated` whose message says why and
never contains the token.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jose import jwk as jose_jwk
from jose import jws as jose_jws
from jose import jwt as jose_jwt
from jose.exceptions import JOSEError

from mesh.context import Principal
from mesh.errors import Unauthenticated

#: Algorithms the mesh ever accepts; config may narrow, never widen.
SUPPORTED_ALGORITHMS = ("RS256", "ES256")
_KTY_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
#: Anything shaped like a JWT (used to scrub text that might echo one).
_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
REQUIRED_CLAIMS = ("exp", "aud", "iss", "sub")


class KeyProvider(Protocol):
    """Gives the public JWK (a dict) for a ``kid``, or raises Unauthenticated/Unavailable."""

    async def key_for(self, kid: str) -> Mapping[str, Any]: ...


def redact(text: str) -> str:
    """``text`` with anything that looks like a JWT replaced by ``[redacted]``."""
    return _JWT_LIKE.sub("[redacted]", text)


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment_json(token: str, index: int, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(token.split(".")[index]))
    except (ValueError, binascii.Error, UnicodeDecodeError, IndexError):
        raise Unauthenticated(f"malformed token: {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise Unauthenticated(f"malformed token: {what} is not a JSON object")
    return value


def check_shape(token: str, max_bytes: int) -> None:
    """Refuse oversize or non-JWS tokens before any parser sees them."""
    if not isinstance(token, str) or not token:
        raise Unauthenticated("missing token")
    if len(token) > max_bytes:
        raise Unauthenticated(f"token too large (over {max_bytes} bytes)")
    if not _COMPACT_JWS.fullmatch(token):
        raise Unauthenticated("malformed token: not a signed compact JWT")


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, unverified (the caller must still verify the token)."""
    return _segment_json(token, 0, "header")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims, unverified: only for tokens this process already validated or received
    from the identity provider over TLS (expiry bookkeeping, app-only checks)."""
    return _segment_json(token, 1, "payload")


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes (``scp``/``scope``, space-separated or a list) plus app ``roles``."""
    out: set[str] = set()
    for name in ("scp", "scope", "roles"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return frozenset(out)


def actor_chain(claims: Mapping[str, Any], *, max_depth: int = 32) -> tuple[str, ...]:
    """``sub`` of each nested ``act`` claim, outermost (the latest actor) first."""
    chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, Mapping) and len(chain) < max_depth:
        sub = act.get("sub") or act.get("client_id")
        if isinstance(sub, str):
            chain.append(sub)
        act = act.get("act")
    return tuple(chain)


def principal_from_claims(claims: Mapping[str, Any], audience: str) -> Principal:
    """The :class:`~mesh.context.Principal` of validated ``claims``."""
    return Principal(
        subject=str(claims["sub"]),
        issuer=str(claims.get("iss", "")),
        audience=audience,
        scopes=scopes_of(claims),
        actor_chain=actor_chain(claims),
        claims=dict(claims),
        hops_remaining=hops_of(claims),
    )


def hops_of(claims: Mapping[str, Any]) -> int | None:
    """The remaining hop budget a delegated token carries (``mesh_hops``), if any."""
    value = claims.get(HOPS_CLAIM)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_app_only(claims: Mapping[str, Any]) -> bool:
    """True when a token names no user: ``idtyp: app``, no delegated scope, or sub == client."""
    if claims.get("idtyp") == "app":
        return True
    if not claims.get("scp") and not claims.get("scope"):
        return True
    client = claims.get("azp") or claims.get("appid") or claims.get("client_id")
    return bool(client) and claims.get("sub") == client and "act" not in claims


def _check_key_matches(jwk: Mapping[str, Any], alg: str) -> None:
    if jwk.get("kty") != _KTY_FOR_ALG[alg]:
        raise Unauthenticated("token algorithm does not match its signing key")
    if jwk.get("alg") not in (None, alg):
        raise Unauthenticated("token algorithm does not match its signing key")
    if jwk.get("use") not in (None, "sig"):
        raise Unauthenticated("signing key is not a signature key")


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True)
class TokenProfile:
    """What an access token of one issuer must look like (RFC 8725 §3.11, RFC 9068)."""

    typ: str = ""
    """Required JOSE ``typ`` (``at+jwt``; ``application/`` prefix allowed); "" = unchecked."""
    require_scope_claim: bool = True
    """An access token carries ``scp``/``scope`` or ``roles`` (an ID token carries neither)."""


#: Claims only ID tokens carry (OIDC Core §2, §3.1.3.6, §3.3.2.11).
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash", "auth_time")
#: The remaining hop budget a delegated token carries (narrowing delegation).
HOPS_CLAIM = "mesh_hops"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_access_token_shape(
    header: Mapping[str, Any], claims: Mapping[str, Any], profile: TokenProfile
) -> None:
    """Refuse ID tokens and other non-access tokens, and a malformed hop budget."""
    typ = header.get("typ")
    if profile.typ:
        want = profile.typ.lower()
        got = typ.lower().removeprefix("application/") if isinstance(typ, str) else ""
        if got != want:
            raise Unauthenticated(f"not an access token (typ must be {profile.typ})")
    if any(name in claims for name in ID_TOKEN_CLAIMS):
        raise Unauthenticated("an ID token is not an access token")
    if profile.require_scope_claim and not any(k in claims for k in ("scp", "scope", "roles")):
        raise Unauthenticated("not an access token (no scp or roles claim)")
    hops = claims.get(HOPS_CLAIM)
    if hops is not None and (not isinstance(hops, int) or isinstance(hops, bool) or hops < 0):
        raise Unauthenticated(f"token claims invalid: {HOPS_CLAIM} is not a non-negative integer")
    if "act" in claims and not isinstance(claims["act"], Mapping):
        raise Unauthenticated("token claims invalid: act is not an object")


class TokenValidator:
    """Validates bearer tokens for one audience against one issuer's keys."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys: KeyProvider,
        algorithms: Sequence[str] = SUPPORTED_ALGORITHMS,
        leeway_s: float = 30.0,
        max_token_bytes: int = 8192,
        profile: TokenProfile | None = None,
        clock: Any = time.time,
    ) -> None:
        bad = set(algorithms) - set(SUPPORTED_ALGORITHMS)
        if bad or not algorithms:
            raise ValueError(f"unsupported algorithms {sorted(bad)}; allowed: RS256, ES256")
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.algorithms = tuple(algorithms)
        self.leeway_s = leeway_s
        self.max_token_bytes = max_token_bytes
        self.profile = profile or TokenProfile()
        self._clock = clock

    def _header(self, token: str) -> tuple[dict[str, Any], str, str]:
        check_shape(token, self.max_token_bytes)
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            accepted = ", ".join(self.algorithms)
            raise Unauthenticated(f"token algorithm not allowed (accepted: {accepted})")
        if "crit" in header:
            raise Unauthenticated("token has unsupported critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise Unauthenticated("token has no usable key id (kid)")
        return header, alg, kid

    async def validate(self, token: str) -> dict[str, Any]:
        """The token's claims if it is valid for this service, else Unauthenticated."""
        header, alg, kid = self._header(token)
        return self._verify(token, header, alg, await self.keys.key_for(kid))

    def validate_sync(
        self, token: str, key_for: Callable[[str], Mapping[str, Any]]
    ) -> dict[str, Any]:
        """:meth:`validate` with a synchronous key lookup (the STS's own keys)."""
        header, alg, kid = self._header(token)
        return self._verify(token, header, alg, key_for(kid))

    def _verify(
        self, token: str, header: Mapping[str, Any], alg: str, jwk: Mapping[str, Any]
    ) -> dict[str, Any]:
        _check_key_matches(jwk, alg)
        claims = verified_payload(token, jwk, alg, "token")
        self.check_claims(claims)
        check_access_token_shape(header, claims, self.profile)
        return claims

    def check_claims(self, claims: Mapping[str, Any]) -> None:
        """Registered claims, exactly: each missing one is named, types are strict."""
        for name in REQUIRED_CLAIMS:
            if name not in claims:
                raise Unauthenticated(f"token claims invalid: missing {name}")
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise Unauthenticated(f"token claims invalid: {name} is not a number")
        if claims.get("iss") != self.issuer:
            raise Unauthenticated("token claims invalid: wrong issuer")
        aud = claims.get("aud")
        if not all(isinstance(a, str) for a in _as_list(aud)) or self.audience not in _as_list(aud):
            raise Unauthenticated("token claims invalid: wrong audience")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("token claims invalid: empty subject")
        now = self._clock()
        if float(claims["exp"]) < now - self.leeway_s:
            raise Unauthenticated("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and float(nbf) > now + self.leeway_s:
            raise Unauthenticated("token not yet valid (nbf)")
        iat = claims.get("iat")
        if iat is not None and float(iat) > now + self.leeway_s:
            raise Unauthenticated("token issued in the future (iat)")


def verified_payload(
    token: str, jwk: Mapping[str, Any] | str, alg: str, what: str
) -> dict[str, Any]:
    """The payload of ``token`` once its signature verifies with ``jwk`` (no claim checks:
    python-jose's are lenient, the callers check every claim themselves)."""
    try:
        key = jose_jwk.construct(dict(jwk) if isinstance(jwk, Mapping) else jwk, algorithm=alg)
        payload = jose_jws.verify(token, key, algorithms=[alg])
    except JOSEError:
        raise Unauthenticated(f"{what} signature verification failed") from None
    except Exception:  # noqa: BLE001 - a hostile token must never crash the caller
        raise Unauthenticated(f"{what} could not be verified") from None
    try:
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise Unauthenticated(f"malformed {what}: payload is not JSON") from None
    if not isinstance(claims, dict):
        raise Unauthenticated(f"malformed {what}: payload is not a JSON object")
    return claims


# -- signing (the embedded token service and ``mesh token``) -----------------------------


@functools.lru_cache(maxsize=64)
def _private_key(private_pem: str, alg: str) -> Any:
    # Parsing (and checking) an RSA key costs tens of milliseconds: do it once per key.
    return jose_jwk.construct(private_pem, algorithm=alg)


@functools.lru_cache(maxsize=64)
def _public_dict(private_pem: str, alg: str) -> tuple[tuple[str, Any], ...]:
    return tuple(_private_key(private_pem, alg).public_key().to_dict().items())


def public_jwk(private_pem: str, kid: str, alg: str = "RS256") -> dict[str, Any]:
    """The public JWK (with ``kid``, ``use``, ``alg``) of a PEM private key."""
    out: dict[str, Any] = dict(_public_dict(private_pem, alg))
    out.update(kid=kid, use="sig", alg=alg)
    return out


def sign(
    claims: Mapping[str, Any],
    private_pem: str,
    kid: str,
    alg: str = "RS256",
    headers: Mapping[str, str] | None = None,
) -> str:
    """A compact JWS of ``claims`` signed with ``private_pem`` and carrying ``kid``."""
    if alg not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {alg}")
    return str(
        jose_jwt.encode(
            dict(claims),
            _private_key(private_pem, alg),
            algorithm=alg,
            headers={"kid": kid, "typ": "JWT", **(headers or {})},
        )
    )


def verify_client_assertion(
    assertion: str,
    *,
    public_pem: str,
    client_id: str,
    token_endpoint: str,
    thumbprints: Iterable[str] = (),
    max_lifetime_s: float = 600.0,
    max_bytes: int = 16384,
    leeway_s: float = 30.0,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Verify a ``private_key_jwt`` client assertion (RFC 7523 §3) with the client's
    registered certificate key: RS256 only, ``iss == sub == client_id``, ``aud`` the token
    endpoint, ``exp`` at most ``max_lifetime_s`` ahead, a ``jti`` (the caller remembers it
    until ``exp`` to refuse replays); a named thumbprint must be the registered one."""
    check_shape(assertion, max_bytes)
    header = unverified_header(assertion)
    if header.get("alg") != "RS256":
        raise Unauthenticated("client assertion must be RS256")
    allowed = {t.rstrip("=") for t in thumbprints}
    named = {
        v.rstrip("=") for k, v in header.items() if k in ("x5t", "x5t#S256") and isinstance(v, str)
    }  # msal keeps the padding
    if named and allowed and not named & allowed:
        raise Unauthenticated("client assertion names an unregistered certificate")
    claims = verified_payload(assertion, public_pem, "RS256", "client assertion")
    for name in ("iss", "sub", "aud", "exp", "jti"):
        if name not in claims:
            raise Unauthenticated(f"client assertion invalid: missing {name}")
    if claims["iss"] != client_id or claims["sub"] != client_id:
        raise Unauthenticated("client assertion invalid: iss and sub must be the client id")
    if token_endpoint not in _as_list(claims["aud"]):
        raise Unauthenticated("client assertion audience is not this token endpoint")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
        raise Unauthenticated("client assertion invalid: jti must be a string of 8-256 chars")
    exp, now = claims["exp"], clock()
    if not _is_number(exp) or any(
        k in claims and not _is_number(claims[k]) for k in ("iat", "nbf")
    ):
        raise Unauthenticated("client assertion invalid: exp/iat/nbf must be numbers")
    if float(exp) < now - leeway_s:
        raise Unauthenticated("client assertion expired")
    if float(exp) > now + max_lifetime_s + leeway_s:
        raise Unauthenticated(f"client assertion lives too long (over {max_lifetime_s:.0f} s)")
    if "nbf" in claims and float(claims["nbf"]) > now + leeway_s:
        raise Unauthenticated("client assertion not yet valid (nbf)")
    return claims


def thumbprint_b64(der: bytes, *, sha256: bool = False) -> str:
    """``x5t`` (SHA-1) or ``x5t#S256`` of a DER certificate, base64url."""
    import hashlib

    digest = hashlib.sha256(der) if sha256 else hashlib.sha1(der, usedforsecurity=False)
    return _b64encode(digest.digest())


__all__ = [
    "HOPS_CLAIM",
    "ID_TOKEN_CLAIMS",
    "REQUIRED_CLAIMS",
    "SUPPORTED_ALGORITHMS",
    "KeyProvider",
    "TokenProfile",
    "TokenValidator",
    "actor_chain",
    "check_access_token_shape",
    "check_shape",
    "hops_of",
    "is_app_only",
    "principal_from_claims",
    "public_jwk",
    "redact",
    "scopes_of",
    "sign",
    "thumbprint_b64",
    "unverified_claims",
    "unverified_header",
    "verified_payload",
    "verify_client_assertion",
]
