"""Auth through the router: per-hop on-behalf-of tokens, checked where they land."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from mesh.auth.exchange import hop_tokens
from mesh.auth.policy import hop_scopes, hops_claim_for
from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig, config_from_dict
from mesh.context import current_principal, current_token
from mesh.errors import MeshError, Unauthenticated, from_rpc_error
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
                    # Without a token the router refuses, counts it, and keeps serving.
                    labels = {"service": "router", "code": "UNAUTHENTICATED"}
                    before = REGISTRY.get_sample_value("mesh_auth_refusals_total", labels) or 0
                    call = router_pb2_grpc.RouterServiceStub(channel).Chat(timeout=10)
                    await call.write(turn_request("who am I?"))
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call.read()
                    assert isinstance(from_rpc_error(caught.value), Unauthenticated)
                    after = REGISTRY.get_sample_value("mesh_auth_refusals_total", labels)
                    assert after == before + 1
    final = result.final
    assert final is not None and final.agent == "b"
    assert list(final.final.hop_path) == ["a", "b"]
    seen = json.loads(final.final.content.removeprefix("whoami: "))
    assert seen["sub"] == "alice"  # the original user
    assert seen["aud"] == config.auth.audience_for("b")  # a token meant only for b
    assert "mesh-router" in seen["actors"] and "mesh-agent-a" in seen["actors"]
    assert seen["actors"][0] == "mesh-router"  # the latest actor first


# -- delegation that narrows: three hops, TRANSFER then CONSULT ------------------------------

#: What each agent's tool saw, in call order (the tools run in this process).
SEEN: list[dict[str, object]] = []
USER_SCOPES = ["mesh.chat", "billing.read", "orders.read", "profile.write"]
DECLARED = {
    "triage": ["mesh.chat"],
    "billing": ["mesh.chat", "billing.read"],
    "orders": ["mesh.chat", "orders.read"],
}


def record_principal() -> str:
    """Record who this call acts for, as the validated token says."""
    principal = current_principal.get()
    assert principal is not None
    SEEN.append(
        {
            "agent": principal.audience,
            "sub": principal.subject,
            "scopes": sorted(principal.scopes),
            "actors": list(principal.actor_chain),
            "hops": principal.hops_remaining,
        }
    )
    return "recorded"


def _three_hop_config(data_dir: Path) -> MeshConfig:
    def agent(rules: list[dict[str, object]], handoffs: tuple[str, ...] = ()) -> dict[str, object]:
        return {
            "description": "an agent that records its principal",
            "tools": ["tests.test_auth_mesh:record_principal"],
            "handoffs": [{"target": t, "modes": ["transfer", "consult"]} for t in handoffs],
            "provider": {"kind": "offline", "rules": rules, "after_tools": "{results}"},
        }

    who: dict[str, object] = {"contains": "who", "tool": "record_principal"}
    return config_from_dict(
        {
            "data_dir": str(data_dir),
            "max_hops": 3,
            "router": {"default_agent": "triage", "store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}, "scopes": DECLARED},
            "agents": {
                "triage": agent([{"contains": "billing", "handoff": "billing"}, who], ("billing",)),
                "billing": agent([{"contains": "orders", "consult": ["orders"]}, who], ("orders",)),
                "orders": agent([who]),
            },
        },
        source=str(Path(__file__)),
    )


@pytest.fixture
def three_hops(tmp_path: Path) -> Iterator[MeshConfig]:
    config = _three_hop_config(tmp_path)
    SEEN.clear()
    with TokenService(config):
        yield config


async def _who(address: str, token: str) -> grpc.StatusCode:
    async with create_channel(address) as channel:
        try:
            await AgentClient(channel).chat(
                "who am I?", metadata=[("authorization", f"Bearer {token}")]
            )
        except MeshError as err:
            return err.code
    return grpc.StatusCode.OK


async def test_three_hops_narrow_at_every_agent_with_hop_tokens(three_hops: MeshConfig) -> None:
    """What the router does for a TRANSFER (triage -> billing) and a CONSULT (billing ->
    orders), through the API it calls (:func:`mesh.auth.exchange.hop_tokens`), checked at
    each real agent's tool: exactly its audience, the scopes it declared, the actors in
    order (latest first) and the remaining hop budget."""
    config = three_hops
    tokens = hop_tokens(config, "router")
    user = mint_user_token(config, "alice", USER_SCOPES, 600)
    held: dict[str, str] = {}
    previous: str | None = None
    for used, name in enumerate(("triage", "billing", "orders")):
        held[name] = previous = await tokens.for_hop(
            user,  # the user's own token: the scopes come from it
            config.auth.audience_for(name),
            scopes=hop_scopes(config, name),
            hops_remaining=hops_claim_for(config, name, used),
            previous=previous,  # the token the agent handing over held: the chain
        )
    async with (
        serve_agent(config, "triage") as (triage, *_),
        serve_agent(config, "billing") as (billing, *_),
        serve_agent(config, "orders") as (orders, *_),
    ):
        addresses = {"triage": triage, "billing": billing, "orders": orders}
        for name, address in addresses.items():
            assert await _who(address, held[name]) == grpc.StatusCode.OK
            for other, other_address in addresses.items():
                if other != name:  # a token minted for one agent is refused at the others
                    code = await _who(other_address, held[name])
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (name, other)
        async with serve_router(config, {n: [a] for n, a in addresses.items()}) as (router, _):
            for name in addresses:
                async with create_channel(router) as channel:
                    with pytest.raises(Unauthenticated):
                        await AgentClient(channel, router=True).chat(
                            "who am I?", metadata=[("authorization", f"Bearer {held[name]}")]
                        )
    router_id, triage_id, billing_id = "mesh-router", "mesh-agent-triage", "mesh-agent-billing"
    expected: list[dict[str, object]] = [
        {
            "agent": "mesh-agent-triage",
            "sub": "alice",
            "scopes": ["mesh.chat"],
            "actors": [router_id],
            "hops": 3,
        },
        {
            "agent": "mesh-agent-billing",
            "sub": "alice",
            "scopes": ["billing.read", "mesh.chat"],
            "actors": [router_id, triage_id, router_id],
            "hops": 2,
        },
        {
            "agent": "mesh-agent-orders",
            "sub": "alice",
            "scopes": ["mesh.chat", "orders.read"],
            "actors": [router_id, billing_id, router_id, triage_id, router_id],
            "hops": 1,
        },
    ]
    assert expected == SEEN


async def test_three_hop_turns_through_the_router(three_hops: MeshConfig) -> None:
    """The same through the real router: TRANSFER triage -> billing, then a CONSULT
    billing -> orders. Every agent's token has exactly its own audience, the scopes it
    declared, the chain of actors in order and the remaining hop budget."""
    config = three_hops
    user = mint_user_token(config, "alice", USER_SCOPES, 600)
    metadata = [("authorization", f"Bearer {user}")]
    async with (
        serve_agent(config, "triage") as (triage, *_),
        serve_agent(config, "billing") as (billing, *_),
        serve_agent(config, "orders") as (orders, *_),
    ):
        static = {"triage": [triage], "billing": [billing], "orders": [orders]}
        async with serve_router(config, static) as (router, _):
            async with create_channel(router) as channel:
                client = AgentClient(channel, router=True)
                await client.chat("who am I?", conversation_id="c3", metadata=metadata)
                await client.chat("billing: who am I?", conversation_id="c3", metadata=metadata)
                await client.chat("orders: who am I?", conversation_id="c3", metadata=metadata)
    assert [s["agent"] for s in SEEN] == [
        "mesh-agent-triage",
        "mesh-agent-billing",
        "mesh-agent-orders",
    ]
    assert all(s["sub"] == "alice" for s in SEEN)
    assert SEEN[0]["actors"] == ["mesh-router"]
    actors = [list(map(str, s["actors"])) for s in SEEN]  # type: ignore[call-overload]
    assert actors[1][0] == "mesh-router" and "mesh-agent-triage" in actors[1]
    assert actors[2][:2] == ["mesh-router", "mesh-agent-billing"]
    narrowed = [(s["scopes"], s["hops"] is not None) for s in SEEN]
    assert narrowed == [(sorted(DECLARED[n]), True) for n in ("triage", "billing", "orders")]
    hops = [int(str(s["hops"])) for s in SEEN]
    assert hops[0] >= hops[1] >= hops[2]  # the budget only shrinks along the chain


# -- a conversation belongs to its user ------------------------------------------------------


@contextlib.asynccontextmanager
async def one_agent_mesh(
    tmp_path: Path, provider: dict[str, Any], **router: Any
) -> AsyncIterator[tuple[MeshConfig, str, Any]]:
    """Auth on, the token service, agent ``a`` and a router in front of it."""
    config = config_from_dict(
        {
            "data_dir": str(tmp_path),
            "router": {"default_agent": "a", "store": {"kind": "memory"}, **router},
            "auth": {"enabled": True, "sts": {"port": 0}},
            "agents": {"a": {"description": "the only agent", "provider": provider}},
        },
        source=str(Path(__file__)),
    )
    with TokenService(config):
        async with serve_agent(config, "a") as (addr_a, _s, _r, _p):
            async with serve_router(config, {"a": [addr_a]}) as (address, app):
                yield config, address, app


async def test_a_conversation_id_never_reaches_another_users_conversation(
    tmp_path: Path,
) -> None:
    """mallory names alice's conversation id: he gets a conversation of his own. He
    neither reads alice's history (the agent sees none of it) nor adds to it."""
    provider = {"kind": "offline", "default_reply": "turn {turns}: {message}"}
    async with one_agent_mesh(tmp_path, provider) as (config, router, app):
        alice = [("authorization", f"Bearer {mint_user_token(config, 'alice')}")]
        mallory = [("authorization", f"Bearer {mint_user_token(config, 'mallory')}")]
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)

            async def say(who: list[tuple[str, str]], text: str) -> str:
                result = await client.chat(text, conversation_id="shared", metadata=who)
                final = result.final
                assert final is not None and final.conversation_id == "shared"
                return final.final.content

            assert await say(alice, "my card is 4111") == "turn 1: my card is 4111"
            assert await say(alice, "refund it") == "turn 2: refund it"
            assert await say(mallory, "repeat everything") == "turn 1: repeat everything"
            assert await say(mallory, "and again") == "turn 2: and again"
            assert await say(alice, "thanks") == "turn 3: thanks"
        keys = sorted(app.store._messages)
        assert len(keys) == 2 and all(k.endswith("/shared") for k in keys)
        stored = {k: [m.content for m in app.store._messages[k]] for k in keys}
        assert sum("my card is 4111" in v for v in stored.values()) == 1
        assert not any("my card is 4111" in v and "and again" in v for v in stored.values())


