"""``mesh a2a`` through the ``a2a-sdk``'s own client: cards, a streamed TRANSFER, a
conversation continued by context id, cancel reaching every hop, and refused tokens.

Every server is real and on 127.0.0.1 port 0: the token service, two or three agents
(in-process, their model streams recorded), the router and the ``mesh a2a`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    Client,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
)
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from google.protobuf.json_format import MessageToDict

from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import MeshConfig, config_from_dict
from tests.meshtest import Proc, RecordingProvider, serve_agent, serve_router, write_config

EDGE_AUDIENCE = "mesh-a2a"


def mesh_data(tmp_path: Path) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path),
        "router": {"default_agent": "triage", "store": {"kind": "memory"}},
        "auth": {
            "enabled": True,
            "sts": {"port": 0},
            "audiences": {"a2a": EDGE_AUDIENCE},
            "clients": {"a2a": {}},  # the edge is a client of the STS, like every service
        },
        "agents": {
            "triage": {
                "description": "routes questions",
                "handoffs": [
                    {"target": "billing", "modes": ["transfer"]},
                    {"target": "slow", "modes": ["consult"]},
                ],
                "provider": {
                    "kind": "offline",
                    "rules": [
                        {"contains": "invoice", "handoff": "billing"},
                        {"contains": "stall", "consult": ["slow"]},
                    ],
                },
            },
            "billing": {
                "description": "answers billing questions",
                "skills": [{"name": "invoices", "description": "finds and explains invoices"}],
                "provider": {
                    "kind": "offline",
                    "chunk_chars": 8,
                    "delay_ms": 150,  # deltas 0.15 s apart: each reaches the client
                    "default_reply": "billing, turn {turns}: {message}",
                },
            },
            "echo": {
                "description": "answers with the message, in a burst of small chunks",
                "provider": {"kind": "offline", "chunk_chars": 12, "default_reply": "{message}"},
            },
            "slow": {
                "description": "a model that takes its time",
                "provider": {"kind": "offline", "chunk_chars": 4, "delay_ms": 60000},
            },
            "payer": {
                "description": "issues refunds, with the person's approval",
                "tools": ["tests.orch_tools:issue_refund"],
                "tool_policies": {"issue_refund": {"approval": "required"}},
                "provider": {
                    "kind": "offline",
                    "rules": [
                        {
                            "contains": "refund",
                            "tool": "issue_refund",
                            "arguments": {"invoice_id": "INV-A2A"},
                        }
                    ],
                    "after_tools": "payer: {results}",
                },
            },
        },
    }


class Mesh:
    def __init__(self, config: MeshConfig, url: str, records: dict[str, RecordingProvider]):
        self.config = config
        self.url = url
        self.records = records
        self.grpc = ""
        self.servers: dict[str, Any] = {}
        """Each agent's server (a test may stop one)."""

    def token(self, ttl_s: int = 600) -> str:
        return mint_user_token(self.config, "alice", ["mesh.chat"], ttl_s, audience=EDGE_AUDIENCE)


@contextlib.asynccontextmanager
async def running_edge(tmp_path: Path, *extra: str) -> AsyncIterator[Mesh]:
    data = mesh_data(tmp_path)
    path = write_config(tmp_path, data)
    config = config_from_dict(data, source=str(path))
    with TokenService(config):
        async with contextlib.AsyncExitStack() as stack:
            static: dict[str, list[str]] = {}
            records: dict[str, RecordingProvider] = {}
            servers: dict[str, Any] = {}
            for name in ("triage", "billing", "echo", "slow", "payer"):
                addr, server, _r, rec = await stack.enter_async_context(serve_agent(config, name))
                static[name] = [addr]
                records[name] = rec
                servers[name] = server
            router, _app = await stack.enter_async_context(serve_router(config, static))
            args = ["a2a", "--config", str(path), "--router", router, "--port", "0", *extra]
            proc = Proc(args)
            try:
                url = await asyncio.to_thread(proc.wait_line, "a2a: ")
                mesh = Mesh(config, url, records)
                mesh.servers = servers
                if extra:
                    mesh.grpc = await asyncio.to_thread(proc.wait_line, "a2a-grpc: ")
                yield mesh
            except BaseException:
                proc.stop()
                raise
            assert proc.stop() == 0, "".join(proc.stderr)
            refusal = '"status":"UNAUTHENTICATED"'  # the gRPC binding's audit line, by design
            loud = [
                line
                for line in proc.stderr
                if ("WARNING" in line and refusal not in line) or "Traceback" in line
            ]
            assert not loud, "".join(proc.stderr)  # normal calls log nothing loud


