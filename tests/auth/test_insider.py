"""Attacks by the mesh's own parties (issue 12), from outside the project's code: tokens
built with python-jose directly, token requests over HTTPS with httpx, gRPC calls to real
servers. Each asserts what the victim saw and that it stays up."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from jose import jwt as jose_jwt

from mesh.auth.exchange import build_exchanger, hop_tokens
from mesh.auth.interceptors import server_interceptors
from mesh.auth.jwt import unverified_claims
from mesh.auth.runtime import dev_client_secret, sts_dir
from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import MeshConfig, config_from_dict
from mesh.errors import MeshError, PermissionDenied
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from tests.auth.conftest import ROUTER_SECRET, Probe, bearer, mesh_dict, seen, serve, with_auth

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- helpers: an outside client of the STS ---------------------------------------------------


async def _post(
    sts: TokenService, form: dict[str, str], auth: tuple[str, str] | None = None
) -> httpx.Response:
    import ssl

    tls = ssl.create_default_context(cafile=str(sts.ca_file))
    async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=10) as client:
        if auth is None:
            return await client.post(sts.token_endpoint, data=form)
        return await client.post(sts.token_endpoint, data=form, auth=auth)


def _creds(config: MeshConfig, service: str) -> tuple[str, str]:
    secret = ROUTER_SECRET if service == "router" else dev_client_secret(config, service)
    return config.auth.client_id_for(service), secret


async def _exchange(
    sts: TokenService, creds: tuple[str, str], subject: str, audience: str, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS,
        "audience": audience,
        **extra,
    }
    return await _post(sts, form, creds)


async def _app_token(sts: TokenService, creds: tuple[str, str], audience: str) -> httpx.Response:
    return await _post(sts, {"grant_type": "client_credentials", "audience": audience}, creds)


async def _via_router(config: MeshConfig, sts: TokenService, agent: str, sub: str = "alice") -> str:
    """What the router holds for ``agent`` during alice's turn."""
    user = mint_user_token(config, sub)
    got = await _exchange(sts, _creds(config, "router"), user, config.auth.audience_for(agent))
    assert got.status_code == 200, got.text
    return str(got.json()["access_token"])


async def _sts_up(sts: TokenService) -> None:
    import ssl

    tls = ssl.create_default_context(cafile=str(sts.ca_file))
    async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=10) as client:
        assert (await client.get(f"{sts.url}/.well-known/openid-configuration")).status_code == 200


# -- per-client credentials and the audience policy (issue 12, item 2) ------------------------


async def test_each_client_has_its_own_secret_in_private_files(
    config: MeshConfig, sts: TokenService
) -> None:
    b, admin = _creds(config, "b"), _creds(config, "admin")
    assert b[1] != admin[1]
    # b's secret authenticates b, and nobody else.
    assert (await _app_token(sts, b, "mesh-router")).status_code == 200
    for victim in ("mesh-router", "mesh-agent-admin", "mesh-agent-a"):
        refused = await _app_token(sts, (victim, b[1]), "mesh-agent-b")
        assert refused.status_code == 401, victim
    # Files: directories 0700, every file 0600.
    root = sts_dir(config)
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    await _sts_up(sts)


async def test_one_generic_answer_to_every_client_authentication_failure(
    config: MeshConfig, sts: TokenService
) -> None:
    user = mint_user_token(config, "alice")
    answers = [
        await _exchange(sts, ("no-such-client", "x" * 20), user, "mesh-agent-a"),
        await _exchange(sts, ("mesh-router", "wrong-secret"), user, "mesh-agent-a"),
        await _exchange(sts, ("mesh-agent-a", "a-has-a-certificate"), user, "mesh-agent-a"),
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.text for r in answers}) == 1  # nothing tells the client ids apart
    assert answers[0].json() == {
        "error": "invalid_client",
        "error_description": "client authentication failed",
    }


