"""Microsoft Entra ID on-behalf-of through msal's real ``ConfidentialClientApplication``.

msal never answers on-behalf-of from its cache (:class:`~mesh.auth.tokens.HopTokens`
caches), refuses plain-http authorities, and takes its TLS trust from a
``requests.Session`` that must ignore the CA environment variables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from mesh.auth.runtime import ClientCredential
from mesh.auth.tokens import error_from_response, expiry
from mesh.errors import ConfigError, Unavailable


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

    async def exchange(
        self,
        subject_token: str,
        audience: str,
        *,
        scopes: Sequence[str] | None = None,
        hops: int | None = None,
        previous: str | None = None,
    ) -> tuple[str, float]:
        """On-behalf-of for ``audience``: the named delegated ``scopes`` of that API, or its
        ``.default``. Entra cannot add a hop-budget claim (``hops`` is not sent; the
        router's hop path carries the budget) nor take ``previous`` (the audit log's hop
        path records the chain)."""
        app = await self._application()
        if scopes:
            wanted = [f"{audience.rstrip('/')}/{s}" for s in scopes]
        else:
            wanted = [self.scope_template.format(audience=audience)]
        now = time.time()
        result = await self._run(app.acquire_token_on_behalf_of, subject_token, wanted)
        if not isinstance(result, dict):
            raise Unavailable("identity provider returned no result")
        if "access_token" not in result:
            raise error_from_response(result)
        token = str(result["access_token"])
        return token, expiry(token, result.get("expires_in"), now)

    async def client_token(self, audience: str) -> tuple[str, float]:
        """The service's own app token for ``audience`` (msal caches these itself)."""
        app = await self._application()
        now = time.time()
        scope = self.scope_template.format(audience=audience)
        result = await self._run(app.acquire_token_for_client, [scope])
        if not isinstance(result, dict) or "access_token" not in result:
            raise error_from_response(result if isinstance(result, dict) else {})
        token = str(result["access_token"])
        return token, expiry(token, result.get("expires_in"), now)

    async def aclose(self) -> None:
        self._app = None
