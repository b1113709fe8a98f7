"""Agents using tools from real MCP servers (stdio, SSE, streamable HTTP), through the
router, as the client sees it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.agent._runtime import AgentRuntime
from mesh.client import AgentClient, create_channel, turn_request
from mesh.config import MeshConfig, config_from_dict
from mesh.mcp import McpTool, McpToolset, close_toolset, toolset_of
from mesh.v1 import types_pb2
from tests.mcp.servers import EVENTS_ENV, Events, bound_socket, notes_server, serve_http
from tests.meshtest import REPO, serve_agent, serve_router


def stdio(kind: str = "notes", events: str = "", **extra: Any) -> dict[str, Any]:
    env = {EVENTS_ENV: events} if events else {}
    return {
        "name": kind,
        "stdio": {
            "command": sys.executable,
            "args": ["-m", "tests.mcp.servers", kind],
            "cwd": str(REPO),
            "env": env,
        },
        **extra,
    }


def agent_with(servers: list[dict[str, Any]], rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "description": "uses MCP tools",
        "mcp_servers": servers,
        "provider": {"kind": "offline", "rules": rules, "after_tools": "{results}"},
    }


def config_for(agent: dict[str, Any], **extra: Any) -> MeshConfig:
    return config_from_dict(
        {
            "router": {"default_agent": "helper", "store": {"kind": "memory"}},
            "agents": {"helper": agent},
            **extra,
        },
        source=str(Path(__file__)),
    )


@contextlib.asynccontextmanager
async def mesh_with(config: MeshConfig) -> AsyncIterator[tuple[AgentClient, AgentRuntime, str]]:
    """The agent (MCP sessions started and tried once) behind a router; a router client."""
    async with serve_agent(config, "helper") as (addr, _server, runtime, _rec):
        toolset = toolset_of(runtime)
        assert isinstance(toolset, McpToolset)
        try:
            await toolset.wait_started()
            async with serve_router(config, {"helper": [addr]}) as (router, _app):
                async with create_channel(router) as channel:
                    yield AgentClient(channel, router=True), runtime, addr
        finally:
            await close_toolset(runtime)


def kinds(events: list[types_pb2.ChatEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


def tool_events(events: list[types_pb2.ChatEvent]) -> tuple[Any, Any]:
    call = next(e.tool_call for e in events if e.WhichOneof("kind") == "tool_call")
    result = next(e.tool_result for e in events if e.WhichOneof("kind") == "tool_result")
    return call, result


LOOKUP_RULE = {"contains": "note", "tool": "lookup", "arguments": {"key": "k1"}}


async def test_stdio_tool_call_reaches_the_client_through_the_router() -> None:
    config = config_for(agent_with([stdio()], [LOOKUP_RULE]))
    async with mesh_with(config) as (client, runtime, _addr):
        assert {"lookup", "pid", "slow", "whoami", "grow"} <= set(runtime.tools)
        spec = runtime.tools["lookup"].spec
        assert spec.parameters["properties"]["key"]["type"] == "string"  # from inputSchema
        result = await client.chat("read my note")
    call, tool_result = tool_events(result.events)
    assert call.name == "lookup"
    assert not tool_result.is_error
    assert "note k1: remember the milk" in tool_result.content
    assert result.final is not None and "remember the milk" in result.final.final.content


@pytest.mark.parametrize("kind", ["streamable_http", "sse"])
async def test_http_tool_call_reaches_the_client(kind: str) -> None:
    async with serve_http(notes_server("web"), kind) as url:  # type: ignore[arg-type]
        server = {"name": "web", kind: {"url": url}}
        config = config_for(agent_with([server], [LOOKUP_RULE]))
        async with mesh_with(config) as (client, _runtime, _addr):
            result = await client.chat("read my note")
    call, tool_result = tool_events(result.events)
    assert call.name == "lookup"
    assert not tool_result.is_error, tool_result.content
    assert "note k1: remember the milk" in tool_result.content


async def test_without_cache_tools_the_list_is_refreshed_after_a_call() -> None:
    rules = [{"contains": "grow", "tool": "grow"}, {"contains": "fresh", "tool": "fresh"}]
    config = config_for(agent_with([stdio(cache_tools=False)], rules))
    async with mesh_with(config) as (client, runtime, _addr):
        assert "fresh" not in runtime.tools
        await client.chat("grow a tool")
        assert "fresh" in runtime.tools
        result = await client.chat("call fresh")
    _call, tool_result = tool_events(result.events)
    assert tool_result.content == "fresh answer" and not tool_result.is_error


async def test_names_that_clash_are_prefixed_and_the_allow_list_holds() -> None:
    servers = [stdio("notes", tools=["lookup", "pid"]), stdio("notes2", tools=["lookup"])]
    servers[1]["stdio"]["args"] = ["-m", "tests.mcp.servers", "notes2"]
    config = config_for(agent_with(servers, [LOOKUP_RULE]))
    async with mesh_with(config) as (_client, runtime, _addr):
        names = set(runtime.tools)
    assert {"notes_lookup", "notes2_lookup", "pid"} == names


async def test_malformed_schema_and_oversized_result_are_clear_tool_errors(
    tmp_path: Path,
) -> None:
    rules: list[dict[str, Any]] = [
        {"contains": "broken", "tool": "broken", "arguments": {"x": 1}},
        {"contains": "huge", "tool": "huge"},
    ]
    async with Events(str(tmp_path / "ev")) as events:
        config = config_for(agent_with([stdio("bad", str(tmp_path / "ev"))], rules))
        async with mesh_with(config) as (client, runtime, addr):
            broken = await client.chat("call broken")
            huge = await client.chat("call huge")
            await events.expect("called huge")  # the server did answer, in full
            async with create_channel(addr) as channel:
                stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack Check/Watch
                health = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert "unusable" in runtime.tools["broken"].description
    _call, result = tool_events(broken.events)
    assert result.is_error
    assert "inputSchema is not a valid JSON schema" in result.content
    _call, result = tool_events(huge.events)
    assert result.is_error and "limit" in result.content and len(result.content) < 300
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # the agent is fine


@pytest.mark.parametrize("kind", ["stdio", "streamable_http"])
async def test_cancel_during_a_slow_tool_cancels_it_on_the_server(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = [{"contains": "slow", "tool": "slow", "arguments": {"seconds": 600}}]
    async with contextlib.AsyncExitStack() as stack:
        events = await stack.enter_async_context(Events(str(tmp_path / "ev")))
        if kind == "stdio":  # notifications/cancelled
            server = stdio("notes", str(tmp_path / "ev"))
        else:  # the request's stream is closed (the 2026-07-28 HTTP cancel signal)
            monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "ev"))
            url = await stack.enter_async_context(serve_http(notes_server(), "streamable_http"))
            server = {"name": "notes", "streamable_http": {"url": url}}
        config = config_for(agent_with([server], rules))
        async with mesh_with(config) as (client, _runtime, _addr):
            stream = client.open(timeout=60)
            await stream.send(turn_request("be slow"))
            seen: list[str] = []
            while "tool_call" not in seen:
                event = await stream.call.read()
                assert isinstance(event, types_pb2.ChatEvent)
                seen.append(str(event.WhichOneof("kind")))
            await events.expect("started slow")
            await stream.send(types_pb2.ChatRequest(cancel=types_pb2.Cancel()))
            assert await events.expect("cancelled slow")  # the handler stopped
            rest: list[str] = []
            while True:
                event = await stream.call.read()
                if event is grpc.aio.EOF:
                    break
                assert isinstance(event, types_pb2.ChatEvent)
                rest.append(str(event.WhichOneof("kind")))
                if rest[-1] in ("final", "error"):
                    break
            await stream.close()
            stream.cancel()
    assert rest[-1] == "final"


async def test_killed_stdio_server_errors_then_restarts(tmp_path: Path) -> None:
    rules = [{"contains": "pid", "tool": "pid"}]
    server = stdio("notes", str(tmp_path / "ev"), restart_backoff_s=2.0)
    async with Events(str(tmp_path / "ev")) as events:
        config = config_for(agent_with([server], rules))
        async with mesh_with(config) as (client, runtime, _addr):
            first_pid = int((await events.expect("started")).split()[1])
            result = await client.chat("pid please", conversation_id="c-kill")
            _call, ok = tool_events(result.events)
            assert ok.content == str(first_pid) and not ok.is_error
            os.kill(first_pid, signal.SIGKILL)
            result = await client.chat("pid please", conversation_id="c-kill")
            _call, failed = tool_events(result.events)
            assert failed.is_error, failed.content
            assert "notes" in failed.content
            second_pid = int((await events.expect("started")).split()[1])
            assert second_pid != first_pid
            result = await client.chat("pid please", conversation_id="c-kill")
            _call, again = tool_events(result.events)
            assert not again.is_error, again.content
            assert again.content == str(second_pid)
            toolset = toolset_of(runtime)
            assert toolset is not None and toolset.servers[0].connects == 2


async def test_required_server_down_turns_health_not_serving(tmp_path: Path) -> None:
    server = {
        "name": "gone",
        "required": True,
        "connect_timeout_s": 5,
        "stdio": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]},
    }
    optional = {**server, "name": "gone2", "required": False}
    for spec, want in (
        (optional, health_pb2.HealthCheckResponse.SERVING),
        (server, health_pb2.HealthCheckResponse.NOT_SERVING),
    ):
        config = config_for(agent_with([spec], []))
        async with serve_agent(config, "helper") as (addr, _server, runtime, _rec):
            toolset = toolset_of(runtime)
            assert toolset is not None
            try:
                await toolset.wait_started()
                async with create_channel(addr) as channel:
                    stub: Any = health_pb2_grpc.HealthStub(channel)
                    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                    async for reply in watch:
                        if reply.status == want:
                            break
                    watch.cancel()
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert reply.status == want
            finally:
                await close_toolset(runtime)


_BAD_LISTING = str(Path(__file__).with_name("bad_listing.py"))


@pytest.mark.parametrize(
    ("stdio", "why"),
    [
        # A command that does not exist: which one, not a bare "No such file or directory".
        ({"command": "no-such-mcp-server-xyz"}, "no command 'no-such-mcp-server-xyz'"),
        # A tools/list answer the MCP SDK refuses (the server is down and retried):
        # where the answer breaks the schema.
        (
            {"command": sys.executable, "args": [_BAD_LISTING]},
            "does not follow the MCP schema at tools.0.inputSchema.properties",
        ),
    ],
)
async def test_a_server_that_cannot_serve_says_why(stdio: dict[str, Any], why: str) -> None:
    config = config_for(agent_with([{"name": "broken", "stdio": stdio}], []))
    async with serve_agent(config, "helper") as (_addr, _server, runtime, _rec):
        toolset = toolset_of(runtime)
        assert toolset is not None
        try:
            await toolset.wait_started()
            [server] = toolset.servers
            assert why in server.last_error
        finally:
            await close_toolset(runtime)


async def test_a_listing_with_malformed_tools_keeps_the_good_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One good tool beside two the MCP schema refuses (``properties`` not an object, no
    name): the good one is published and called, each bad one is one WARNING line."""
    stdio = {"command": sys.executable, "args": [_BAD_LISTING, "mixed"]}
    server = {"name": "mixed", "stdio": stdio, "cache_tools": False}  # re-listed per call
    rules = [{"contains": "echo", "tool": "echo", "arguments": {"text": "hi"}}]
    config = config_for(agent_with([server], rules))
    with caplog.at_level(logging.DEBUG, logger="mesh.mcp"):
        async with mesh_with(config) as (client, runtime, _addr):
            toolset = toolset_of(runtime)
            assert toolset is not None and toolset.servers[0].state == "ready"
            assert {"echo"} == {n for n, t in runtime.tools.items() if isinstance(t, McpTool)}
            result = await client.chat("echo please")
            again = await client.chat("echo again")
    for turn in (result, again):
        call, tool_result = tool_events(turn.events)
        assert call.name == "echo"
        assert not tool_result.is_error, tool_result.content
        assert tool_result.content == 'echo got {"text": "hi"}'  # what the server received
    loud = [r for r in caplog.records if r.name == "mesh.mcp" and r.levelno >= logging.WARNING]
    assert sorted(r.getMessage() for r in loud) == [
        "MCP server mixed: tool #3 (no name) skipped: its entry breaks the MCP schema at "
        "name: Field required",
        "MCP server mixed: tool 'broken' skipped: its entry breaks the MCP schema at "
        "inputSchema.properties: Input should be a valid dictionary",
    ]  # once each, though every call re-listed the tools
    assert all(r.exc_info is None for r in caplog.records)


