"""Agent.Chat over a real in-process server: turns, cancel, deadline, bad input."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig
from mesh.errors import InvalidArgument, from_rpc_error
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

from .meshtest import mesh_config, offline_agent, serve_agent

LONG = " ".join(f"word{i}" for i in range(400))


def _config(delay_ms: float = 0.0, **server: object) -> MeshConfig:
    return mesh_config(
        {
            "echo": offline_agent(
                rules=[
                    {"contains": "hello", "reply": "Hello there, friend."},
                    {"contains": "long", "reply": LONG},
                ],
                delay_ms=delay_ms,
                chunk_chars=8,
            )
        },
        server=server or {},
    )


async def test_two_turns_on_one_stream() -> None:
    config = mesh_config({"echo": offline_agent(rules=[{"contains": "hello", "reply": "Hi!"}])})
    async with serve_agent(config, "echo") as (address, _server, _rt, provider):
        async with create_channel(address) as channel:
            stream = AgentClient(channel).open(timeout=30)
            first = [e async for e in stream.turn(turn_request("hello", conversation_id="c1"))]
            second = [e async for e in stream.turn(turn_request("what now?", conversation_id="c1"))]
            await stream.close()
    assert [e.WhichOneof("kind") for e in first][-1] == "final"
    assert first[-1].final.content == "Hi!"
    assert any(e.WhichOneof("kind") == "delta" for e in second)
    assert second[-1].final.content == "echo heard: what now?"
    assert all(e.agent == "echo" for e in first + second)
    seqs = [e.seq for e in first + second]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(provider.requests) == 2


async def test_client_cancel_stops_handler_and_model_stream() -> None:
    async with serve_agent(_config(delay_ms=20), "echo") as (address, server, _rt, provider):
        async with create_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=60)
            await call.write(turn_request("long please"))
            event = await call.read()
            assert isinstance(event, types_pb2.ChatEvent)
            assert event.WhichOneof("kind") == "delta"
            assert provider.opened.is_set() and not provider.closed.is_set()
            call.cancel()
        # Server side: the model stream was closed and the handler finished.
        await asyncio.wait_for(provider.closed.wait(), 10)
        assert await server.lifecycle.wait_idle(10)


async def test_cancel_request_ends_turn_and_stream_goes_on() -> None:
    async with serve_agent(_config(delay_ms=20), "echo") as (address, _server, _rt, provider):
        async with create_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=60)
            await call.write(turn_request("long please"))
            first = await call.read()
            assert isinstance(first, types_pb2.ChatEvent)
            await call.write(types_pb2.ChatRequest(cancel=types_pb2.Cancel(reason="user")))
            while True:
                event = await call.read()
                assert isinstance(event, types_pb2.ChatEvent)
                if event.WhichOneof("kind") == "final":
                    break
            assert event.final.stop_reason == types_pb2.STOP_REASON_CANCELLED
            assert provider.closed.is_set()
            await call.write(turn_request("hello"))
            while True:
                event = await call.read()
                assert isinstance(event, types_pb2.ChatEvent)
                if event.WhichOneof("kind") == "final":
                    break
            assert event.final.content == "Hello there, friend."
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK


async def test_expired_deadline_stops_model_stream() -> None:
    async with serve_agent(_config(delay_ms=50), "echo") as (address, server, _rt, provider):
        async with create_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=0.5)
            await call.write(turn_request("long please"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _event in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(provider.closed.wait(), 10)
        assert await server.lifecycle.wait_idle(10)


async def test_first_request_without_message_is_invalid_argument() -> None:
    async with serve_agent(_config(), "echo") as (address, _server, _rt, _provider):
        async with create_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Chat(timeout=10)
            await call.write(types_pb2.ChatRequest(turn=types_pb2.Turn(conversation_id="c1")))
            # Read the status before writing again (grpc/grpc#36066).
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            err = from_rpc_error(caught.value)
            assert isinstance(err, InvalidArgument)
            assert err.field == "turn.message"
            assert "turn.message" in err.message

            call = stub.Chat(timeout=10)
            await call.write(types_pb2.ChatRequest(cancel=types_pb2.Cancel()))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "first request must carry `turn`" in (caught.value.details() or "")

            # The server stays up: a good turn on the same channel works.
            result = await AgentClient(channel).chat("hello")
            assert result.text == "Hello there, friend."


async def test_oversized_message_is_resource_exhausted_and_server_stays_up() -> None:
    config = _config(max_message_bytes=2048)
    async with serve_agent(config, "echo") as (address, _server, _rt, _provider):
        async with create_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Chat(timeout=10)
            await call.write(turn_request("x" * 10_000))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            result = await AgentClient(channel).chat("hello")
            assert result.final is not None


async def test_handoff_rpc_accepts_a_peer_conversation() -> None:
    config = mesh_config(
        {
            "a": offline_agent(),
            "b": offline_agent(default_reply="b answers: {message}"),
        }
    )
    async with serve_agent(config, "b") as (address, _server, _rt, provider):
        async with create_channel(address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Handoff(timeout=10)
            await call.write(
                agent_pb2.HandoffRequest(
                    handoff=types_pb2.HandoffTurn(
                        conversation_id="c9",
                        source_agent="a",
                        mode=types_pb2.HANDOFF_MODE_CONSULT,
                        reason="needs b",
                        message="what is 2+2?",
                        history=[types_pb2.Message(role=types_pb2.Message.ROLE_USER, content="hi")],
                        context={"customer_id": "42"},
                        hop_path=["a"],
                        hops_remaining=3,
                    )
                )
            )
            events = [e async for e in call]
    assert events[-1].final.content == "b answers: what is 2+2?"
    assert list(events[-1].final.hop_path) == ["a", "b"]
    request = provider.requests[0]
    assert "a is consulting you (needs b)" in request.system
    assert [m.content for m in request.messages] == ["hi", "what is 2+2?"]


async def test_info_reports_the_agent() -> None:
    config = mesh_config(
        {
            "a": {
                **offline_agent("does a things"),
                "skills": [{"name": "things", "description": "does things"}],
                "handoffs": [{"target": "b", "modes": ["transfer", "consult"]}],
            },
            "b": offline_agent(),
        },
        max_hops=7,
    )
    async with serve_agent(config, "a") as (address, _server, _rt, _provider):
        async with create_channel(address) as channel:
            info = await AgentClient(channel).info()
    assert info.name == "a"
    assert info.description == "does a things"
    assert info.skills[0].name == "things"
    assert info.model.provider == "offline"
    assert info.handoff_targets[0].agent == "b"
    assert list(info.handoff_targets[0].modes) == [
        types_pb2.HANDOFF_MODE_TRANSFER,
        types_pb2.HANDOFF_MODE_CONSULT,
    ]
    assert info.limits.max_hops == 7
    assert info.version