async def sdk_client(http: httpx.AsyncClient, base: str) -> tuple[AgentCard, Client]:
    card = await A2ACardResolver(http, base).get_agent_card()
    return card, ClientFactory(ClientConfig(streaming=True, httpx_client=http)).create(card)


def user_message(text: str, context_id: str = "") -> SendMessageRequest:
    message = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=[Part(text=text)])
    if context_id:
        message.context_id = context_id
    return SendMessageRequest(message=message)


def answer_chunks(events: list[StreamResponse]) -> list[str]:
    return [
        part.text
        for e in events
        if e.HasField("artifact_update")
        for part in e.artifact_update.artifact.parts
        if part.text
    ]


def final_state(events: list[StreamResponse]) -> Any:
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    return states[-1]


async def test_card_streamed_transfer_and_a_continued_conversation(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as mesh:
        headers = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            card, client = await sdk_client(http, f"{mesh.url}/agents/triage")
            billing_card, _ = await sdk_client(http, f"{mesh.url}/agents/billing")
            root_card, _ = await sdk_client(http, mesh.url)
            first = [e async for e in client.send_message(user_message("where is my invoice?"))]
            context_id = first[0].task.context_id
            task_id = first[0].task.id
            second = [
                e async for e in client.send_message(user_message("and the invoice?", context_id))
            ]
            stored = await client.get_task(GetTaskRequest(id=task_id))
            await client.close()
    # the card: one per agent, skills from the agent's Info, the issuer's scheme
    assert card.name == "triage" and card.capabilities.streaming
    assert card.supported_interfaces[0].url == f"{mesh.url}/agents/triage/"
    assert card.supported_interfaces[0].protocol_binding == "JSONRPC"
    assert [s.name for s in billing_card.skills] == ["invoices"]
    assert {s.tags[0] for s in root_card.skills} == {"triage", "billing", "echo", "slow", "payer"}
    scheme = card.security_schemes["mesh"].open_id_connect_security_scheme
    assert scheme.open_id_connect_url.endswith("/.well-known/openid-configuration")
    flow = card.security_schemes["mesh-oauth2"].oauth2_security_scheme.flows
    assert flow.client_credentials.token_url.startswith("https://127.0.0.1:")
    # the TRANSFER streamed: a handoff status, then billing's deltas, then completed
    notes = [
        MessageToDict(e.status_update.status.message.metadata)["mesh"]
        for e in first
        if e.HasField("status_update") and e.status_update.status.message.parts
    ]
    assert notes[0]["kind"] == "handoff" and notes[0]["target"] == "billing"
    chunks = answer_chunks(first)
    assert len(chunks) >= 3  # streamed in 8-character deltas
    first_answer = re.fullmatch(r"billing, turn (\d+): where is my invoice\?", "".join(chunks))
    assert first_answer, chunks
    assert final_state(first) == TaskState.TASK_STATE_COMPLETED
    assert notes[-1]["hop_path"] == ["triage", "billing"]
    # the same context continues the conversation: billing (now active) saw turn 1
    second_answer = re.fullmatch(
        r"billing, turn (\d+): and the invoice\?", "".join(answer_chunks(second))
    )
    assert second_answer and int(second_answer[1]) > int(first_answer[1])
    assert final_state(second) == TaskState.TASK_STATE_COMPLETED
    assert second[0].task.context_id == context_id and second[0].task.id != task_id
    seen = [m.content for m in mesh.records["billing"].requests[-1].messages]
    assert "where is my invoice?" in seen and "".join(chunks) in seen
    assert stored.status.state == TaskState.TASK_STATE_COMPLETED


async def test_a_turn_that_fails_in_the_mesh_fails_its_task(tmp_path: Path) -> None:
    """The router fails the turn (the agent it must consult is down): the task ends
    ``failed`` with the mesh's code, in the stream and for a later tasks/get, instead
    of staying ``working`` with no word."""
    async with running_edge(tmp_path) as mesh:
        await mesh.servers["slow"].stop(0)
        headers = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/triage")
            events = [e async for e in client.send_message(user_message("please stall"))]
            stored = await client.get_task(GetTaskRequest(id=events[0].task.id))
            await client.close()
    assert final_state(events) == TaskState.TASK_STATE_FAILED
    last = [e for e in events if e.HasField("status_update")][-1].status_update.status
    assert MessageToDict(last.message.metadata)["mesh"]["code"] == "UNAVAILABLE"
    assert stored.status.state == TaskState.TASK_STATE_FAILED


async def test_a_long_answer_in_small_chunks_reaches_the_task_in_batches(tmp_path: Path) -> None:
    """40,000 characters in 12-character deltas (3,334 of them) reach the task as a few
    artifact appends, in order and whole: the SDK copies the task for every append,
    and one per delta made the edge's time grow with the answer's length squared."""
    text = "".join(f"{n:05d} " for n in range(40_000 // 6))
    async with running_edge(tmp_path) as mesh:
        headers = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=headers, timeout=120) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/echo")
            events = [e async for e in client.send_message(user_message(text))]
            stored = await client.get_task(GetTaskRequest(id=events[0].task.id))
            await client.close()
    chunks = answer_chunks(events)
    assert "".join(chunks) == text
    assert len(chunks) <= 40, len(chunks)
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    assert "".join(p.text for a in stored.artifacts for p in a.parts) == text


async def test_the_callers_trace_continues_through_the_mesh(tmp_path: Path) -> None:
    """An A2A caller's ``traceparent`` header reaches the router call, so the agents'
    work joins the caller's trace (the edge used to start a new one)."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with running_edge(tmp_path) as mesh:
        headers = {
            "Authorization": f"Bearer {mesh.token()}",
            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        }
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/triage")
            events = [e async for e in client.send_message(user_message("where is my invoice?"))]
            await client.close()
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    for agent in ("triage", "billing"):
        [trace] = mesh.records[agent].traces
        assert trace.get("traceparent", "").split("-")[1] == trace_id, (agent, trace)


async def test_cancel_stops_every_hop(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as mesh:
        headers = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/triage")
            events: list[StreamResponse] = []

            async def run() -> None:
                async for event in client.send_message(user_message("please stall")):
                    events.append(event)

            running = asyncio.create_task(run())
            slow = mesh.records["slow"]
            await asyncio.wait_for(slow.opened.wait(), 30)  # triage consulted slow: it runs
            task_id = events[0].task.id
            resubscribed = client.subscribe(SubscribeToTaskRequest(id=task_id))
            snapshot = await asyncio.wait_for(anext(resubscribed), 30)  # tasks/resubscribe
            canceled = await client.cancel_task(CancelTaskRequest(id=task_id))
            await asyncio.wait_for(slow.closed.wait(), 30)  # its model stream stopped
            await asyncio.wait_for(running, 30)
            stored = await client.get_task(GetTaskRequest(id=task_id))
            await client.close()
    assert snapshot.task.id == task_id
    assert snapshot.task.status.state == TaskState.TASK_STATE_WORKING
    assert canceled.status.state == TaskState.TASK_STATE_CANCELED
    assert stored.status.state == TaskState.TASK_STATE_CANCELED
    # slow stopped mid-answer (one delta a minute: it could not have finished), and
    # triage never got the consult's answer back to finish its turn with
    assert len(slow.requests) == 1
    assert mesh.records["triage"].closed.is_set()
    assert len(mesh.records["triage"].requests) == 1


async def test_bad_tokens_are_refused_and_the_edge_stays_up(tmp_path: Path) -> None:
    async with running_edge(tmp_path) as mesh:
        tokens = {
            "none": None,
            "wrong audience": mint_user_token(mesh.config, "alice", ["mesh.chat"], 600),
            "expired": mesh.token(ttl_s=-600),
            "garbage": "not.a.token",
        }
        refused: dict[str, BaseException] = {}
        raw: dict[str, httpx.Response] = {}
        for kind, token in tokens.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(headers=headers, timeout=30) as http:
                _card, client = await sdk_client(http, f"{mesh.url}/agents/billing")  # public
                with pytest.raises(A2AClientError) as caught:
                    async for _ in client.send_message(user_message("hello")):
                        pass
                refused[kind] = caught.value
                raw[kind] = await http.post(f"{mesh.url}/agents/billing/", json={})
        good = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=good, timeout=30) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/billing")
            after = [e async for e in client.send_message(user_message("still there?"))]
    for kind, token in tokens.items():
        cause = refused[kind].__cause__
        assert isinstance(cause, httpx.HTTPStatusError), kind
        assert cause.response.status_code == 401, kind
        assert raw[kind].status_code == 401, kind
        challenge = raw[kind].headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="mesh"'), kind
        assert ('error="invalid_token"' in challenge) == (token is not None), kind
        assert raw[kind].json()["error"]["data"]["reason"] == "UNAUTHENTICATED", kind
    assert final_state(after) == TaskState.TASK_STATE_COMPLETED  # the server stayed up


async def test_the_grpc_binding(tmp_path: Path) -> None:
    """The same agents over A2A's gRPC binding: the card lists it with the agent as
    tenant; the SDK's gRPC transport streams a TRANSFER; no token is UNAUTHENTICATED."""
    async with running_edge(tmp_path, "--grpc-port", "0") as mesh:
        async with httpx.AsyncClient(timeout=30) as http:
            card = await A2ACardResolver(http, f"{mesh.url}/agents/triage").get_agent_card()
        channels: list[grpc.aio.Channel] = []

        def channel(url: str) -> grpc.aio.Channel:
            channels.append(grpc.aio.insecure_channel(url))
            return channels[-1]

        config = ClientConfig(
            streaming=True, supported_protocol_bindings=["GRPC"], grpc_channel_factory=channel
        )
        client = ClientFactory(config).create(card)
        auth = ClientCallContext(service_parameters={"authorization": f"Bearer {mesh.token()}"})
        events = [e async for e in client.send_message(user_message("my invoice?"), context=auth)]
        with pytest.raises(A2AClientError) as refused:
            async for _ in client.send_message(user_message("my invoice?")):
                pass
        stored = await client.get_task(GetTaskRequest(id=events[0].task.id), context=auth)
        for ch in channels:
            await ch.close()
    grpc_interface = [i for i in card.supported_interfaces if i.protocol_binding == "GRPC"]
    assert grpc_interface[0].url == mesh.grpc and grpc_interface[0].tenant == "triage"
    assert re.fullmatch(r"billing, turn \d+: my invoice\?", "".join(answer_chunks(events)))
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    assert stored.status.state == TaskState.TASK_STATE_COMPLETED
    cause = refused.value.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert cause.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_tool_approval_is_input_required_and_the_answer_continues_the_task(
    tmp_path: Path,
) -> None:
    """A tool that needs the person's approval: the task goes input-required with the
    tool and its arguments; "approve" on the same task runs the tool and completes it,
    anything else denies it (the tool never runs)."""
    from tests import orch_tools

    async with running_edge(tmp_path) as mesh:
        headers = {"Authorization": f"Bearer {mesh.token()}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            _card, client = await sdk_client(http, f"{mesh.url}/agents/payer")
            outcomes = []
            for answer in ("approve", "no, not today"):
                before = list(orch_tools.RAN)
                asked = [e async for e in client.send_message(user_message("refund please"))]
                task = asked[0].task
                waiting = [e for e in asked if e.HasField("status_update")][-1]
                state = waiting.status_update.status
                meta = MessageToDict(state.message.metadata)["mesh"]
                reply = user_message(answer, task.context_id)
                reply.message.task_id = task.id
                done = [e async for e in client.send_message(reply)]
                outcomes.append(
                    (state.state, meta, final_state(done), orch_tools.RAN[len(before) :], done)
                )
            await client.close()
    (asked_state, meta, approved_state, ran, done), denied = outcomes
    assert asked_state == TaskState.TASK_STATE_INPUT_REQUIRED
    assert meta["kind"] == "approval_request" and meta["tool"] == "issue_refund"
    assert meta["arguments"] == {"invoice_id": "INV-A2A"}
    assert approved_state == TaskState.TASK_STATE_COMPLETED and ran == ["INV-A2A"]
    assert "refunded INV-A2A" in "".join(answer_chunks(done))
    assert denied[0] == TaskState.TASK_STATE_INPUT_REQUIRED
    assert denied[2] == TaskState.TASK_STATE_COMPLETED and denied[3] == []  # never ran


async def test_a_message_with_an_empty_text_part_is_invalid_params(tmp_path: Path) -> None:
    """The caller's bad input is JSON-RPC -32602 (invalid params), not an internal error
    with a traceback in the edge's log (running_edge checks the log stays quiet)."""
    async with running_edge(tmp_path) as mesh:
        headers = {"Authorization": f"Bearer {mesh.token()}", "A2A-Version": "1.0"}
        message = {"messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": [{"text": ""}]}
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message}}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            reply = await http.post(f"{mesh.url}/agents/triage/", json=body)
    error = reply.json()["error"]
    assert error["code"] == -32602 and "empty" in error["message"], error
