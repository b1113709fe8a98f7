"""Every bad token is refused with UNAUTHENTICATED by a real gRPC server that stays up;
the JWKS cache refetches at most once per window; key rotation needs no restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.auth.devca import generate_rsa_private_pem
from mesh.auth.interceptors import server_interceptors
from mesh.auth.jwks import JwksCache
from mesh.auth.jwt import TokenValidator, public_jwk, sign
from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import MeshConfig
from mesh.errors import Unauthenticated, from_rpc_error
from mesh.v1 import agent_pb2, agent_pb2_grpc
from tests.auth import probe
from tests.auth.conftest import bearer, seen, serve, with_auth

FOREIGN_PEM = generate_rsa_private_pem()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sts: TokenService, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": sts.issuer,
        "sub": "mallory",
        "aud": "mesh-router",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "scp": "mesh.chat",
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


def _signed(sts: TokenService, **overrides: Any) -> str:
    kid, pem = sts.keys.signing_key()
    return sign(_claims(sts, **overrides), pem, kid)


def _unsigned(header: Mapping[str, Any], claims: Mapping[str, Any], signature: str = "") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), signature]
    )


def _alg_none(sts: TokenService) -> str:
    return _unsigned({"alg": "none", "kid": sts.keys.signing_key()[0]}, _claims(sts))


def _alg_none_with_signature(sts: TokenService) -> str:
    return _unsigned({"alg": "none", "kid": sts.keys.signing_key()[0]}, _claims(sts), "AAAA")


def _hs256_with_public_key(sts: TokenService) -> str:
    kid, pem = sts.keys.signing_key()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    public_pem = (
        load_pem_private_key(pem.encode(), None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = _unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, _claims(sts))[:-1]
    mac = hmac.new(public_pem, head.encode(), hashlib.sha256).digest()
    return f"{head}.{_b64(mac)}"


def _es256_header_on_rsa_key(sts: TokenService) -> str:
    kid, _ = sts.keys.signing_key()
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return sign(_claims(sts), pem, kid, alg="ES256")


def _foreign_key_known_kid(sts: TokenService) -> str:
    return sign(_claims(sts), FOREIGN_PEM, sts.keys.signing_key()[0])


def _unknown_kid(sts: TokenService) -> str:
    return sign(_claims(sts), FOREIGN_PEM, "unknown-" + secrets.token_hex(4))


def _forged_kid(sts: TokenService) -> str:
    """What a flood looks like: a fresh random kid on every request."""
    return _unsigned(
        {"alg": "RS256", "kid": secrets.token_urlsafe(8)},
        _claims(sts),
        _b64(secrets.token_bytes(256)),
    )


def _oversize(sts: TokenService) -> str:
    return _signed(sts, padding="x" * 9000)


def _no_kid(sts: TokenService) -> str:
    _, pem = sts.keys.signing_key()
    from jose import jwt as jose_jwt

    return str(jose_jwt.encode(_claims(sts), pem, algorithm="RS256"))


BAD_TOKENS: dict[str, Callable[[TokenService], str]] = {
    "alg none": _alg_none,
    "alg none with a signature": _alg_none_with_signature,
    "HS256 signed with the RSA public key": _hs256_with_public_key,
    "ES256 header on an RSA kid": _es256_header_on_rsa_key,
    "unknown kid": _unknown_kid,
    "no kid": _no_kid,
    "expired": lambda s: _signed(
        s, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200
    ),
    "nbf in the future": lambda s: _signed(s, nbf=int(time.time()) + 3600),
    "iat in the future": lambda s: _signed(s, iat=int(time.time()) + 3600),
    "wrong aud": lambda s: _signed(s, aud="mesh-agent-a"),
    "wrong iss": lambda s: _signed(s, iss="https://evil.example"),
    "iss prefix": lambda s: _signed(s, iss=s.issuer + "/x"),
    "no aud": lambda s: _signed(s, aud=None),
    "no exp": lambda s: _signed(s, exp=None),
    "no sub": lambda s: _signed(s, sub=None),
    "no iss": lambda s: _signed(s, iss=None),
    "exp not a number": lambda s: _signed(s, exp="tomorrow"),
    "foreign key reusing a known kid": _foreign_key_known_kid,
    "over the size cap": _oversize,
    "garbage": lambda s: "this is not a jwt",
    "three garbage parts": lambda s: "a.b.c",
    "truncated": lambda s: _signed(s)[:-10],
    "tampered payload": lambda s: _signed(s).replace(".", ".e", 1),
    "empty": lambda s: "",
}


@pytest.fixture
async def router_addr(config: MeshConfig, sts: TokenService) -> Any:
    async with serve(server_interceptors(config, "router")) as addr:
        yield addr


async def _assert_up(addr: str, config: MeshConfig) -> None:
    got = await seen(addr, bearer(mint_user_token(config, "alice")))
    assert got.subject == "alice"
    async with grpc.aio.insecure_channel(addr) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack the methods
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_no_token_is_unauthenticated(router_addr: str, config: MeshConfig) -> None:
    for metadata in (
        None,
        (("authorization", "Basic YWxpY2U6cHc="),),
        (("authorization", "Bearer "),),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await seen(router_addr, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    err = from_rpc_error(info.value)
    assert isinstance(err, Unauthenticated)
    await _assert_up(router_addr, config)


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_token_is_unauthenticated(
    case: str, router_addr: str, config: MeshConfig, sts: TokenService
) -> None:
    token = BAD_TOKENS[case](sts)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await seen(router_addr, bearer(token) if token else (("authorization", "Bearer"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    details = info.value.details() or ""
    assert details
    if token:
        assert token not in details
    await _assert_up(router_addr, config)


async def test_bad_token_on_a_bidi_stream(
    router_addr: str, config: MeshConfig, sts: TokenService
) -> None:
    async with grpc.aio.insecure_channel(router_addr) as channel:
        stub = probe.pb2_grpc.ProbeServiceStub(channel)
        for token in (_alg_none(sts), _foreign_key_known_kid(sts)):
            call = stub.SeenEach(metadata=bearer(token), timeout=10)
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED  # before writing
        good = stub.SeenEach(metadata=bearer(mint_user_token(config, "alice")), timeout=10)
        await good.write(probe.pb2.SeenRequest())
        got = await good.read()
        assert (got.subject, got.audience) == ("alice", "mesh-router")
        await good.done_writing()
        assert await good.code() == grpc.StatusCode.OK


async def test_unknown_kid_flood_fetches_jwks_at_most_once_per_window(
    config: MeshConfig, sts: TokenService
) -> None:
    cfg = with_auth(config, jwks_refresh_window_s=3600)
    async with serve(server_interceptors(cfg, "router")) as addr:
        before = sts.stats["jwks"]
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            calls = [
                stub.Info(agent_pb2.InfoRequest(), metadata=bearer(_forged_kid(sts)), timeout=10)
                for _ in range(50)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAUTHENTICATED
            for r in results
        )
        assert sts.stats["jwks"] - before <= 1
        await _assert_up(addr, cfg)


async def test_jwks_window_unit(sts: TokenService) -> None:
    """With a controllable clock: one fetch per window, whatever the number of kids."""
    now = [1000.0]
    cache = JwksCache(
        issuer=sts.issuer, verify=_tls(sts), refresh_window_s=30, clock=lambda: now[0]
    )
    validator = TokenValidator(issuer=sts.issuer, audience="mesh-router", keys=cache)
    try:
        for _ in range(20):
            with pytest.raises(Unauthenticated, match="unknown key"):
                await validator.validate(_forged_kid(sts))
        assert cache.fetch_count == 1
        now[0] += 29
        with pytest.raises(Unauthenticated):
            await validator.validate(_unknown_kid(sts))
        assert cache.fetch_count == 1
        now[0] += 2
        for _ in range(5):
            with pytest.raises(Unauthenticated):
                await validator.validate(_forged_kid(sts))
        assert cache.fetch_count == 2
        claims = await validator.validate(_signed(sts))  # known kid: served from memory
        assert claims["sub"] == "mallory"
        assert cache.fetch_count == 2
    finally:
        await cache.aclose()


def _tls(sts: TokenService) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(sts.ca_file))


async def test_key_rotation_is_picked_up_without_restart(
    config: MeshConfig, sts: TokenService
) -> None:
    cfg = with_auth(config, jwks_refresh_window_s=0)
    async with serve(server_interceptors(cfg, "router")) as addr:
        old = mint_user_token(cfg, "alice")
        assert (await seen(addr, bearer(old))).subject == "alice"
        old_kid = sts.keys.signing_key()[0]
        new_kid = sts.rotate_keys()
        assert new_kid != old_kid
        new = mint_user_token(cfg, "bob")
        assert (await seen(addr, bearer(new))).subject == "bob"  # new kid, same server
        assert (await seen(addr, bearer(old))).subject == "alice"  # old key still published


def _run_without_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (static keys, no I/O) to completion."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the validator suspended without I/O")


class _StaticKeys:
    def __init__(self, jwk: Mapping[str, Any]) -> None:
        self.jwk = dict(jwk)

    async def key_for(self, kid: str) -> Mapping[str, Any]:
        if kid != self.jwk["kid"]:
            raise Unauthenticated("token signed with an unknown key (kid)")
        return self.jwk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300).map(lambda b: _b64(b)),
        st.lists(
            st.text(
                alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                max_size=60,
            ),
            min_size=1,
            max_size=5,
        ).map(".".join),
        st.tuples(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
            st.dictionaries(st.text(max_size=8), st.integers(), max_size=4),
        ).map(lambda hc: _unsigned(hc[0], hc[1], "c2ln")),
    )
)
def test_garbage_never_crashes_the_validator(token: str) -> None:
    validator = TokenValidator(
        issuer="https://issuer.test",
        audience="mesh-router",
        keys=_StaticKeys(public_jwk(FOREIGN_PEM, "k1")),
    )
    with pytest.raises(Unauthenticated) as info:
        _run_without_loop(validator.validate(token))
    if len(token) >= 8:
        assert token not in info.value.message
