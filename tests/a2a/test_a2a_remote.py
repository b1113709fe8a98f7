"""A remote agent built with the ``a2a-sdk``'s server side as a handoff target of the
mesh: TRANSFER streams its output to the gRPC client, CONSULT returns its answer into
the caller's turn, it receives a token for its own audience with the user as subject
and the handing agent in the actor chain, and the hop budget counts it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from a2a.helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    ServerCallContextBuilder,
    create_agent_card_routes,
    create_jsonrpc_routes,
)
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Part
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.requests import Request

from mesh.a2a._auth import Bearer, bearer_of
from mesh.auth.interceptors import make_validator
from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel
from mesh.config import MeshConfig, config_from_dict
from tests.meshtest import serve_agent, serve_router

REMOTE_AUDIENCE = "https://remote.example/a2a"


class _Contexts(ServerCallContextBuilder):
    """The SDK's default builder keeps every header in the call state, which the SDK logs
    at DEBUG: keep the bearer where its repr hides it, and the other headers."""

    def build(self, request: Request) -> ServerCallContext:
        _scheme, _, token = request.headers.get("authorization", "").partition(" ")
        headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        return ServerCallContext(state={"headers": headers, "mesh_token": Bearer(token or None)})


class RemoteExecutor(AgentExecutor):
    """Answers in three streamed chunks and records what each call carried."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        self.calls.append(
            {
                "authorization": f"Bearer {bearer_of(context.call_context.state)}",
                "text": context.get_user_input(),
                "context_id": context.context_id,
                "mesh": MessageToDict(context.message.metadata).get("mesh", {}),
            }
        )
        await event_queue.enqueue_event(new_task_from_user_message(context.message))
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.start_work()
        for i, chunk in enumerate(["remote ", "answers: ", context.get_user_input()]):
            await updater.add_artifact([Part(text=chunk)], artifact_id="answer", append=i > 0)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id or "", context.context_id or "").cancel()