def _claims(content: str) -> dict[str, Any]:
    return dict(json.loads(content))


async def test_default_mesh_researcher_uses_the_shipped_glossary_server() -> None:
    from mesh.config import load_config
    from tests.meshtest import MESH_YAML

    config = load_config(MESH_YAML).model_copy(
        update={"auth": load_config(MESH_YAML).auth.model_copy(update={"enabled": False})}
    )
    async with serve_agent(config, "researcher") as (addr, _server, runtime, _rec):
        toolset = toolset_of(runtime)
        assert toolset is not None
        try:
            await toolset.wait_started()
            assert {"define", "search_notes"} <= set(runtime.tools)
            async with serve_router(config, {"researcher": [addr]}) as (router, _app):
                async with create_channel(router) as channel:
                    result = await AgentClient(channel, router=True).chat("define hop budget")
        finally:
            await close_toolset(runtime)
    call, tool_result = tool_events(result.events)
    assert call.name == "define" and not tool_result.is_error
    assert tool_result.content.startswith("hop budget: The most handoffs")
    assert result.final is not None and result.final.agent == "researcher"


async def test_a_call_past_its_timeout_is_a_tool_error_and_cancelled_on_the_server(
    tmp_path: Path,
) -> None:
    rules = [{"contains": "slow", "tool": "slow", "arguments": {"seconds": 600}}]
    async with Events(str(tmp_path / "ev")) as events:
        server = stdio("notes", str(tmp_path / "ev"), call_timeout_s=0.5)
        config = config_for(agent_with([server], rules))
        async with mesh_with(config) as (client, _runtime, _addr):
            result = await client.chat("be slow")
            assert await events.expect("cancelled slow")
    _call, tool_result = tool_events(result.events)
    assert tool_result.is_error and "timed out after 0.5s" in tool_result.content


async def test_streamable_http_server_down_then_back() -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    server = {
        "name": "web",
        "streamable_http": {"url": f"http://127.0.0.1:{port}/mcp"},
        "restart_backoff_s": 0.2,
    }
    config = config_for(agent_with([server], [LOOKUP_RULE]))
    async with contextlib.AsyncExitStack() as mcp_server:
        await mcp_server.enter_async_context(
            serve_http(notes_server("web"), "streamable_http", sock)
        )
        async with mesh_with(config) as (client, runtime, _addr):
            ok = await client.chat("read my note")
            await mcp_server.aclose()  # the MCP server goes away; the agent stays
            down = await client.chat("read my note")
            again = bound_socket(port)  # the same server, back on its address
            async with serve_http(notes_server("web"), "streamable_http", again):
                toolset = toolset_of(runtime)
                assert toolset is not None
                await toolset.servers[0].wait_ready(30)
                back = await client.chat("read my note")
    assert not tool_events(ok.events)[1].is_error
    _call, failed = tool_events(down.events)
    assert failed.is_error and "web" in failed.content
    _call, result = tool_events(back.events)
    assert not result.is_error, result.content
    assert "remember the milk" in result.content