async def test_one_user_cannot_take_every_stream(tmp_path: Path) -> None:
    """A user holding router.max_streams_per_user Chat streams gets RESOURCE_EXHAUSTED
    for one more; other users are served meanwhile, and closing a stream frees its place."""
    async with one_agent_mesh(tmp_path, {"kind": "offline"}, max_streams_per_user=3) as (
        config,
        router,
        _app,
    ):
        alice = [("authorization", f"Bearer {mint_user_token(config, 'alice')}")]
        bob = [("authorization", f"Bearer {mint_user_token(config, 'bob')}")]
        async with create_channel(router) as channel:
            client = AgentClient(channel, router=True)

            async def one_turn(stream: Any) -> None:
                events = [e async for e in stream.turn(turn_request("hi"))]
                assert events[-1].WhichOneof("kind") == "final"

            held = [client.open(metadata=alice, timeout=60) for _ in range(3)]
            for stream in held:
                await one_turn(stream)  # each is open and counted at the router
            extra = client.open(metadata=alice, timeout=60)
            with pytest.raises(MeshError) as caught:
                await one_turn(extra)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_user" in caught.value.message
            result = await client.chat("hi", metadata=bob)
            assert result.final is not None
            held.pop().cancel()
            freed = client.open(metadata=alice, timeout=60)
            for _attempt in range(50):  # the router sees the cancel a moment later
                try:
                    await one_turn(freed)
                    break
                except MeshError:
                    freed = client.open(metadata=alice, timeout=60)
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the closed stream's place was never freed")
            for stream in [*held, freed]:
                await stream.close()