@contextlib.asynccontextmanager
async def remote_agent() -> AsyncIterator[tuple[str, RemoteExecutor]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    card = AgentCard(
        name="remote",
        description="an agent of another framework",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=f"{url}/", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="answer", name="answer", description="answers", tags=["x"])],
    )
    executor = RemoteExecutor()
    handler = DefaultRequestHandler(
        agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card
    )
    app = Starlette(
        routes=[
            *create_agent_card_routes(card),
            *create_jsonrpc_routes(handler, "/", context_builder=_Contexts()),
        ]
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield url, executor
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()


def mesh_config(tmp_path: Path, url: str) -> MeshConfig:
    return config_from_dict(
        {
            "data_dir": str(tmp_path),
            "max_hops": 3,
            "router": {"store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}},
            "agents": {
                "triage": {
                    "description": "routes questions",
                    "handoffs": [{"target": "remote", "modes": ["transfer", "consult"]}],
                    "provider": {
                        "kind": "offline",
                        "rules": [
                            {"contains": "invoice", "handoff": "remote"},
                            {"contains": "ask", "consult": ["remote"]},
                        ],
                        "after_tools": "triage heard back: {results}",
                    },
                },
                "tight": {
                    "description": "may not hand off at all",
                    "limits": {"max_hops": 0},
                    "handoffs": [{"target": "remote", "modes": ["transfer"]}],
                    "provider": {
                        "kind": "offline",
                        "rules": [{"contains": "invoice", "handoff": "remote"}],
                    },
                },
                "remote": {
                    "description": "a remote A2A agent",
                    "a2a": {"url": url, "audience": REMOTE_AUDIENCE},
                },
            },
        },
        source=str(tmp_path / "mesh.yaml"),
    )


def actors(claims: dict[str, Any]) -> list[str]:
    out: list[str] = []
    act = claims.get("act")
    while isinstance(act, dict):
        out.append(str(act.get("sub")))
        act = act.get("act")
    return out


async def test_remote_a2a_agent_as_transfer_and_consult_target(tmp_path: Path) -> None:
    async with remote_agent() as (url, remote):
        config = mesh_config(tmp_path, url)
        with TokenService(config):
            async with contextlib.AsyncExitStack() as stack:
                static = {}
                for name in ("triage", "tight"):
                    addr, *_ = await stack.enter_async_context(serve_agent(config, name))
                    static[name] = [addr]
                router, _app = await stack.enter_async_context(serve_router(config, static))
                user = mint_user_token(config, "alice", ["mesh.chat"], 600)
                md = [("authorization", f"Bearer {user}")]
                async with create_channel(router) as channel:
                    client = AgentClient(channel, router=True)
                    moved = await client.chat(
                        "where is my invoice?", agent="triage", conversation_id="c-1", metadata=md
                    )
                    asked = await client.chat(
                        "ask the remote one", agent="triage", conversation_id="c-2", metadata=md
                    )
                    calls_before = len(remote.calls)
                    refused = await client.chat(
                        "where is my invoice?", agent="tight", conversation_id="c-3", metadata=md
                    )
                    # A turn straight to the remote agent carries the conversation's whole
                    # history (an A2A agent keeps none): what c-1's first turn stored.
                    again = await client.chat(
                        "and the due date?", agent="remote", conversation_id="c-1", metadata=md
                    )
                validator = make_validator(config, "remote")
                handed = remote.calls[:2]  # the TRANSFER and the CONSULT, handed by triage
                claims = [await validator.validate(c["authorization"][7:]) for c in handed]
    # TRANSFER: the remote agent's chunks stream to the gRPC client, then its final
    kinds = [e.WhichOneof("kind") for e in moved.events]
    assert kinds[0] == "handoff" and kinds[-1] == "final"
    deltas = [e.delta.text for e in moved.events if e.WhichOneof("kind") == "delta"]
    assert deltas == ["remote ", "answers: ", "where is my invoice?"]
    assert all(e.agent == "remote" for e in moved.events if e.WhichOneof("kind") == "delta")
    final = moved.events[-1]
    assert final.agent == "remote" and final.final.content == "remote answers: where is my invoice?"
    assert list(final.final.hop_path) == ["triage", "remote"]
    # the A2A message: context id = conversation, the mesh's hop context in metadata
    first = remote.calls[0]
    assert first["context_id"] == "c-1"
    assert first["mesh"]["mode"] == "HANDOFF_MODE_TRANSFER"
    assert first["mesh"]["source_agent"] == "triage"
    assert first["mesh"]["hop_path"] == ["triage", "remote"]
    assert first["mesh"]["hops_remaining"] == 2  # the hop into remote was counted
    # CONSULT: the answer comes back into triage's turn
    assert asked.final is not None and asked.final.agent == "triage"
    assert "remote answers:" in asked.final.final.content
    assert asked.final.final.content.startswith("triage heard back:")
    assert remote.calls[1]["mesh"]["mode"] == "HANDOFF_MODE_CONSULT"
    # identity: a token for the remote's own audience, the user as subject, triage acting
    for seen in claims:
        assert seen["aud"] == REMOTE_AUDIENCE
        assert seen["sub"] == "alice"
        assert config.auth.client_id_for("triage") in actors(seen)
    assert user not in [c["authorization"][7:] for c in remote.calls]
    # the budget: an agent with no hops left cannot reach the remote agent
    assert calls_before == 2 and len(remote.calls) == 3
    assert again.final is not None and again.final.final.content.endswith("the due date?")
    assert remote.calls[2]["mesh"]["history"] == [
        {"role": "ROLE_USER", "agent": "", "content": "where is my invoice?"},
        {
            "role": "ROLE_ASSISTANT",
            "agent": "remote",
            "content": "remote answers: where is my invoice?",
        },
    ]
    error = refused.events[-1]
    assert error.WhichOneof("kind") == "error"
    assert error.error.reason == "HOP_BUDGET_EXCEEDED"
    assert "tight > remote" in error.error.message
