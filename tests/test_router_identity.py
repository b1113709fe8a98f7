"""Identity survives stream pooling: a turn never runs under another user's token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel
from mesh.config import config_from_dict
from mesh.context import current_principal

from .meshtest import serve_agent, serve_router


def whoami() -> str:
    """Say who this turn runs as."""
    principal = current_principal.get()
    assert principal is not None
    return json.dumps({"sub": principal.subject, "aud": principal.audience})


async def test_interleaved_turns_of_two_users_each_run_as_their_own(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "data_dir": str(tmp_path),
            "router": {"default_agent": "b", "store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}},
            "agents": {
                "b": {
                    "description": "answers who is asking",
                    "tools": ["tests.test_router_identity:whoami"],
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
    seen: list[tuple[str, str]] = []
    with TokenService(config):
        async with serve_agent(config, "b") as (address, server, _rt, _p):
            async with serve_router(config, {"b": [address]}) as (router, app):
                tokens = {
                    u: mint_user_token(config, u, ["mesh.chat"], 600) for u in ("alice", "bob")
                }
                async with create_channel(router) as channel:
                    client = AgentClient(channel, router=True)

                    async def ask(user: str, n: int) -> None:
                        result = await client.chat(
                            f"who am I? ({n})",
                            conversation_id=f"{user}-{n % 3}",
                            metadata=[("authorization", f"Bearer {tokens[user]}")],
                        )
                        assert result.final is not None
                        body = result.final.final.content.removeprefix("whoami: ")
                        seen.append((user, json.loads(body)["sub"]))

                    for n in range(10):
                        await asyncio.gather(ask("alice", n), ask("bob", n))
                opened = app.streams.opened
    assert len(seen) == 20 and all(user == sub for user, sub in seen), seen
    # The exchanges are counted for the metrics endpoint: one per user, then cache hits.
    from prometheus_client import REGISTRY

    labels = {"audience": config.auth.audience_for("b")}
    exchanged = REGISTRY.get_sample_value(
        "mesh_token_exchanges_total", {**labels, "result": "exchanged"}
    )
    hits = REGISTRY.get_sample_value(
        "mesh_token_exchanges_total", {**labels, "result": "cache_hit"}
    )
    assert exchanged is not None and exchanged >= 2
    assert hits is not None and hits >= 18 - 2
    fetched = REGISTRY.get_sample_value("mesh_jwks_fetches_total", {"outcome": "ok"})
    assert fetched is not None and fetched >= 1
    # Streams were reused (per user), not opened per turn.
    assert opened <= 4 and server.lifecycle.started == opened
