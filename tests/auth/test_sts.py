"""The embedded token service over real HTTPS, and the exchangers against it:
msal's unpatched on-behalf-of path (secret and certificate), RFC 8693 with nested
``act``, caching, claims challenges, app-only refusal and failure mapping."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import httpx
import msal  # type: ignore[import-untyped]
import pytest

from mesh.auth.exchange import (
    CachingExchanger,
    EntraExchanger,
    Rfc8693Exchanger,
    build_exchanger,
)
from mesh.auth.jwt import unverified_claims
from mesh.auth.runtime import ClientCredential, client_credential, dev_client_secret
from mesh.auth.sts import GRANT_JWT_BEARER, TokenService, mint, mint_user_token
from mesh.config import MeshConfig
from mesh.errors import Unauthenticated, Unavailable
from tests.auth.conftest import ROUTER_SECRET, with_auth


def _tls(sts: TokenService) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sts.ca_file))


async def _post(
    sts: TokenService, form: dict[str, str], auth: tuple[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(verify=_tls(sts), trust_env=False, timeout=10) as client:
        if auth is None:
            return await client.post(sts.token_endpoint, data=form)
        return await client.post(sts.token_endpoint, data=form, auth=auth)


def _tokens(sts: TokenService) -> int:
    return sts.stats["token"]


async def test_discovery_and_jwks_over_https(sts: TokenService) -> None:
    async with httpx.AsyncClient(verify=_tls(sts), trust_env=False, timeout=10) as client:
        doc = (await client.get(f"{sts.url}/.well-known/openid-configuration")).json()
        tenant_doc = (
            await client.get(f"{sts.authority}/v2.0/.well-known/openid-configuration")
        ).json()
        jwks = (await client.get(doc["jwks_uri"])).json()
        stats = (await client.get(f"{sts.url}/_stats")).json()
    assert doc == tenant_doc
    assert doc["issuer"] == sts.url
    assert doc["token_endpoint"].startswith("https://")
    assert doc["authorization_endpoint"].startswith("https://")
    assert all(k["kty"] == "RSA" and k["alg"] == "RS256" and k["kid"] for k in jwks["keys"])
    assert all(not {"d", "p", "q"} & set(k) for k in jwks["keys"])  # no private parts
    assert stats["jwks"] >= 1


async def test_plain_http_and_untrusted_clients_are_refused(sts: TokenService) -> None:
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=None), trust_env=False, timeout=10
    ) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{sts.url}/.well-known/openid-configuration")
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(sts.url.replace("https://", "http://") + "/_stats")


async def test_msal_obo_with_secret_caches_per_user_and_audience(
    entra_config: MeshConfig, sts: TokenService
) -> None:
    exchanger = build_exchanger(entra_config, "router")
    assert isinstance(exchanger.inner, EntraExchanger)
    alice = mint_user_token(entra_config, "alice")
    bob = mint_user_token(entra_config, "bob")

    first = await exchanger.token_for(alice, "mesh-agent-a")
    claims = unverified_claims(first)
    assert claims["sub"] == "alice"
    assert claims["aud"] == "mesh-agent-a"
    assert claims["azp"] == "mesh-router"
    assert claims["act"] == {"sub": "mesh-router"}
    assert claims["scp"] == "mesh.chat"

    before = _tokens(sts)
    assert await exchanger.token_for(alice, "mesh-agent-a") == first
    assert _tokens(sts) == before, "second call for the same user+audience hit the IdP"

    other = await exchanger.token_for(bob, "mesh-agent-a")
    assert unverified_claims(other)["sub"] == "bob"
    await exchanger.token_for(alice, "mesh-agent-b")
    assert _tokens(sts) == before + 2


async def test_msal_obo_with_certificate(config: MeshConfig, sts: TokenService) -> None:
    cfg = with_auth(config, exchanger="entra")
    credential = client_credential(cfg, "a")
    assert credential.private_key_pem and credential.secret is None
    exchanger = build_exchanger(cfg, "a")
    # What the router would have sent to agent a: a token whose audience is a.
    user = mint_user_token(cfg, "carol", audience="mesh-agent-a")
    before_assertions = sts.stats["grant:" + GRANT_JWT_BEARER]
    token = await exchanger.token_for(user, "mesh-agent-b")
    claims = unverified_claims(token)
    assert (claims["sub"], claims["aud"], claims["azp"]) == (
        "carol",
        "mesh-agent-b",
        "mesh-agent-a",
    )
    assert sts.stats["grant:" + GRANT_JWT_BEARER] == before_assertions + 1
    before = _tokens(sts)
    assert await exchanger.token_for(user, "mesh-agent-b") == token
    assert _tokens(sts) == before


async def test_msal_wrong_certificate_is_refused(
    config: MeshConfig, sts: TokenService, tmp_path: Any
) -> None:
    from mesh.auth.devca import make_client_certificate

    cert, key = make_client_certificate(tmp_path, "intruder")
    cfg = with_auth(config, exchanger="entra")
    stolen = ClientCredential(
        "mesh-agent-a",
        certificate_pem=cert.read_text(),
        private_key_pem=key.read_text(),
        thumbprint_hex=client_credential(cfg, "a").thumbprint_hex,  # claims a's cert
    )
    exchanger = CachingExchanger(
        EntraExchanger(
            credential=stolen,
            authority=sts.authority,
            validate_authority=False,
            ca_file=sts.ca_file,
        )
    )
    user = mint_user_token(cfg, "carol", audience="mesh-agent-a")
    with pytest.raises(Unauthenticated, match="invalid_client"):
        await exchanger.token_for(user, "mesh-agent-b")


async def test_msal_obo_claims_challenge_reaches_caller(
    entra_config: MeshConfig, sts: TokenService
) -> None:
    exchanger = build_exchanger(entra_config, "router")
    with pytest.raises(Unauthenticated) as info:
        await exchanger.token_for(mint_user_token(entra_config, "dave"), "mesh-agent-stepup")
    assert info.value.metadata["error"] == "interaction_required"
    challenge = json.loads(info.value.metadata["claims"])
    assert challenge["access_token"]["amr"]["values"] == ["mfa"]
    ok = await exchanger.token_for(
        mint_user_token(entra_config, "dave", amr=["pwd", "mfa"]), "mesh-agent-stepup"
    )
    assert unverified_claims(ok)["aud"] == "mesh-agent-stepup"


async def test_app_only_token_refused_before_any_idp_call(
    entra_config: MeshConfig, sts: TokenService
) -> None:
    exchanger = build_exchanger(entra_config, "router")
    app_token = mint(
        entra_config,
        sub="mesh-router",
        audience="mesh-router",
        extra={"idtyp": "app", "azp": "mesh-router"},
    )
    no_scope = mint(entra_config, sub="eve", audience="mesh-router")
    before = _tokens(sts)
    for token in (app_token, no_scope):
        with pytest.raises(Unauthenticated, match="app-only"):
            await exchanger.token_for(token, "mesh-agent-a")
    assert _tokens(sts) == before


async def test_msal_direct_use_needs_session_that_ignores_env(
    sts: TokenService, monkeypatch: Any
) -> None:
    """msal itself, unpatched, with the documented session: REQUESTS_CA_BUNDLE pointing
    at the system store must not break trust in the dev CA."""
    import requests

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sts.ca_file)
    app = msal.ConfidentialClientApplication(
        "mesh-router",
        client_credential=ROUTER_SECRET,
        authority=sts.authority,
        validate_authority=False,
        instance_discovery=False,
        http_client=session,
    )
    result = await asyncio.to_thread(app.acquire_token_for_client, ["mesh-agent-a/.default"])
    assert "access_token" in result, result.get("error")
    assert unverified_claims(result["access_token"])["idtyp"] == "app"


async def test_rfc8693_nests_act(config: MeshConfig, sts: TokenService) -> None:
    router = build_exchanger(config, "router")
    assert isinstance(router.inner, Rfc8693Exchanger)
    user = mint_user_token(config, "alice")
    to_a = await router.token_for(user, "mesh-agent-a")
    claims_a = unverified_claims(to_a)
    assert claims_a["act"] == {"sub": "mesh-router"}

    agent_a = build_exchanger(config, "a")  # certificate client (private_key_jwt)
    to_b = await agent_a.token_for(to_a, "mesh-agent-b")
    claims_b = unverified_claims(to_b)
    assert claims_b["sub"] == "alice"
    assert claims_b["aud"] == "mesh-agent-b"
    assert claims_b["act"] == {"sub": "mesh-agent-a", "act": {"sub": "mesh-router"}}


async def test_token_exchange_rules(config: MeshConfig, sts: TokenService) -> None:
    user = mint_user_token(config, "alice")
    base = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": user,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "mesh-agent-a",
    }
    creds = ("mesh-router", ROUTER_SECRET)
    ok = await _post(sts, base, creds)
    assert ok.status_code == 200, ok.text
    assert ok.json()["issued_token_type"].endswith(":access_token")

    assert (await _post(sts, base, ("mesh-router", "wrong"))).json()["error"] == "invalid_client"
    assert (await _post(sts, base)).status_code == 401
    # The subject token was issued to the router; agent b may not exchange it.
    b_creds = ("mesh-agent-b", dev_client_secret(sts.config, "b"))
    refused = await _post(sts, base, b_creds)
    assert refused.json()["error"] == "invalid_grant"
    unknown = await _post(sts, {**base, "audience": "nobody"}, creds)
    assert unknown.json()["error"] == "invalid_target"
    narrower = await _post(sts, {**base, "scope": "mesh.admin"}, creds)
    assert narrower.json()["error"] == "invalid_scope"
    other_actor = await _post(
        sts,
        {
            **base,
            "actor_token": mint(config, sub="someone", audience=sts.issuer),
            "actor_token_type": "urn:ietf:params:oauth:token-type:access_token",
        },
        creds,
    )
    assert other_actor.json()["error"] == "invalid_grant"
    for bad in (user[:-4] + "AAAA", "garbage", ""):
        response = await _post(sts, {**base, "subject_token": bad}, creds)
        assert response.json()["error"] in ("invalid_grant", "invalid_request")
        assert bad not in response.text or bad == ""


async def test_rfc8693_exchange_is_cached(config: MeshConfig, sts: TokenService) -> None:
    exchanger = build_exchanger(config, "router")
    user = mint_user_token(config, "frank")
    results = await asyncio.gather(*(exchanger.token_for(user, "mesh-agent-b") for _ in range(5)))
    assert len(set(results)) == 1
    before = _tokens(sts)
    await exchanger.token_for(user, "mesh-agent-b")
    assert _tokens(sts) == before


async def test_unreachable_idp_is_unavailable(config: MeshConfig, sts: TokenService) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    rfc = CachingExchanger(
        Rfc8693Exchanger(
            credential=client_credential(config, "router"),
            issuer=dead,
            verify=_tls(sts),
            timeout_s=2,
        )
    )
    entra = CachingExchanger(
        EntraExchanger(
            credential=client_credential(config, "router"),
            authority=f"{dead}/mesh",
            validate_authority=False,
            ca_file=sts.ca_file,
            timeout_s=2,
        )
    )
    user = mint_user_token(config, "alice")
    for exchanger in (rfc, entra):
        with pytest.raises(Unavailable):
            await exchanger.token_for(user, "mesh-agent-a")


def test_key_rotation_keeps_old_key_published(config: MeshConfig, sts: TokenService) -> None:
    old_kid = sts.keys.signing_key()[0]
    new_kid = sts.rotate_keys()
    assert new_kid != old_kid
    published = {k["kid"] for k in sts.keys.jwks()["keys"]}
    assert {old_kid, new_kid} <= published
    assert sts.keys.signing_key()[0] == new_kid
    # Once every token of the old key has expired it is no longer published.
    import time

    later = time.time() + config.auth.sts.token_ttl_s + config.auth.leeway_s + 1
    assert old_kid not in {k["kid"] for k in sts.keys.jwks(now=later)["keys"]}


def test_sts_state_persists(config: MeshConfig, sts: TokenService) -> None:
    ca_before = sts.tls.ca_cert.read_bytes()
    server_before = sts.tls.server_cert.read_bytes()
    again = TokenService(config)  # what a restart does
    assert again.keys.signing_key() == sts.keys.signing_key()
    assert again.tls.ca_cert.read_bytes() == ca_before
    assert again.tls.server_cert.read_bytes() == server_before
    mode = (config.data_dir / "sts" / "signing-keys.json").stat().st_mode & 0o777
    assert mode == 0o600