async def test_an_agent_cannot_obtain_tokens_beyond_its_policy(
    config: MeshConfig, sts: TokenService
) -> None:
    """billing (here b), holding alice's token, tries to become alice at the router and at
    other agents: token exchange, on-behalf-of and client credentials all refuse."""
    held = await _via_router(config, sts, "b")
    b = _creds(config, "b")
    for audience in ("mesh-router", "mesh-agent-a", "mesh-agent-admin"):
        exchanged = await _exchange(sts, b, held, audience)
        assert exchanged.status_code == 400, (audience, exchanged.text)
        assert exchanged.json()["error"] == "invalid_target"
        obo = await _post(
            sts,
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "requested_token_use": "on_behalf_of",
                "assertion": held,
                "scope": f"{audience}/.default",
            },
            b,
        )
        assert obo.status_code == 400 and obo.json()["error"] == "invalid_target", audience
    # Its own app tokens: the router (to register, with the role), nothing else.
    own = await _app_token(sts, b, "mesh-router")
    assert unverified_claims(own.json()["access_token"])["roles"] == ["mesh.register"]
    assert (await _app_token(sts, b, "mesh-agent-a")).status_code == 400
    # The router: app tokens for agents (Info), never for itself.
    router = _creds(config, "router")
    assert (await _app_token(sts, router, "mesh-agent-b")).status_code == 200
    assert (await _app_token(sts, router, "mesh-router")).status_code == 400
    await _sts_up(sts)


async def test_every_exchanger_checks_the_policy_before_any_idp_call(
    config: MeshConfig, sts: TokenService
) -> None:
    held = await _via_router(config, sts, "b")
    before = sts.stats["token"]
    for kind in ("embedded", "entra", "rfc8693"):
        tokens = build_exchanger(with_auth(config, exchanger=kind), "b")
        with pytest.raises(PermissionDenied, match="may not obtain a delegated token"):
            await tokens.for_hop(held, "mesh-router")
        with pytest.raises(PermissionDenied, match="may not obtain an app token"):
            await tokens.service_token("mesh-agent-a")
    assert sts.stats["token"] == before


# -- client assertions (item 6) --------------------------------------------------------------


def _assertion(config: MeshConfig, sts: TokenService, **claims: Any) -> str:
    key = (config.data_dir / "client-certs" / "agent-a-key.pem").read_text()
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": "mesh-agent-a",
        "sub": "mesh-agent-a",
        "aud": sts.token_endpoint,
        "iat": now,
        "exp": now + 60,
        "jti": secrets.token_urlsafe(16),
    }
    body.update(claims)
    return str(jose_jwt.encode({k: v for k, v in body.items() if v is not None}, key, "RS256"))


async def _with_assertion(sts: TokenService, assertion: str) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "audience": "mesh-router",
        "client_id": "mesh-agent-a",
        "client_assertion_type": ASSERTION,
        "client_assertion": assertion,
    }
    return await _post(sts, form)


async def test_client_assertions_are_short_lived_single_use_and_for_this_endpoint(
    config: MeshConfig, sts: TokenService
) -> None:
    good = _assertion(config, sts)
    assert (await _with_assertion(sts, good)).status_code == 200
    replayed = await _with_assertion(sts, good)
    assert replayed.status_code == 401
    ten_years = _assertion(config, sts, exp=int(time.time()) + 10 * 365 * 86400)
    for bad in (
        ten_years,
        _assertion(config, sts, aud=sts.issuer),  # not the token endpoint
        _assertion(config, sts, jti=None),
        _assertion(config, sts, exp=None),
        _assertion(config, sts, iss="mesh-router"),
    ):
        answer = await _with_assertion(sts, bad)
        assert answer.status_code == 401
        assert answer.json()["error_description"] == "client authentication failed"
    assert (await _with_assertion(sts, _assertion(config, sts))).status_code == 200
    await _sts_up(sts)


