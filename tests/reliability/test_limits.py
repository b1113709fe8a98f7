"""Limits: more concurrent streams than allowed are refused, not left hanging."""

from __future__ import annotations

import grpc
import pytest

from mesh.client import create_channel
from mesh.v1 import agent_pb2_grpc, router_pb2_grpc, types_pb2
from tests.meshtest import mesh_config, offline_agent, serve_agent, serve_router

from .helpers import say

ChatCall = grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent]


async def _refused(call: ChatCall) -> grpc.StatusCode:
    """The status of a call expected to be refused, read before writing anything."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    return caught.value.code()


async def test_streams_beyond_max_concurrent_rpcs_get_resource_exhausted() -> None:
    limit = 6
    config = mesh_config(
        {"a": offline_agent()},
        router={"default_agent": "a"},
        server={"max_concurrent_rpcs": limit},
    )
    async with serve_agent(config, "a") as (address, _server, _rt, _p):
        # Straight to the agent: `limit` live streams, then every extra one is refused.
        async with create_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            held = [stub.Chat(timeout=30) for _ in range(limit)]
            for call in held:
                assert (await say(call, "hi")).WhichOneof("kind") == "final"
            extra = [stub.Chat(timeout=30) for _ in range(3)]
            for call in extra:
                assert await _refused(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                call.cancel()
        # Through the router (the agent sees one health watch and one turn at a time).
        async with serve_router(config, {"a": [address]}) as (raddr, _app):
            async with create_channel(raddr) as channel:
                stub_r = router_pb2_grpc.RouterServiceStub(channel)
                held = [stub_r.Chat(timeout=30) for _ in range(limit)]
                for call in held:
                    assert (await say(call, "hi")).WhichOneof("kind") == "final"
                extra = [stub_r.Chat(timeout=30) for _ in range(3)]
                for call in extra:
                    assert await _refused(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
                held[0].cancel()
                # A freed slot serves again.
                again = stub_r.Chat(timeout=30)
                for _ in range(50):  # bounded: the server sees the cancel asynchronously
                    code = grpc.StatusCode.OK
                    try:
                        last = await say(again, "hi")
                    except grpc.aio.AioRpcError as err:
                        code = err.code()
                    if code == grpc.StatusCode.OK:
                        assert last.WhichOneof("kind") == "final"
                        break
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    again = stub_r.Chat(timeout=30)
                else:
                    pytest.fail("the freed slot never served")
                for call in held:
                    call.cancel()


async def test_streams_beyond_max_concurrent_streams_get_resource_exhausted() -> None:
    limit = 4
    config = mesh_config({"a": offline_agent()}, server={"max_concurrent_streams": limit})
    async with serve_agent(config, "a") as (address, _server, _rt, _p):
        async with create_channel(address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            held = [stub.Chat(timeout=30) for _ in range(limit)]
            for call in held:
                assert (await say(call, "hi")).WhichOneof("kind") == "final"
            extra = stub.Chat(timeout=2)
            try:
                assert await _refused(extra) == grpc.StatusCode.RESOURCE_EXHAUSTED
            finally:
                for call in held:
                    call.cancel()
