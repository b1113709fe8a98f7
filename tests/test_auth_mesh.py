"""Auth through the router: per-hop on-behalf-of tokens, checked where they land."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig, config_from_dict
from mesh.context import current_principal, current_token
from mesh.errors import Unauthenticated, from_rpc_error
from mesh.v1 import router_pb2_grpc
from tests.meshtest import serve_agent, serve_router


def whoami() -> str:
    """Say who this call acts for, as the validated token says."""
    principal = current_principal.get()
    assert principal is not None and current_token.get()
    return json.dumps(
        {
            "sub": principal.subject,
            "aud": principal.audience,
            "actors": list(principal.actor_chain),
        }
    )


def _config(data_dir: Path) -> MeshConfig:
    return config_from_dict(
        {
            "data_dir": str(data_dir),
            "router": {"default_agent": "a", "store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}},
            "agents": {
                "a": {
                    "description": "front",
                    "handoffs": [{"target": "b"}],
                    "required_scopes": ["mesh.chat"],
                    "provider": {
                        "kind": "offline",
                        "rules": [{"contains": "who", "handoff": "b"}],
                    },
                },
                "b": {
                    "description": "answers who is asking",
                    "tools": ["tests.test_auth_mesh:whoami"],
                    "provider": {
                        "kind": "offline",
                        "rules": [{"contains": "who", "tool": "whoami"}],
                        "after_tools": "{results}",
                    },
                },
            },
        },
        source=str(Path(__file__)),
    )


@pytest.fixture
def sts_config(tmp_path: Path) -> Iterator[MeshConfig]:
    config = _config(tmp_path)
    with TokenService(config):
        yield config


async def test_user_token_reaches_b_after_transfer_with_actor_chain(
    sts_config: MeshConfig,
) -> None:
    config = sts_config
    async with serve_agent(config, "a") as (addr_a, _sa, _ra, _pa):
        async with serve_agent(config, "b") as (addr_b, _sb, _rb, _pb):
            async with serve_router(config, {"a": [addr_a], "b": [addr_b]}) as (router, _app):
                token = mint_user_token(config, "alice", ["mesh.chat"], 600)
                async with create_channel(router) as channel:
                    result = await AgentClient(channel, router=True).chat(
                        "who am I?", metadata=[("authorization", f"Bearer {token}")]
                    )
                    # Without a token the router refuses, and keeps serving.
                    call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=10)
                    await call.write(turn_request("who am I?"))
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call.read()
                    assert isinstance(from_rpc_error(caught.value), Unauthenticated)
    final = result.final
    assert final is not None and final.agent == "b"
    assert list(final.final.hop_path) == ["a", "b"]
    seen = json.loads(final.final.content.removeprefix("whoami: "))
    assert seen["sub"] == "alice"  # the original user
    assert seen["aud"] == config.auth.audience_for("b")  # a token meant only for b
    assert "mesh-router" in seen["actors"] and "mesh-agent-a" in seen["actors"]
    assert seen["actors"][0] == "mesh-router"  # the latest actor first