# -- access tokens only, accurate claim errors (items 5 and 9) --------------------------------


def _forged(sts: TokenService, typ: str = "at+jwt", **claims: Any) -> str:
    """A token signed with the issuer's real key (what the issuer could hand out)."""
    kid, pem = sts.keys.signing_key()
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": sts.issuer,
        "sub": "alice",
        "aud": "mesh-router",
        "iat": now,
        "exp": now + 600,
        "scp": "mesh.chat",
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return str(jose_jwt.encode(body, pem, "RS256", headers={"kid": kid, "typ": typ}))


async def _info_status(addr: str, token: str) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(addr) as channel:
        try:
            await agent_pb2_grpc.AgentServiceStub(channel).Info(
                agent_pb2.InfoRequest(), metadata=bearer(token), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def test_id_tokens_and_bad_claims_are_refused_with_the_real_reason(
    config: MeshConfig, sts: TokenService
) -> None:
    cases = {
        "id token (typ JWT, nonce, at_hash)": (
            _forged(sts, typ="JWT", nonce="n-0S6", at_hash="77QmUPtjPfzWtF2AnpK9RQ"),
            "typ must be at+jwt",
        ),
        "id token with an access token's typ": (
            _forged(sts, nonce="n-0S6", at_hash="77QmUPtjPfzWtF2AnpK9RQ"),
            "an ID token is not an access token",
        ),
        "no scp or roles": (_forged(sts, scp=None), "no scp or roles"),
        "missing exp": (_forged(sts, exp=None), "missing exp"),
        "missing aud": (_forged(sts, aud=None), "missing aud"),
        "missing iss": (_forged(sts, iss=None), "missing iss"),
        "missing sub": (_forged(sts, sub=None), "missing sub"),
        "negative hop budget": (_forged(sts, mesh_hops=-1), "mesh_hops"),
        "act not an object": (_forged(sts, act="mesh-router"), "act is not an object"),
    }
    async with serve(server_interceptors(config, "router")) as addr:
        for name, (token, reason) in cases.items():
            code, details = await _info_status(addr, token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert reason in details, (name, details)
        assert await _info_status(addr, _forged(sts)) == (grpc.StatusCode.OK, "")
    # Entra-like issuers set no typ: checked only when configured, ID-token shapes still not.
    entra_like = with_auth(config, access_token_typ="")
    async with serve(server_interceptors(entra_like, "router")) as addr:
        assert (await _info_status(addr, _forged(sts, typ="JWT")))[0] == grpc.StatusCode.OK
        id_token = _forged(sts, typ="JWT", nonce="n-0S6")
        assert (await _info_status(addr, id_token))[0] == grpc.StatusCode.UNAUTHENTICATED


# -- agents take users' tokens only through the router (item 4) -------------------------------


async def chat_as(addr: str, token: str, probe: Probe) -> tuple[grpc.StatusCode, Any]:
    """One Chat turn at the probe; the status and what the probe saw (its ``SeenResponse``)."""
    async with grpc.aio.insecure_channel(addr) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Chat(metadata=bearer(token), timeout=10)
        await call.write(types_pb2.ChatRequest(turn=types_pb2.Turn(message="hi")))
        try:
            event = await call.read()
        except grpc.aio.AioRpcError as err:
            return err.code(), None
        assert isinstance(event, types_pb2.ChatEvent)
        call.cancel()
        return grpc.StatusCode.OK, probe.chats[-1]


async def test_agents_chat_needs_a_users_token_delegated_by_the_router(
    config: MeshConfig, sts: TokenService
) -> None:
    router_app = (await _app_token(sts, _creds(config, "router"), "mesh-agent-b")).json()
    direct = _forged(sts, aud="mesh-agent-b", azp="mesh-cli")  # a user's own token for b
    a_token = await _via_router(config, sts, "a")
    guessed = await _exchange(sts, ("mesh-agent-a", "guessed"), a_token, "mesh-agent-b")
    assert guessed.status_code == 401  # a authenticates with its certificate only
    a_assertion = _assertion(config, sts)
    by_a = await _post(
        sts,
        {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": a_token,
            "subject_token_type": ACCESS,
            "audience": "mesh-agent-b",
            "client_id": "mesh-agent-a",
            "client_assertion_type": ASSERTION,
            "client_assertion": a_assertion,
        },
    )
    assert by_a.status_code == 200, by_a.text  # a's policy lists b as a peer
    probe = Probe()
    async with serve(server_interceptors(config, "b"), probe) as addr:
        for name, token in {
            "the router's own app token": router_app["access_token"],
            "a user's token not obtained through the router": direct,
            "a user's token delegated by agent a": by_a.json()["access_token"],
        }.items():
            code, _ = await chat_as(addr, token, probe)
            assert code == grpc.StatusCode.PERMISSION_DENIED, name
        assert probe.chats == []  # no refused turn reached the servicer
        # Info takes the router's own token; Chat takes alice's through the router.
        assert await _info_status(addr, router_app["access_token"]) == (grpc.StatusCode.OK, "")
        code, got = await chat_as(addr, await _via_router(config, sts, "b"), probe)
        assert code == grpc.StatusCode.OK
        assert got.subject == "alice" and list(got.actor_chain) == ["mesh-router"]


async def test_named_service_callers_and_their_app_tokens(tmp_path: Path) -> None:
    """``auth.service_callers: {b: [a]}``: the STS issues a's app token for b, b takes it."""
    body = mesh_dict(tmp_path)
    body["auth"]["service_callers"] = {"b": ["admin"]}
    body["auth"]["clients"].pop("router")
    cfg = config_from_dict(body)
    with TokenService(cfg) as sts:
        admin = _creds(cfg, "admin")
        stepup = _creds(cfg, "stepup")
        granted = await _app_token(sts, admin, "mesh-agent-b")
        assert granted.status_code == 200, granted.text
        assert (await _app_token(sts, stepup, "mesh-agent-b")).status_code == 400
        probe = Probe()
        async with serve(server_interceptors(cfg, "b"), probe) as addr:
            code, got = await chat_as(addr, granted.json()["access_token"], probe)
            assert code == grpc.StatusCode.OK and got.subject == "mesh-agent-admin"


# -- the JWKS cache (item 3) -----------------------------------------------------------------


class GatedJwks:
    """A JWKS endpoint (plain HTTP on 127.0.0.1) that answers only when released."""

    def __init__(self, sts: TokenService) -> None:
        self.sts = sts
        self.requests = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        self.arrived.set()
        await self.release.wait()
        body = json.dumps(self.sts.keys.jwks()).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        writer.write(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> GatedJwks:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/jwks"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_cancelled_call_does_not_lock_everyone_out(
    config: MeshConfig, sts: TokenService
) -> None:
    """``mesh chat --timeout 0.01`` on a fresh mesh: the caller gives up while the keys are
    being fetched; the fetch completes for everyone and the next call succeeds at once."""
    async with GatedJwks(sts) as jwks:
        cfg = with_auth(config, jwks_url=jwks.url, jwks_refresh_window_s=30)
        async with serve(server_interceptors(cfg, "router")) as addr:
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                user = bearer(mint_user_token(cfg, "alice"))
                first = stub.Info(agent_pb2.InfoRequest(), metadata=user, timeout=30)
                await jwks.arrived.wait()  # the server is fetching keys for this call
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                jwks.release.set()
                assert (await seen(addr, user)).subject == "alice"
                await asyncio.gather(
                    *(
                        stub.Info(agent_pb2.InfoRequest(), metadata=user, timeout=10)
                        for _ in range(5)
                    )
                )
    assert jwks.requests == 1  # one fetch served the cancelled caller and everyone after


async def test_only_a_failed_fetch_backs_off(sts: TokenService) -> None:
    import ssl

    from mesh.auth.jwks import JwksCache
    from mesh.errors import Unavailable

    now = [100.0]
    tls = ssl.create_default_context(cafile=str(sts.ca_file))
    cache = JwksCache(
        issuer=sts.issuer,
        jwks_url=sts.url + "/missing",
        verify=tls,
        failure_backoff_s=1.0,
        clock=lambda: now[0],
    )
    kid = sts.keys.signing_key()[0]
    try:
        with pytest.raises(Unavailable):
            await cache.key_for(kid)  # HTTP 404: a real failure
        cache.jwks_url = sts.jwks_uri
        with pytest.raises(Unavailable):
            await cache.key_for(kid)  # inside the backoff: no new fetch
        assert cache.fetch_count == 1
        now[0] += 1.5
        assert (await cache.key_for(kid))["kid"] == kid
        assert cache.fetch_count == 2
    finally:
        await cache.aclose()


# -- hop budget and narrowing at the STS (the delegation that narrows) ------------------------


async def test_exchange_narrows_scopes_and_hops_and_never_widens(
    config: MeshConfig, sts: TokenService
) -> None:
    router = _creds(config, "router")
    user = mint_user_token(config, "alice", ["mesh.chat", "billing.read"])
    first = await _exchange(sts, router, user, "mesh-agent-a", scope="mesh.chat", mesh_hops="2")
    claims = unverified_claims(first.json()["access_token"])
    assert claims["scp"] == "mesh.chat" and claims["mesh_hops"] == 2
    held = first.json()["access_token"]
    wider = await _exchange(sts, router, held, "mesh-agent-b", mesh_hops="3")
    assert wider.status_code == 400 and "cannot grow" in wider.json()["error_description"]
    more_scopes = await _exchange(sts, router, held, "mesh-agent-b", scope="billing.read")
    assert more_scopes.status_code == 400 and more_scopes.json()["error"] == "invalid_scope"
    narrower = await _exchange(sts, router, held, "mesh-agent-b", mesh_hops="1")
    assert unverified_claims(narrower.json()["access_token"])["mesh_hops"] == 1
    for bad in ("-1", "x", "99999"):
        got = await _exchange(sts, router, held, "mesh-agent-b", mesh_hops=bad)
        assert got.status_code == 400


async def test_hop_tokens_cache_per_audience_scopes_and_hops(
    config: MeshConfig, sts: TokenService
) -> None:
    tokens = hop_tokens(config, "router")
    user = mint_user_token(config, "carol", ["mesh.chat"])
    before = sts.stats["grant:" + TOKEN_EXCHANGE]
    one = await tokens.for_hop(user, "mesh-agent-a", scopes=["mesh.chat"], hops_remaining=3)
    again = await tokens.for_hop(user, "mesh-agent-a", scopes=["mesh.chat"], hops_remaining=3)
    assert one == again
    other = await tokens.for_hop(user, "mesh-agent-a", scopes=["mesh.chat"], hops_remaining=2)
    assert other != one and unverified_claims(other)["mesh_hops"] == 2
    assert sts.stats["grant:" + TOKEN_EXCHANGE] - before == 2  # one per (scopes, hops)
    app = await tokens.service_token("mesh-agent-a")
    assert app == await tokens.service_token("mesh-agent-a")
    with pytest.raises(MeshError):
        await tokens.for_hop(user, "mesh-agent-a", scopes=["mesh.admin"])


async def test_previous_token_extends_the_chain_for_the_same_user_only(
    config: MeshConfig, sts: TokenService
) -> None:
    router = _creds(config, "router")
    alice = mint_user_token(config, "alice", ["mesh.chat", "billing.read"])
    at_a = await _exchange(sts, router, alice, "mesh-agent-a", scope="mesh.chat", mesh_hops="2")
    held = at_a.json()["access_token"]
    # Scopes from alice's own token, the chain and the hop ceiling from what a held.
    to_b = await _exchange(
        sts, router, alice, "mesh-agent-b", scope="billing.read", mesh_previous_token=held
    )
    claims = unverified_claims(to_b.json()["access_token"])
    assert claims["scp"] == "billing.read" and claims["mesh_hops"] == 2
    assert claims["act"] == {
        "sub": "mesh-router",
        "act": {"sub": "mesh-agent-a", "act": {"sub": "mesh-router"}},
    }
    grow = await _exchange(
        sts, router, alice, "mesh-agent-b", mesh_hops="5", mesh_previous_token=held
    )
    assert grow.status_code == 400
    bob_held = await _via_router(config, sts, "a", sub="bob")
    other_user = await _exchange(sts, router, alice, "mesh-agent-b", mesh_previous_token=bob_held)
    assert other_user.status_code == 400 and "another user" in other_user.text
    # b cannot use a token the router acted on as its own link in the chain.
    held_b = await _via_router(config, sts, "b")
    by_b = await _exchange(
        sts, _creds(config, "b"), held_b, "mesh-agent-b", mesh_previous_token=held
    )
    assert by_b.status_code == 400


def test_mesh_up_hands_each_child_only_its_own_secret(
    config: MeshConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh.auth.runtime import child_env, client_credential, secret_env_name

    env_b, env_admin = child_env(config, "b"), child_env(config, "admin")
    assert env_b == {"MESH_CLIENT_SECRET_B": dev_client_secret(config, "b")}
    assert env_admin == {"MESH_CLIENT_SECRET_ADMIN": dev_client_secret(config, "admin")}
    assert child_env(config, "a") == {}  # a has a certificate
    assert child_env(config, "router") == {}  # the router's secret comes from its secret_env
    monkeypatch.setenv(secret_env_name("b"), "handed-over-secret-value")
    assert client_credential(config, "b").secret == "handed-over-secret-value"


async def test_an_agent_can_refuse_a_budget_its_token_does_not_grant(
    config: MeshConfig, sts: TokenService
) -> None:
    """What an agent sees when the router is bypassed: the hop budget in its token."""
    from mesh.auth.policy import check_hop_budget

    router = _creds(config, "router")
    user = mint_user_token(config, "alice")
    got = await _exchange(sts, router, user, "mesh-agent-b", mesh_hops="1")
    probe = Probe()
    async with serve(server_interceptors(config, "b"), probe) as addr:
        code, saw = await chat_as(addr, got.json()["access_token"], probe)
    assert code == grpc.StatusCode.OK
    assert saw.HasField("hops_remaining") and saw.hops_remaining == 1
    check_hop_budget(saw.hops_remaining, 1)
    with pytest.raises(PermissionDenied, match="hop budget exceeded"):
        check_hop_budget(saw.hops_remaining, 2)
    check_hop_budget(None, 50)  # no budget in the token: the router's limit applies


def test_a_turn_that_names_no_budget_gets_the_tokens() -> None:
    """At an agent, a turn without ``hops_remaining`` runs with the budget its token
    grants (never an unlimited one); a turn naming more than the token grants is refused."""
    from mesh.agent._servicer import _within_budget
    from mesh.context import Principal, current_principal
    from mesh.turns import TurnInput

    token = current_principal.set(Principal(subject="alice", hops_remaining=0))
    try:
        assert _within_budget(TurnInput("c", "hi")).hops_remaining == 0
        assert _within_budget(TurnInput("c", "hi", hops_remaining=0)).hops_remaining == 0
        with pytest.raises(PermissionDenied, match="hop budget exceeded"):
            _within_budget(TurnInput("c", "hi", hops_remaining=9))
    finally:
        current_principal.reset(token)
    assert _within_budget(TurnInput("c", "hi")).hops_remaining is None  # no token: no claim
