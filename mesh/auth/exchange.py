"""Getting a token for the next hop: token exchangers and token sources.

One interface, :class:`TokenExchanger` (``token_for(subject_token, audience)``),
three implementations chosen by ``auth.exchanger``:

- ``entra``: msal ``ConfidentialClientApplication.acquire_token_on_behalf_of``
  (client secret or certificate), run in a thread with a timeout;
- ``rfc8693``: RFC 8693 token exchange over httpx, with the service's own
  client-credentials token as ``actor_token`` so the issuer nests ``act``;
- ``embedded`` (default): RFC 8693 against the embedded STS.

All of them sit behind :class:`CachingExchanger`: it refuses app-only tokens before
any call to the identity provider, caches per (SHA-256 of the subject token,
audience) until shortly before expiry (msal never answers OBO from its cache) and
joins concurrent identical exchanges into one request.

Failures are :class:`~mesh.errors.Unavailable` (identity provider unreachable or
failing) or :class:`~mesh.errors.Unauthenticated` (refused; a claims challenge
travels in the ErrorInfo metadata). No token or secret is logged or put in a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import requests

from mesh.auth.jwks import LoopClient, discover
from mesh.auth.jwt import is_app_only, redact, sign, unverified_claims
from mesh.auth.runtime import ClientCredential, ca_path, client_credential, resolve_issuer
from mesh.auth.runtime import ssl_context as make_ssl_context
from mesh.config import MeshConfig
from mesh.errors import ConfigError, MeshError, Unauthenticated, Unavailable

log = logging.getLogger("mesh.auth.exchange")

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_INTERACTION_ERRORS = frozenset({"interaction_required", "consent_required", "login_required"})
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


class TokenExchanger(Protocol):
    """Turns the incoming user token into one for ``audience`` (the next hop)."""

    async def token_for(self, subject_token: str, audience: str) -> str: ...

    async def aclose(self) -> None: ...


class RawExchanger(Protocol):
    """Identity-provider round trips, each giving ``(token, expires_at epoch seconds)``."""

    async def exchange(self, subject_token: str, audience: str) -> tuple[str, float]: ...

    async def client_token(self, audience: str) -> tuple[str, float]: ...

    async def aclose(self) -> None: ...


def _describe(body: Mapping[str, Any]) -> str:
    desc = body.get("error_description")
    text = redact(str(desc))[:300] if isinstance(desc, str) and desc else ""
    return f"{body.get('error')}: {text}" if text else str(body.get("error"))


def error_from_response(body: Mapping[str, Any], status: int | None = None) -> MeshError:
    """Map an OAuth2 error response (or msal's result dict) to a MeshError."""
    error = str(body.get("error") or "unknown_error")
    meta = {"error": error}
    if isinstance(body.get("suberror"), str):
        meta["suberror"] = body["suberror"]
    claims = body.get("claims")
    if isinstance(claims, str) and claims:
        meta["claims"] = claims
    if error in _TRANSIENT_ERRORS or (status is not None and status >= 500):
        return Unavailable(f"identity provider failed: {_describe(body)}", metadata=meta)
    if error in _INTERACTION_ERRORS or "claims" in meta:
        return Unauthenticated(
            f"identity provider requires user interaction: {_describe(body)}", metadata=meta
        )
    return Unauthenticated(f"token exchange refused: {_describe(body)}", metadata=meta)


def _expiry(token: str, expires_in: object, now: float) -> float:
    """When a freshly issued token stops being usable: its ``exp``, else ``expires_in``."""
    candidates: list[float] = []
    if isinstance(expires_in, int | float | str):
        with contextlib.suppress(ValueError):
            candidates.append(now + float(expires_in))
    try:
        exp = unverified_claims(token).get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            candidates.append(float(exp))
    except MeshError:
        pass  # opaque tokens are fine; expires_in is then the only clock
    return min(candidates) if candidates else now


class ExchangeCache:
    """Exchanged tokens by (SHA-256 of subject token, audience), dropped ``skew_s`` early."""

    def __init__(
        self, max_entries: int = 4096, skew_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.skew_s = skew_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    @staticmethod
    def key(subject_token: str, audience: str) -> tuple[str, str]:
        return hashlib.sha256(subject_token.encode()).hexdigest(), audience

    def get(self, key: tuple[str, str]) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        token, expires_at = entry
        if expires_at - self.skew_s <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return token

    def put(self, key: tuple[str, str], token: str, expires_at: float) -> None:
        if expires_at - self.skew_s <= self._clock():
            return  # would be stale at once
        self._entries[key] = (token, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class CachingExchanger:
    """The :class:`TokenExchanger` the interceptors use: app-only refusal, cache,
    single flight, and exceptions normalised to MeshError."""

    def __init__(self, inner: RawExchanger, cache: ExchangeCache | None = None) -> None:
        self.inner = inner
        self.cache = cache or ExchangeCache()
        self._inflight: dict[tuple[str, str], asyncio.Future[str]] = {}

    async def token_for(self, subject_token: str, audience: str) -> str:
        claims = unverified_claims(subject_token)
        if is_app_only(claims):
            raise Unauthenticated("an app-only token cannot be exchanged on behalf of a user")
        key = self.cache.key(subject_token, audience)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token, expires_at = await self.inner.exchange(subject_token, audience)
        except MeshError as err:
            future.set_exception(err)
            future.exception()  # marked retrieved: no warning when nobody else waits
            raise
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - never leak a library error's text
            mapped = Unavailable(f"token exchange failed: {type(err).__name__}")
            future.set_exception(mapped)
            future.exception()
            raise mapped from None
        finally:
            self._inflight.pop(key, None)
        self.cache.put(key, token, expires_at)
        future.set_result(token)
        return token

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- RFC 8693 (and the embedded STS) ----------------------------------------------------------


class Rfc8693Exchanger:
    """RFC 8693 token exchange over httpx, authenticating as the service."""

    def __init__(
        self,
        *,
        credential: ClientCredential,
        issuer: str,
        token_url: str = "",
        verify: ssl.SSLContext | bool | Callable[[], ssl.SSLContext | bool] = True,
        timeout_s: float = 5.0,
        send_actor_token: bool = True,
        actor_audience: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credential = credential
        self.issuer = issuer
        self.token_url = token_url
        self.send_actor_token = send_actor_token
        self.actor_audience = actor_audience
        self._client = LoopClient(verify, timeout_s)
        self._clock = clock
        self._actor: tuple[str, float] | None = None

    def _http(self) -> httpx.AsyncClient:
        return self._client.get()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _endpoint(self) -> str:
        if not self.token_url:
            url = await discover(self._http(), self.issuer, "token_endpoint")
            if not url.startswith("https://"):
                raise Unavailable("identity provider discovery has no https token_endpoint")
            self.token_url = url
        return self.token_url

    def _client_auth(self, url: str) -> tuple[dict[str, str], tuple[str, str] | None]:
        cred = self.credential
        if cred.private_key_pem and cred.thumbprint_hex:
            now = int(self._clock())
            claims = {
                "iss": cred.client_id,
                "sub": cred.client_id,
                "aud": url,
                "iat": now,
                "nbf": now,
                "exp": now + 300,
                "jti": secrets.token_urlsafe(16),
            }
            import base64

            x5t = base64.urlsafe_b64encode(bytes.fromhex(cred.thumbprint_hex)).rstrip(b"=")
            assertion = sign(
                claims, cred.private_key_pem, kid=x5t.decode(), headers={"x5t": x5t.decode()}
            )
            return {
                "client_id": cred.client_id,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            }, None
        if cred.secret is None:
            raise ConfigError(f"client {cred.client_id}: no secret or certificate")
        return {}, (cred.client_id, cred.secret)

    async def _post(self, form: dict[str, str]) -> dict[str, Any]:
        url = await self._endpoint()
        extra, basic = self._client_auth(url)
        try:
            if basic is None:
                response = await self._http().post(url, data={**form, **extra})
            else:
                response = await self._http().post(url, data={**form, **extra}, auth=basic)
        except httpx.HTTPError as err:
            raise Unavailable(f"identity provider unreachable: {type(err).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Unavailable(
                f"identity provider answered HTTP {response.status_code} without a JSON body"
            )
        if response.status_code != 200 or "access_token" not in body:
            raise error_from_response(body, response.status_code)
        if not isinstance(body["access_token"], str):
            raise Unavailable("identity provider returned a malformed token response")
        return body

    async def _actor_token(self) -> str:
        now = self._clock()
        if self._actor is not None and self._actor[1] - 60 > now:
            return self._actor[0]
        form = {"grant_type": "client_credentials"}
        if self.actor_audience:
            form["audience"] = self.actor_audience
        body = await self._post(form)
        token = str(body["access_token"])
        self._actor = (token, _expiry(token, body.get("expires_in"), now))
        return token

    async def client_token(self, audience: str) -> tuple[str, float]:
        """The service's own client-credentials token for ``audience``."""
        now = self._clock()
        body = await self._post({"grant_type": "client_credentials", "audience": audience})
        token = str(body["access_token"])
        return token, _expiry(token, body.get("expires_in"), now)

    async def exchange(self, subject_token: str, audience: str) -> tuple[str, float]:
        form = {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": TOKEN_TYPE_ACCESS,
            "requested_token_type": TOKEN_TYPE_ACCESS,
            "audience": audience,
        }
        if self.send_actor_token:
            form["actor_token"] = await self._actor_token()
            form["actor_token_type"] = TOKEN_TYPE_ACCESS
        now = self._clock()
        body = await self._post(form)
        token = str(body["access_token"])
        return token, _expiry(token, body.get("expires_in"), now)


# -- Entra ID on-behalf-of (msal) ---------------------------------------------------------------


class _TimeoutSession(requests.Session):
    """A requests session with a default timeout that ignores proxy/CA env variables
    (``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would silently override ``verify``)."""

    def __init__(self, verify: str | bool, timeout_s: float) -> None:
        super().__init__()
        self.trust_env = False
        self.verify = verify
        self._timeout_s = timeout_s

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout_s)
        return super().request(method, url, *args, **kwargs)


class EntraExchanger:
    """Entra ID on-behalf-of through msal's real ``ConfidentialClientApplication``."""

    def __init__(
        self,
        *,
        credential: ClientCredential,
        authority: str,
        validate_authority: bool = True,
        ca_file: Path | None = None,
        timeout_s: float = 5.0,
        scope_template: str = "{audience}/.default",
    ) -> None:
        self.credential = credential
        self.authority = authority
        self.validate_authority = validate_authority
        self.scope_template = scope_template
        self._timeout_s = timeout_s
        self._verify: str | bool = str(ca_file) if ca_file else True
        self._app: Any = None
        self._app_lock = asyncio.Lock()
        self._app_loop: asyncio.AbstractEventLoop | None = None

    def _client_credential(self) -> str | dict[str, str]:
        cred = self.credential
        if cred.private_key_pem and cred.thumbprint_hex:
            out = {"private_key": cred.private_key_pem, "thumbprint": cred.thumbprint_hex}
            if cred.certificate_pem:
                out["public_certificate"] = cred.certificate_pem
            return out
        if cred.secret is None:
            raise ConfigError(f"client {cred.client_id}: no secret or certificate")
        return cred.secret

    def _build_app(self) -> Any:
        import msal  # type: ignore[import-untyped]

        return msal.ConfidentialClientApplication(
            self.credential.client_id,
            client_credential=self._client_credential(),
            authority=self.authority,
            validate_authority=self.validate_authority,
            instance_discovery=None if self.validate_authority else False,
            http_client=_TimeoutSession(self._verify, self._timeout_s),
        )

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(func, *args), timeout=self._timeout_s * 2 + 1
            )
        except TimeoutError:
            raise Unavailable("identity provider timed out") from None
        except requests.RequestException as err:
            raise Unavailable(f"identity provider unreachable: {type(err).__name__}") from None
        except ValueError as err:  # msal: discovery failed / malformed response
            raise Unavailable(f"identity provider discovery failed: {type(err).__name__}") from None

    async def _application(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._app_loop is not loop:
            self._app_lock, self._app_loop = asyncio.Lock(), loop
        async with self._app_lock:
            if self._app is None:
                self._app = await self._run(self._build_app)  # discovery is network I/O
            return self._app

    async def exchange(self, subject_token: str, audience: str) -> tuple[str, float]:
        app = await self._application()
        scope = self.scope_template.format(audience=audience)
        now = time.time()
        result = await self._run(app.acquire_token_on_behalf_of, subject_token, [scope])
        if not isinstance(result, dict):
            raise Unavailable("identity provider returned no result")
        if "access_token" not in result:
            raise error_from_response(result)
        token = str(result["access_token"])
        return token, _expiry(token, result.get("expires_in"), now)

    async def client_token(self, audience: str) -> tuple[str, float]:
        """The service's own app token for ``audience`` (msal caches these itself)."""
        app = await self._application()
        now = time.time()
        scope = self.scope_template.format(audience=audience)
        result = await self._run(app.acquire_token_for_client, [scope])
        if not isinstance(result, dict) or "access_token" not in result:
            raise error_from_response(result if isinstance(result, dict) else {})
        token = str(result["access_token"])
        return token, _expiry(token, result.get("expires_in"), now)

    async def aclose(self) -> None:
        self._app = None


# -- construction ----------------------------------------------------------------------------


def build_exchanger(config: MeshConfig, service: str) -> CachingExchanger:
    """The exchanger ``service`` uses for its outgoing calls, per ``auth.exchanger``."""
    auth = config.auth
    credential = client_credential(config, service)
    cache = ExchangeCache(auth.exchange_cache_size, auth.exchange_skew_s)
    inner: RawExchanger
    if auth.exchanger == "entra":
        authority = auth.entra.authority or f"{resolve_issuer(config)}/{auth.sts.tenant}"
        inner = EntraExchanger(
            credential=credential,
            authority=authority,
            validate_authority=auth.entra.validate_authority if auth.entra.authority else False,
            ca_file=ca_path(config),
            timeout_s=auth.http_timeout_s,
            scope_template=auth.entra.scope_template,
        )
    else:
        inner = Rfc8693Exchanger(
            credential=credential,
            issuer=resolve_issuer(config),
            token_url=auth.rfc8693.token_url if auth.exchanger == "rfc8693" else "",
            verify=lambda: make_ssl_context(config),
            timeout_s=auth.http_timeout_s,
            send_actor_token=auth.rfc8693.send_actor_token,
            actor_audience=auth.rfc8693.actor_audience if auth.exchanger == "rfc8693" else "",
        )
    return CachingExchanger(inner, cache)


_SHARED: dict[tuple[int, str], tuple[MeshConfig, CachingExchanger]] = {}


def exchanger_for(config: MeshConfig, service: str) -> CachingExchanger:
    """One shared exchanger (and cache) per config and calling service in this process."""
    key = (id(config), service)
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not config:
        entry = (config, build_exchanger(config, service))
        _SHARED[key] = entry
    return entry[1]


# -- token sources (callers without an incoming token) -----------------------------------------


class TokenSource(Protocol):
    """Where a caller with no incoming call gets its own token (``mesh chat``, scripts)."""

    async def token(self) -> str: ...


class StaticTokenSource:
    """A token handed over explicitly (``--token``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticTokenSource(<token>)"


class EnvTokenSource:
    """A token read from an environment variable at call time (``MESH_TOKEN``)."""

    def __init__(self, variable: str = "MESH_TOKEN") -> None:
        self.variable = variable

    async def token(self) -> str:
        value = os.environ.get(self.variable, "").strip()
        if not value:
            raise Unauthenticated(f"no token: ${self.variable} is not set")
        return value


class StsUserTokenSource:
    """Mints a user token with the embedded STS's keys on disk (local runs only), and
    mints again shortly before it expires."""

    def __init__(
        self,
        config: MeshConfig,
        sub: str,
        scopes: list[str] | None = None,
        ttl_s: int | None = None,
        audience: str | None = None,
    ) -> None:
        self.config = config
        self.sub = sub
        self.scopes = scopes
        self.ttl_s = ttl_s
        self.audience = audience
        self._cached: tuple[str, float] | None = None

    async def token(self) -> str:
        from mesh.auth.sts import mint_user_token

        now = time.time()
        if self._cached is None or self._cached[1] - 30 <= now:
            token = mint_user_token(
                self.config, self.sub, self.scopes, self.ttl_s, audience=self.audience
            )
            self._cached = (token, _expiry(token, None, now))
        return self._cached[0]


class ClientCredentialsSource:
    """The calling service's own token for ``audience`` (client credentials), cached
    until shortly before expiry: for calls a service makes as itself (an agent
    registering with the router)."""

    def __init__(self, inner: RawExchanger, audience: str, skew_s: float = 60.0) -> None:
        self.inner = inner
        self.audience = audience
        self.skew_s = skew_s
        self._cached: tuple[str, float] | None = None

    async def token(self) -> str:
        if self._cached is None or self._cached[1] - self.skew_s <= time.time():
            try:
                self._cached = await self.inner.client_token(self.audience)
            except MeshError:
                raise
            except Exception as err:  # noqa: BLE001
                raise Unavailable(f"client credentials failed: {type(err).__name__}") from None
        return self._cached[0]


def describe_error(err: BaseException) -> str:
    """A log-safe one-liner for an exchange failure."""
    if isinstance(err, MeshError):
        return redact(err.message)
    return type(err).__name__


__all__ = [
    "CachingExchanger",
    "ClientCredentialsSource",
    "EntraExchanger",
    "EnvTokenSource",
    "ExchangeCache",
    "Rfc8693Exchanger",
    "StaticTokenSource",
    "StsUserTokenSource",
    "TokenExchanger",
    "TokenSource",
    "build_exchanger",
    "error_from_response",
    "exchanger_for",
]
