"""An async JWKS cache that picks keys by ``kid`` and refetches sparingly.

- The first lookup fetches the JWKS (finding ``jwks_uri`` through the issuer's
  OpenID discovery document when no URL is configured).
- A known ``kid`` is served from memory until the set is ``max_age_s`` old.
- An unknown ``kid`` refetches at most once per ``refresh_window_s``, however many
  unknown kids arrive (concurrent lookups share one fetch), so a flood of forged
  kids cannot hammer the identity provider; a key rotation is picked up by the
  first token signed with the new key once the window has passed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from mesh import telemetry
from mesh.errors import Unauthenticated, Unavailable

log = logging.getLogger("mesh.auth.jwks")
_MAX_JWKS_BYTES = 512 * 1024


async def fetch_json(client: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
    """GET ``url`` as a JSON object, mapping failures to Unavailable."""
    try:
        response = await client.get(url)
    except httpx.HTTPError as err:
        raise Unavailable(f"{what} unreachable: {type(err).__name__}") from None
    if response.status_code != 200:
        raise Unavailable(f"{what} answered HTTP {response.status_code}")
    if len(response.content) > _MAX_JWKS_BYTES:
        raise Unavailable(f"{what} too large")
    try:
        body = response.json()
    except ValueError:
        raise Unavailable(f"{what} is not JSON") from None
    if not isinstance(body, dict):
        raise Unavailable(f"{what} is not a JSON object")
    return body


Verify = ssl.SSLContext | bool | Callable[[], ssl.SSLContext | bool]


class LoopClient:
    """One httpx client per event loop (a client is bound to the loop it was made on),
    ignoring proxy/CA environment variables, with a timeout on every call."""

    def __init__(self, verify: Verify, timeout_s: float) -> None:
        self._verify = verify
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            verify = self._verify() if callable(self._verify) else self._verify
            self._client = httpx.AsyncClient(
                verify=verify, timeout=self._timeout_s, trust_env=False, follow_redirects=False
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def discover(client: httpx.AsyncClient, issuer: str, field: str) -> str:
    """An endpoint URL (``field``) from the issuer's OpenID discovery document."""
    doc = await fetch_json(
        client,
        issuer.rstrip("/") + "/.well-known/openid-configuration",
        "identity provider discovery",
    )
    url = doc.get(field)
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise Unavailable(f"identity provider discovery has no {field}")
    return url


class JwksCache:
    """Public signing keys of one issuer, by ``kid``.

    Fetches are single-flight: one task fetches for every waiter, and it is shielded,
    so a caller that gives up (a cancelled RPC) neither cancels it nor leaves the cache
    without keys. Only a fetch that failed starts a short backoff
    (``failure_backoff_s``); an unknown ``kid`` refetches at most once per
    ``refresh_window_s`` after the last successful fetch.
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str = "",
        verify: Verify = True,
        timeout_s: float = 5.0,
        refresh_window_s: float = 30.0,
        max_age_s: float = 3600.0,
        failure_backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.refresh_window_s = refresh_window_s
        self.max_age_s = max_age_s
        self.failure_backoff_s = failure_backoff_s
        self._http = LoopClient(verify, timeout_s)
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._fetched_at: float | None = None
        self._failed_at: float | None = None
        self._fetch: asyncio.Task[None] | None = None
        #: JWKS fetches started so far (tests assert on it).
        self.fetch_count = 0

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at <= self.max_age_s

    def _may_fetch(self, now: float) -> bool:
        if self._failed_at is not None and now - self._failed_at < self.failure_backoff_s:
            return False
        if self._fetched_at is None or not self._fresh(now):
            return True
        return now - self._fetched_at >= self.refresh_window_s  # an unknown kid

    def _running_fetch(self) -> asyncio.Task[None] | None:
        task = self._fetch
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return None
        return task

    def _start_fetch(self) -> asyncio.Task[None]:
        self.fetch_count += 1
        task = asyncio.get_running_loop().create_task(self._refresh(), name="jwks-fetch")
        task.add_done_callback(_retrieve)
        self._fetch = task
        return task

    async def key_for(self, kid: str) -> Mapping[str, Any]:
        """The JWK for ``kid``; Unauthenticated when the issuer does not publish it."""
        now = self._clock()
        if kid in self._keys and self._fresh(now):
            return self._keys[kid]
        task = self._running_fetch()
        if task is None and self._may_fetch(now):
            task = self._start_fetch()
        if task is not None:
            try:
                await asyncio.shield(task)
            except Unavailable:
                if kid not in self._keys:
                    raise
                log.warning("JWKS refresh failed; using the cached keys")
        elif self._fetched_at is None:
            raise Unavailable("identity provider signing keys unavailable")
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("token signed with an unknown key (kid)")
        return key

    async def _refresh(self) -> None:
        try:
            client = self._http.get()
            url = self.jwks_url
            if not url:
                url = self.jwks_url = await discover(client, self.issuer, "jwks_uri")
            body = await fetch_json(client, url, "identity provider JWKS")
        except Unavailable:
            self._failed_at = self._clock()
            telemetry.metrics.jwks_fetches.labels("error").inc()
            raise
        except Exception as err:  # noqa: BLE001 - any other failure is the IdP's too
            self._failed_at = self._clock()
            telemetry.metrics.jwks_fetches.labels("error").inc()
            raise Unavailable(f"identity provider JWKS failed: {type(err).__name__}") from None
        telemetry.metrics.jwks_fetches.labels("ok").inc()
        keys: dict[str, dict[str, Any]] = {}
        raw_keys = body.get("keys")
        for item in raw_keys if isinstance(raw_keys, list) else []:
            if isinstance(item, dict) and isinstance(item.get("kid"), str):
                keys[item["kid"]] = item
        self._keys = keys
        self._fetched_at = self._clock()
        self._failed_at = None
        log.debug("fetched %d signing keys", len(keys))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a fetch's failure as seen (its waiters may all have gone)."""
    if not task.cancelled():
        task.exception()
