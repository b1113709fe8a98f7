"""Getting a token for the next hop: which exchanger a service uses, one per process.

Three implementations of :class:`~mesh.auth.tokens.RawExchanger`, chosen by
``auth.exchanger``:

- ``entra``: msal on-behalf-of (:mod:`mesh.auth.entra`);
- ``rfc8693``: RFC 8693 token exchange (:mod:`mesh.auth.rfc8693`);
- ``embedded`` (default): RFC 8693 against the embedded STS.

All of them sit behind :class:`~mesh.auth.tokens.HopTokens`, which applies the
service's audience policy (:mod:`mesh.auth.policy`) before any identity-provider call,
refuses app-only subject tokens, caches and joins concurrent identical requests. This
module also re-exports the names other code imported from it before the split.
"""

from __future__ import annotations

from mesh.auth.entra import EntraExchanger
from mesh.auth.policy import client_policy
from mesh.auth.rfc8693 import Rfc8693Exchanger
from mesh.auth.runtime import ca_path, client_credential, resolve_issuer
from mesh.auth.runtime import ssl_context as make_ssl_context
from mesh.auth.sources import (
    ClientCredentialsSource,
    EnvTokenSource,
    StaticTokenSource,
    StsUserTokenSource,
)
from mesh.auth.tokens import (
    CachingExchanger,
    ExchangeCache,
    HopTokens,
    RawExchanger,
    TokenExchanger,
    TokenSource,
    describe_error,
    error_from_response,
)
from mesh.config import MeshConfig


def build_exchanger(config: MeshConfig, service: str) -> HopTokens:
    """The tokens ``service`` sends on its outgoing calls, per ``auth.exchanger``."""
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
    return HopTokens(inner, cache, client_policy(config, service))


_SHARED: dict[tuple[int, str], tuple[MeshConfig, HopTokens]] = {}


def hop_tokens(config: MeshConfig, service: str) -> HopTokens:
    """One shared :class:`HopTokens` (and cache) per config and calling service in this
    process: the router calls ``hop_tokens(config, "router").for_hop(...)`` and
    ``.service_token(audience)`` and puts ``authorization`` into the call's metadata."""
    key = (id(config), service)
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not config:
        entry = (config, build_exchanger(config, service))
        _SHARED[key] = entry
    return entry[1]


#: The former name of :func:`hop_tokens`.
exchanger_for = hop_tokens


__all__ = [
    "CachingExchanger",
    "ClientCredentialsSource",
    "EntraExchanger",
    "EnvTokenSource",
    "ExchangeCache",
    "HopTokens",
    "Rfc8693Exchanger",
    "StaticTokenSource",
    "StsUserTokenSource",
    "TokenExchanger",
    "TokenSource",
    "build_exchanger",
    "describe_error",
    "error_from_response",
    "exchanger_for",
    "hop_tokens",
]
