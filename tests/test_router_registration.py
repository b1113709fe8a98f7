"""Registration that holds against an insider (issue 12, item 1), attacked from outside the
project's code: service tokens fetched from the token service over HTTPS with httpx, raw
Register calls, and alice's turns checked at the agents that served them."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from mesh.auth.runtime import dev_client_secret
from mesh.auth.sts import TokenService, mint_user_token
from mesh.auth.sts_keys import mint
from mesh.client import AgentClient, create_channel
from mesh.config import MeshConfig, config_from_dict
from mesh.errors import MeshError, PermissionDenied, from_rpc_error
from mesh.v1 import router_pb2, router_pb2_grpc

from .meshtest import serve_agent, serve_router


def _config(data_dir: Path) -> MeshConfig:
    agent = {"provider": {"kind": "offline", "default_reply": "{agent} here"}}
    return config_from_dict(
        {
            "data_dir": str(data_dir),
            "router": {"default_agent": "billing", "store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}},
            "agents": {
                "billing": {"description": "the real billing", **agent},
                "orders": {"description": "orders", **agent},
            },
        },
        source=str(Path(__file__)),
    )


async def _service_token(sts: TokenService, config: MeshConfig, service: str) -> str:
    tls = ssl.create_default_context(cafile=str(sts.ca_file))
    creds = (config.auth.client_id_for(service), dev_client_secret(config, service))
    form = {"grant_type": "client_credentials", "audience": config.auth.audience_for("router")}
    async with httpx.AsyncClient(verify=tls, trust_env=False, timeout=10) as client:
        got = await client.post(sts.token_endpoint, data=form, auth=creds)
    assert got.status_code == 200, got.text
    return str(got.json()["access_token"])


async def _register(router: str, token: str, name: str, address: str) -> MeshError | None:
    async with create_channel(router) as channel:
        call: Any = router_pb2_grpc.RouterServiceStub(channel).Register(
            metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        await call.write(router_pb2.RegisterRequest(name=name, address=address))
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as err:
            return from_rpc_error(err)
        call.cancel()
        assert response is not grpc.aio.EOF and response.accepted
        return None


@pytest.fixture
def config(tmp_path: Path) -> MeshConfig:
    return _config(tmp_path)


async def test_rogue_registrations_are_refused_and_never_get_a_turn(config: MeshConfig) -> None:
    with TokenService(config) as sts:
        async with (
            serve_agent(config, "billing") as (billing, billing_server, _rb, _pb),
            serve_agent(config, "orders") as (orders_addr, rogue_server, _ro, _po),
        ):
            # The router knows orders only by registration; billing statically.
            async with serve_router(config, {"billing": [billing]}) as (router, app):
                user = mint_user_token(config, "alice", ["mesh.chat"], 600)
                orders_token = await _service_token(sts, config, "orders")
                billing_token = await _service_token(sts, config, "billing")
                # A user token cannot register anything ...
                refused = await _register(router, user, "orders", orders_addr)
                assert isinstance(refused, PermissionDenied)
                # ... not even one delegated to the agent's own client whose scopes name
                # the register role: registering takes the agent's service token.
                delegated = mint(
                    config,
                    sub="alice",
                    audience=config.auth.audience_for("router"),
                    scopes=["mesh.chat", config.router.discovery.register_role],
                    extra={"idtyp": "user", "azp": config.auth.client_id_for("orders")},
                )
                refused = await _register(router, delegated, "orders", orders_addr)
                assert isinstance(refused, PermissionDenied) and "service token" in refused.message
                # A service may register only itself ...
                refused = await _register(router, orders_token, "billing", orders_addr)
                assert isinstance(refused, PermissionDenied) and "only its own" in refused.message
                # ... never shadowing a statically known agent ...
                refused = await _register(router, billing_token, "billing", orders_addr)
                assert isinstance(refused, PermissionDenied) and "shadows" in refused.message
                # ... at its own address, inside the configured networks.
                port = orders_addr.rsplit(":", 1)[1]
                refused = await _register(router, orders_token, "orders", f"127.0.0.9:{port}")
                assert isinstance(refused, PermissionDenied) and "own" in refused.message
                refused = await _register(router, orders_token, "orders", f"10.1.2.3:{port}")
                assert isinstance(refused, PermissionDenied)
                assert "orders" not in app.pool.endpoints
                # An agent's own (app-only) token registers, but never starts a turn:
                # the router's Chat acts for a user, refused before any hop.
                async with create_channel(router) as channel:
                    app_only = [("authorization", f"Bearer {orders_token}")]
                    with pytest.raises(PermissionDenied, match="user's token"):
                        await AgentClient(channel, router=True).chat("hi", metadata=app_only)
                assert billing_server.lifecycle.turns_started == 0
                # alice's turns all went to the real billing; the rogue saw none.
                async with create_channel(router) as channel:
                    client = AgentClient(channel, router=True)
                    auth = [("authorization", f"Bearer {user}")]
                    for n in range(4):
                        result = await client.chat(f"hi {n}", metadata=auth)
                        assert result.final is not None and result.final.agent == "billing"
                assert billing_server.lifecycle.turns_started == 4
                assert rogue_server.lifecycle.turns_started == 0
                # The real orders agent registers itself and is listed.
                assert await _register(router, orders_token, "orders", orders_addr) is None
