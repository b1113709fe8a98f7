"""Runs last in this folder: every log line written during the auth tests (root
handler at DEBUG, plus the subprocesses' stderr) is free of tokens and secrets."""

from __future__ import annotations

import re

import grpc
import pytest

from mesh.auth.exchange import build_exchanger
from mesh.auth.interceptors import server_interceptors
from mesh.auth.runtime import dev_client_secret
from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import MeshConfig
from mesh.v1 import agent_pb2, agent_pb2_grpc
from tests.auth.conftest import (
    CAPTURE,
    ROUTER_SECRET,
    SUBPROCESS_OUTPUT,
    bearer,
    serve,
    with_auth,
)

JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")


async def test_no_token_or_secret_in_any_log_line(config: MeshConfig, sts: TokenService) -> None:
    # Some activity of every kind, so the check means something even when run alone.
    user = mint_user_token(config, "alice")
    for kind in ("entra", "embedded"):
        exchanger = build_exchanger(with_auth(config, exchanger=kind), "router")
        await exchanger.token_for(user, "mesh-agent-b")
    async with (
        serve(server_interceptors(config, "router")) as addr,
        grpc.aio.insecure_channel(addr) as channel,
    ):
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        await stub.Info(agent_pb2.InfoRequest(), metadata=bearer(user), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Info(agent_pb2.InfoRequest(), metadata=bearer(user[:-3]), timeout=10)

    lines = CAPTURE.lines + SUBPROCESS_OUTPUT
    assert any("mesh.audit" in line for line in lines), "the capture saw no audit line"
    assert any(line.startswith("msal") for line in lines), "the capture saw no msal line"
    leaks = [line[:200] for line in lines if JWT_LIKE.search(line)]
    assert not leaks
    secrets = (ROUTER_SECRET, *(dev_client_secret(config, s) for s in ("b", "admin", "stepup")))
    assert not [line[:200] for line in lines if any(s in line for s in secrets)]
