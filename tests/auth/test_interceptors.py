"""Server and client interceptors on real grpc.aio servers: contextvars reach the
servicer, scopes are enforced, health/reflection exemptions, per-hop exchange with
nested ``act`` through two hops, and exchange failures mapped to statuses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import context as ctx
from mesh.auth.exchange import CachingExchanger, Rfc8693Exchanger, StaticTokenSource
from mesh.auth.interceptors import AuthServerInterceptor, client_interceptors, server_interceptors
from mesh.auth.jwt import TokenValidator
from mesh.auth.runtime import client_credential
from mesh.auth.sts import TokenService, mint, mint_user_token
from mesh.config import MeshConfig, config_from_dict
from mesh.errors import Unauthenticated, Unavailable, from_rpc_error
from mesh.server import Service
from mesh.v1 import agent_pb2_grpc
from tests.auth import probe
from tests.auth.conftest import Probe, bearer, seen, serve, with_auth

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))


async def test_contextvars_reach_the_servicer(config: MeshConfig, sts: TokenService) -> None:
    async with serve(server_interceptors(config, "router")) as addr:
        token = mint_user_token(config, "alice")
        got = await seen(
            addr,
            (
                *bearer(token),
                (ctx.MD_CONVERSATION_ID, "conv-1"),
                (ctx.MD_HOP_PATH, "triage, billing"),
            ),
        )
        assert got.subject == "alice"
        assert got.audience == "mesh-router"
        assert got.token_present
        assert got.conversation_id == "conv-1"
        assert list(got.hop_path) == ["triage", "billing"]

        # Concurrent calls each see their own principal.
        users = [f"user{i}" for i in range(10)]
        results = await asyncio.gather(
            *(seen(addr, bearer(mint_user_token(config, u))) for u in users)
        )
        assert [r.subject for r in results] == users


async def test_contextvars_in_a_bidi_stream(config: MeshConfig, sts: TokenService) -> None:
    async with (
        serve(server_interceptors(config, "router")) as addr,
        grpc.aio.insecure_channel(addr) as channel,
    ):
        call = probe.pb2_grpc.ProbeServiceStub(channel).SeenEach(
            metadata=(*bearer(mint_user_token(config, "alice")), (ctx.MD_CONVERSATION_ID, "c9")),
            timeout=10,
        )
        answers = []
        for _ in ("one", "two"):
            await call.write(probe.pb2.SeenRequest())
            answers.append(await call.read())
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        assert [
            (a.subject, a.audience, list(a.actor_chain), a.conversation_id) for a in answers
        ] == [("alice", "mesh-router", [], "c9")] * 2


async def test_missing_scope_is_permission_denied(config: MeshConfig, sts: TokenService) -> None:
    async with serve(server_interceptors(config, "admin")) as addr:
        aud = config.auth.audience_for("admin")
        plain = mint_user_token(config, "alice", audience=aud)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await seen(addr, bearer(plain))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "mesh.admin" in (info.value.details() or "")
        scoped = mint_user_token(config, "alice", ["mesh.chat", "mesh.admin"], audience=aud)
        assert (await seen(addr, bearer(scoped))).subject == "alice"
        role = mint(
            config, sub="ops", audience=aud, scopes=["mesh.chat"], extra={"roles": ["mesh.admin"]}
        )
        assert (await seen(addr, bearer(role))).subject == "ops"


async def test_health_needs_no_token(config: MeshConfig, sts: TokenService) -> None:
    async with (
        serve(server_interceptors(config, "router")) as addr,
        grpc.aio.insecure_channel(addr) as channel,
    ):
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack the methods
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


async def _grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-max-time",
        "20",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("GRPC_")},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0, out.decode()


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl not installed")
async def test_reflection_exemption(config: MeshConfig, sts: TokenService) -> None:
    async with serve(server_interceptors(config, "router")) as addr:
        code, out = await _grpcurl(addr, "list")
        assert code != 0 and "Unauthenticated" in out
        token = mint_user_token(config, "alice")
        code, out = await _grpcurl("-H", f"authorization: Bearer {token}", addr, "list")
        assert code == 0 and "mesh.v1.AgentService" in out
    open_cfg = with_auth(config, allow_unauthenticated_reflection=True)
    async with serve(server_interceptors(open_cfg, "router")) as addr:
        code, out = await _grpcurl(addr, "list")
        assert code == 0 and "mesh.v1.AgentService" in out, out
        code, out = await _grpcurl("-d", "{}", addr, "mesh.v1.AgentService/Info")
        assert code != 0 and "Unauthenticated" in out  # only reflection is open


def _hop(addr: str, interceptors: list[grpc.aio.ClientInterceptor]) -> Callable[[], Any]:
    channel = grpc.aio.insecure_channel(addr, interceptors=interceptors)

    async def call() -> Any:
        # No timeout here: the incoming call's deadline is propagated by the interceptor.
        return await probe.pb2_grpc.ProbeServiceStub(channel).Seen(probe.pb2.SeenRequest())

    return call


async def test_two_hops_exchange_on_behalf_of_the_user(
    config: MeshConfig, sts: TokenService
) -> None:
    """client -> router -> agent a -> agent b: b sees alice, aud b, actors a then router."""
    async with serve(server_interceptors(config, "b")) as b_addr:
        to_b = _hop(b_addr, client_interceptors(config, config.auth.audience_for("b"), service="a"))
        async with serve(server_interceptors(config, "a"), Probe(next_hop=to_b)) as a_addr:
            to_a = _hop(a_addr, client_interceptors(config, config.auth.audience_for("a")))
            async with serve(
                server_interceptors(config, "router"), Probe(next_hop=to_a)
            ) as router_addr:
                user = mint_user_token(config, "alice")
                client = client_interceptors(
                    config, "mesh-router", token_source=StaticTokenSource(user)
                )
                before = sts.stats["token"]
                trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                got = await seen(
                    router_addr,
                    (
                        (ctx.MD_CONVERSATION_ID, "conv-7"),
                        (ctx.MD_HOP_PATH, "a"),
                        (ctx.MD_TRACEPARENT, trace),
                    ),
                    client,
                )
                assert got.subject == "alice"
                assert got.audience == "mesh-agent-b"
                assert list(got.actor_chain) == ["mesh-agent-a", "mesh-router"]
                assert got.conversation_id == "conv-7"  # forwarded on both hops
                assert list(got.hop_path) == ["a"]
                assert got.traceparent == trace
                # The client's 10 s deadline reached the last hop (minus time spent).
                assert got.HasField("deadline_remaining_s")
                assert 0 < got.deadline_remaining_s <= 10
                used = sts.stats["token"] - before
                again = await seen(router_addr, None, client)
                assert again.subject == "alice"
                assert sts.stats["token"] - before == used  # all hops served from caches


class _FailingExchanger:
    def __init__(self, err: Exception) -> None:
        self.err = err

    async def token_for(self, subject_token: str, audience: str) -> str:
        raise self.err

    async def aclose(self) -> None:
        return None


async def test_exchange_failures_fail_the_call_with_mapped_status(
    config: MeshConfig, sts: TokenService
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    unreachable = CachingExchanger(
        Rfc8693Exchanger(credential=client_credential(config, "router"), issuer=dead, timeout_s=2)
    )
    async with serve(server_interceptors(config, "a")) as addr:
        token = ctx.current_token.set(mint_user_token(config, "alice"))
        try:
            cases: list[tuple[Any, type[Exception], grpc.StatusCode]] = [
                (unreachable, Unavailable, grpc.StatusCode.UNAVAILABLE),
                (
                    _FailingExchanger(Unauthenticated("refused", metadata={"error": "x"})),
                    Unauthenticated,
                    grpc.StatusCode.UNAUTHENTICATED,
                ),
                (_FailingExchanger(RuntimeError("boom")), Unavailable, grpc.StatusCode.UNAVAILABLE),
            ]
            for exchanger, kind, code in cases:
                interceptors = client_interceptors(config, "mesh-agent-a", exchanger=exchanger)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await seen(addr, None, interceptors)
                assert info.value.code() == code
                assert isinstance(from_rpc_error(info.value), kind)
                async with grpc.aio.insecure_channel(addr, interceptors=interceptors) as ch:
                    call = agent_pb2_grpc.AgentServiceStub(ch).Chat(timeout=10)
                    assert await call.code() == code, await call.details()
            # The app-only refusal happens before any call to the identity provider.
            ctx.current_token.set(
                mint(config, sub="mesh-router", audience="mesh-router", extra={"idtyp": "app"})
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await seen(addr, None, client_interceptors(config, "mesh-agent-a"))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            ctx.current_token.reset(token)


def _generic_server_handler() -> grpc.GenericRpcHandler:
    def who() -> bytes:
        principal = ctx.current_principal.get()
        return (principal.subject if principal else "-").encode()

    async def uu(request: bytes, context: Any) -> bytes:
        return who()

    async def us(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield who()
        yield who()

    async def us_write(request: bytes, context: Any) -> None:
        await context.write(who())

    async def su(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b"".join([r async for r in requests]) + who()

    async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r + who()

    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    async def crash(request: bytes, context: Any) -> bytes:
        raise RuntimeError("servicer bug")

    return grpc.method_handlers_generic_handler(
        "test.Kinds",
        {
            "UU": grpc.unary_unary_rpc_method_handler(uu),
            "US": grpc.unary_stream_rpc_method_handler(us),
            "USWrite": grpc.unary_stream_rpc_method_handler(us_write),
            "SU": grpc.stream_unary_rpc_method_handler(su),
            "SS": grpc.stream_stream_rpc_method_handler(ss),
            "Abort": grpc.unary_unary_rpc_method_handler(abort),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
        },
    )


async def test_all_four_call_kinds(
    config: MeshConfig, sts: TokenService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.audit")
    kinds = Service(
        "test.Kinds", lambda s: s.add_generic_rpc_handlers((_generic_server_handler(),))
    )
    async with serve(server_interceptors(config, "b"), extra=[kinds]) as addr:
        user = mint_user_token(config, "alice")
        interceptors = client_interceptors(config, "mesh-agent-b")
        ctx_token = ctx.current_token.set(user)
        try:
            async with grpc.aio.insecure_channel(addr, interceptors=interceptors) as channel:
                ch: Any = channel  # raw bytes methods: the stubs cannot type them
                assert await ch.unary_unary("/test.Kinds/UU")(b"", timeout=10) == b"alice"
                assert [r async for r in ch.unary_stream("/test.Kinds/US")(b"", timeout=10)] == [
                    b"alice",
                    b"alice",
                ]
                assert [
                    r async for r in ch.unary_stream("/test.Kinds/USWrite")(b"", timeout=10)
                ] == [b"alice"]

                async def requests() -> AsyncIterator[bytes]:
                    yield b"x:"

                assert await ch.stream_unary("/test.Kinds/SU")(requests(), timeout=10) == b"x:alice"
                assert [
                    r async for r in ch.stream_stream("/test.Kinds/SS")(requests(), timeout=10)
                ] == [b"x:alice"]
                for method, code in (
                    ("Abort", grpc.StatusCode.NOT_FOUND),
                    ("Crash", grpc.StatusCode.UNKNOWN),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await ch.unary_unary(f"/test.Kinds/{method}")(b"", timeout=10)
                    assert failed.value.code() == code
        finally:
            ctx.current_token.reset(ctx_token)
        async with grpc.aio.insecure_channel(addr) as plain:
            ch = plain
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary("/test.Kinds/SU")(b"", timeout=10)
            assert info.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNIMPLEMENTED,
            )
            call = ch.unary_stream("/test.Kinds/US")(b"", timeout=10)
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    statuses = {
        (line["method"], line["status"])
        for line in (json.loads(r.getMessage()) for r in caplog.records if r.name == "mesh.audit")
    }
    assert {
        ("/test.Kinds/UU", "OK"),
        ("/test.Kinds/SS", "OK"),
        ("/test.Kinds/Abort", "NOT_FOUND"),
        ("/test.Kinds/Crash", "UNKNOWN"),
        ("/test.Kinds/US", "UNAUTHENTICATED"),
    } <= statuses


async def test_audit_line_per_call(
    config: MeshConfig, sts: TokenService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.audit")
    async with serve(server_interceptors(config, "router")) as addr:
        token = mint(
            config,
            sub="alice",
            audience="mesh-router",
            scopes=["mesh.chat"],
            extra={"act": {"sub": "mesh-agent-a", "act": {"sub": "mesh-router"}}},
        )
        await seen(addr, (*bearer(token), (ctx.MD_HOP_PATH, "a,b")))
        with pytest.raises(grpc.aio.AioRpcError):
            await seen(addr, bearer(token + "x"))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mesh.audit"]
    ok = [line for line in lines if line["status"] == "OK"]
    denied = [line for line in lines if line["status"] == "UNAUTHENTICATED"]
    assert len(ok) == 1 and len(denied) == 1
    assert ok[0]["subject"] == "alice"
    assert ok[0]["actors"] == ["mesh-agent-a", "mesh-router"]
    assert ok[0]["hop_path"] == ["a", "b"]
    assert ok[0]["method"] == f"/{probe.SERVICE}/Seen"
    assert denied[0]["subject"] is None and "signature" in denied[0]["reason"]
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_factories(config: MeshConfig, sts: TokenService) -> None:
    off = config_from_dict({"agents": {"a": {"description": "a"}}})
    assert server_interceptors(off, "a") == []
    assert client_interceptors(off, "mesh-agent-a") == []
    assert len(client_interceptors(off, "mesh-router", token_source=StaticTokenSource("t"))) == 4
    [interceptor] = server_interceptors(config, "admin")
    assert isinstance(interceptor, AuthServerInterceptor)
    assert interceptor.required_scopes == {"mesh.admin"}
    assert isinstance(interceptor.validator, TokenValidator)
    assert interceptor.validator.audience == "mesh-agent-admin"
    assert interceptor.validator.issuer == sts.issuer
    assert config.auth.audience_for("router") == "mesh-router"
    assert with_auth(config, audiences={"a": "api://a"}).auth.audience_for("a") == "api://a"


async def test_service_calls_as_itself_with_client_credentials(
    config: MeshConfig, sts: TokenService
) -> None:
    from mesh.auth.interceptors import service_interceptors

    async with serve(server_interceptors(config, "router")) as addr:
        interceptors = service_interceptors(config, "mesh-router", service="b")
        got = await seen(addr, None, interceptors)
        assert got.subject == "mesh-agent-b"  # the agent's own identity (app token)
        before = sts.stats["token"]
        await seen(addr, None, interceptors)
        assert sts.stats["token"] == before  # cached
    entra = with_auth(config, exchanger="entra")
    async with serve(server_interceptors(entra, "router")) as addr:
        got = await seen(addr, None, service_interceptors(entra, "mesh-router", service="b"))
        assert got.subject == "mesh-agent-b"
        # The router may not get an app token for itself: its policy lists the agents only.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await seen(addr, None, service_interceptors(entra, "mesh-router"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("client_auth", [False, True])
async def test_tls_for_grpc_hops(config: MeshConfig, sts: TokenService, client_auth: bool) -> None:
    from mesh.auth.interceptors import channel_credentials, server_credentials

    cfg = config.model_copy(
        update={
            "auth": config.auth.model_copy(
                update={
                    "tls": config.auth.tls.model_copy(
                        update={"enabled": True, "client_auth": client_auth}
                    )
                }
            )
        }
    )
    assert server_credentials(config) is None and channel_credentials(config) is None
    server_creds = server_credentials(cfg)
    channel_creds = channel_credentials(cfg)
    assert server_creds is not None and channel_creds is not None
    async with serve(server_interceptors(cfg, "router"), credentials=server_creds) as addr:
        token = mint_user_token(cfg, "alice")
        got = await seen(addr, bearer(token), credentials=channel_creds)
        assert got.subject == "alice"
        if client_auth:  # no client certificate: the handshake fails
            anonymous = grpc.ssl_channel_credentials(sts.ca_file.read_bytes())
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await seen(addr, bearer(token), credentials=anonymous)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_call_ended_by_its_deadline_is_audited_as_such() -> None:
    """grpc cancels a handler both when the caller cancels and when its deadline passes;
    the audit line tells them apart."""
    import asyncio

    from mesh.auth.server_auth import _final_code

    class Ended:
        def __init__(self, remaining: float | None) -> None:
            self.remaining = remaining

        def code(self) -> None:
            return None

        def time_remaining(self) -> float | None:
            return self.remaining

    cancelled = asyncio.CancelledError()
    assert _final_code(Ended(-0.01), cancelled) == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[arg-type]
    assert _final_code(Ended(4.0), cancelled) == grpc.StatusCode.CANCELLED  # type: ignore[arg-type]
    assert _final_code(Ended(None), cancelled) == grpc.StatusCode.CANCELLED  # type: ignore[arg-type]
