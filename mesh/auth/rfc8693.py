"""RFC 8693 token exchange over httpx (Keycloak-style issuers and the embedded STS).

The service authenticates with its secret (HTTP Basic) or a short-lived
``private_key_jwt`` assertion, and sends its own client-credentials token as
``actor_token`` so the issuer nests ``act``.
"""

from __future__ import annotations

import base64
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from mesh.auth.jwks import LoopClient, discover
from mesh.auth.jwt import HOPS_CLAIM, sign
from mesh.auth.runtime import ClientCredential
from mesh.auth.tokens import error_from_response, expiry
from mesh.errors import ConfigError, Unavailable

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Lifetime of the client assertions this side makes (RFC 7523: short).
ASSERTION_LIFETIME_S = 120
PREVIOUS_TOKEN = "mesh_previous_token"  # noqa: S105 - a parameter name


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
                "exp": now + ASSERTION_LIFETIME_S,
                "jti": secrets.token_urlsafe(16),
            }
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
        self._actor = (token, expiry(token, body.get("expires_in"), now))
        return token

    async def client_token(self, audience: str) -> tuple[str, float]:
        """The service's own client-credentials token for ``audience``."""
        now = self._clock()
        body = await self._post({"grant_type": "client_credentials", "audience": audience})
        token = str(body["access_token"])
        return token, expiry(token, body.get("expires_in"), now)

    async def exchange(
        self,
        subject_token: str,
        audience: str,
        *,
        scopes: Sequence[str] | None = None,
        hops: int | None = None,
        previous: str | None = None,
    ) -> tuple[str, float]:
        """RFC 8693 exchange for ``audience``; ``scopes`` narrow the token (``scope``) and
        ``hops`` asks for a hop budget (``mesh_hops``) and ``previous`` passes the token the
        previous agent held (``mesh_previous_token``, extending the ``act`` chain): both
        parameters the embedded STS understands; other issuers map them with a
        token-exchange policy or ignore them."""
        form = {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": TOKEN_TYPE_ACCESS,
            "requested_token_type": TOKEN_TYPE_ACCESS,
            "audience": audience,
        }
        if scopes:
            form["scope"] = " ".join(scopes)
        if hops is not None:
            form[HOPS_CLAIM] = str(hops)
        if previous is not None:
            form[PREVIOUS_TOKEN] = previous
        if self.send_actor_token:
            form["actor_token"] = await self._actor_token()
            form["actor_token_type"] = TOKEN_TYPE_ACCESS
        now = self._clock()
        body = await self._post(form)
        token = str(body["access_token"])
        return token, expiry(token, body.get("expires_in"), now)
