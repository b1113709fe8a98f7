"""Token sources: where a caller with no incoming call gets its token."""

from __future__ import annotations

import os
import time

from mesh.auth.tokens import RawExchanger, TokenSource, expiry
from mesh.config import MeshConfig
from mesh.errors import MeshError, Unauthenticated, Unavailable


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
            self._cached = (token, expiry(token, None, now))
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


__all__ = [
    "ClientCredentialsSource",
    "EnvTokenSource",
    "StaticTokenSource",
    "StsUserTokenSource",
    "TokenSource",
]
