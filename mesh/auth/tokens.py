"""Tokens for the next hop: the exchanger protocols, the cache and :class:`HopTokens`.

:class:`HopTokens` is what callers use, with or without interceptors:

- ``for_hop(subject_token, audience, scopes=..., hops_remaining=...)``: the user's
  token exchanged for exactly ``audience``, narrowed to ``scopes`` and carrying the
  remaining hop budget; refused before any identity-provider call when the client's
  audience policy (:mod:`mesh.auth.policy`) does not allow it or the token is app-only;
  cached per (subject token, audience, scopes, hops) until shortly before expiry and
  looked up without decoding anything; concurrent identical requests share one exchange.
- ``service_token(audience)``: the service's own client-credentials token, same policy.

Failures are :class:`~mesh.errors.Unavailable` (identity provider unreachable or
failing), :class:`~mesh.errors.PermissionDenied` (policy, missing scope) or
:class:`~mesh.errors.Unauthenticated` (refused; a claims challenge travels in the
ErrorInfo metadata). No token or secret is logged or put in a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

from mesh import telemetry
from mesh.auth.jwt import is_app_only, redact, unverified_claims
from mesh.auth.policy import ClientPolicy
from mesh.errors import MeshError, PermissionDenied, Unauthenticated, Unavailable

_INTERACTION_ERRORS = frozenset({"interaction_required", "consent_required", "login_required"})
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_SCOPE_ERRORS = frozenset({"invalid_scope", "invalid_target", "unauthorized_client"})


class TokenExchanger(Protocol):
    """Turns the incoming user token into one for ``audience`` (the next hop)."""

    async def token_for(self, subject_token: str, audience: str) -> str: ...

    async def aclose(self) -> None: ...


class RawExchanger(Protocol):
    """Identity-provider round trips, each giving ``(token, expires_at epoch seconds)``."""

    async def exchange(
        self,
        subject_token: str,
        audience: str,
        *,
        scopes: Sequence[str] | None = None,
        hops: int | None = None,
        previous: str | None = None,
    ) -> tuple[str, float]: ...

    async def client_token(self, audience: str) -> tuple[str, float]: ...

    async def aclose(self) -> None: ...


class TokenSource(Protocol):
    """Where a caller with no incoming call gets its own token (``mesh chat``, scripts)."""

    async def token(self) -> str: ...


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
    if error in _SCOPE_ERRORS:
        return PermissionDenied(f"token exchange refused: {_describe(body)}", metadata=meta)
    return Unauthenticated(f"token exchange refused: {_describe(body)}", metadata=meta)


def expiry(token: str, expires_in: object, now: float) -> float:
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
    """Issued tokens by key (the subject token, audience, scopes, hops), LRU-bounded and
    dropped ``skew_s`` before they expire. Keys hold the subject token itself: a str
    caches its hash, so a lookup never hashes or decodes the token again."""

    def __init__(
        self, max_entries: int = 4096, skew_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.skew_s = skew_s
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[str, float]] = OrderedDict()

    @staticmethod
    def key(subject_token: str, audience: str) -> tuple[str, str]:
        return subject_token, audience

    def get(self, key: Hashable) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        token, expires_at = entry
        if expires_at - self.skew_s <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return token

    def put(self, key: Hashable, token: str, expires_at: float) -> None:
        if expires_at - self.skew_s <= self._clock():
            return  # would be stale at once
        self._entries[key] = (token, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class HopTokens:
    """Tokens a service sends on its outgoing calls (see the module docstring).

    Also a :class:`TokenExchanger` (``token_for``) for the client interceptors.
    """

    def __init__(
        self,
        inner: RawExchanger,
        cache: ExchangeCache | None = None,
        policy: ClientPolicy | None = None,
    ) -> None:
        self.inner = inner
        self.cache = cache or ExchangeCache()
        self.policy = policy
        self._inflight: dict[Hashable, asyncio.Future[str]] = {}

    async def token_for(self, subject_token: str, audience: str) -> str:
        return await self.for_hop(subject_token, audience)

    async def for_hop(
        self,
        subject_token: str,
        audience: str,
        *,
        scopes: Sequence[str] | None = None,
        hops_remaining: int | None = None,
        previous: str | None = None,
    ) -> str:
        """The user's token exchanged for exactly ``audience`` (see the module docstring).

        ``previous``: the token the agent handing the turn over held (TRANSFER/CONSULT
        from it); the new token's ``act`` chain then runs through that agent, its hop
        budget cannot exceed that token's, and its scopes still come from the user's
        ``subject_token`` (intersected with ``scopes``)."""
        wanted = tuple(sorted(set(scopes))) if scopes is not None else None
        key = ("hop", subject_token, audience, wanted, hops_remaining, previous)
        cached = self.cache.get(key)
        if cached is not None:
            telemetry.metrics.token_exchanges.labels(audience, "cache_hit").inc()
            return cached
        telemetry.metrics.token_exchanges.labels(audience, "exchanged").inc()
        if self.policy is not None:
            self.policy.check(audience, delegated=True)
        if is_app_only(unverified_claims(subject_token)):
            raise Unauthenticated("an app-only token cannot be exchanged on behalf of a user")
        return await self._single_flight(
            key,
            lambda: self.inner.exchange(
                subject_token, audience, scopes=wanted, hops=hops_remaining, previous=previous
            ),
        )

    async def service_token(self, audience: str) -> str:
        """This service's own client-credentials token for ``audience``."""
        key = ("app", audience)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self.policy is not None:
            self.policy.check(audience, delegated=False)
        return await self._single_flight(key, lambda: self.inner.client_token(audience))

    async def _single_flight(self, key: Hashable, fetch: Callable[[], Any]) -> str:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token, expires_at = await fetch()
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
        return str(token)

    async def aclose(self) -> None:
        await self.inner.aclose()


#: The former name of :class:`HopTokens`.
CachingExchanger = HopTokens


def describe_error(err: BaseException) -> str:
    """A log-safe one-liner for an exchange failure."""
    if isinstance(err, MeshError):
        return redact(err.message)
    return type(err).__name__


__all__ = [
    "CachingExchanger",
    "ExchangeCache",
    "HopTokens",
    "RawExchanger",
    "TokenExchanger",
    "TokenSource",
    "describe_error",
    "error_from_response",
    "expiry",
]
