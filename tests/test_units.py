"""Unit tests: config overrides, tool schemas, the offline model, the error table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from mesh.config import load_config
from mesh.errors import (
    AgentNotFound,
    ConfigError,
    HopBudgetExceeded,
    InvalidArgument,
    RemoteError,
    from_status,
)
from mesh.providers.base import (
    ChatMessage,
    ModelRequest,
    ProviderContext,
    Stop,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
)
from mesh.providers.offline import OfflineOptions, OfflineProvider, chunk_text
from mesh.tools import FunctionTool

from .meshtest import offline_agent, write_config


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"agents": {"a": {**offline_agent(), "port": 5000}}})
    monkeypatch.setenv("MESH_AGENTS__A__PORT", "6000")
    monkeypatch.setenv("MESH_SERVER__GRACE_PERIOD_S", "3.5")
    config = load_config(path)
    assert config.agents["a"].port == 6000
    assert config.agents["a"].description == "test agent"
    assert config.server.grace_period_s == 3.5


def test_bad_provider_option_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"agents": {"a": offline_agent(chunk_chars=0)}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "agents.a.provider" in str(caught.value) and "chunk_chars" in str(caught.value)


def test_unknown_provider_kind(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"agents": {"a": {"description": "x", "provider": {"kind": "gpt9"}}}}
    )
    with pytest.raises(ConfigError, match="unknown provider kind 'gpt9'"):
        load_config(path)


async def _weather(city: str, days: int = 1) -> str:
    """Get the weather forecast.

    Args:
        city: The city to look up.
        days: How many days ahead.
    """
    return f"{city}: sunny for {days} days"


def _broken(x: int) -> int:
    """Always fails."""
    raise RuntimeError("boom")


async def test_function_tool_schema_and_errors() -> None:
    tool = FunctionTool(_weather)
    assert tool.name == "_weather"
    assert tool.description == "Get the weather forecast."
    assert tool.parameters["properties"]["city"] == {
        "type": "string",
        "description": "The city to look up.",
    }
    assert tool.parameters["required"] == ["city"]
    assert (await tool.run({"city": "Oslo"}, timeout=5)).content == "Oslo: sunny for 1 days"
    bad = await tool.run({"city": 3}, timeout=5)
    assert bad.is_error and "city" in bad.content
    extra = await tool.run({"city": "x", "zzz": 1}, timeout=5)
    assert extra.is_error
    failed = await FunctionTool(_broken).run({"x": 1}, timeout=5)
    assert failed.is_error and "RuntimeError: boom" in failed.content


async def test_slow_tool_times_out_as_a_result() -> None:
    async def slow() -> str:
        """Never returns in time."""
        await asyncio.Event().wait()
        return ""

    outcome = await FunctionTool(slow).run({}, timeout=0.05)
    assert outcome.is_error and "timed out" in outcome.content


async def test_offline_model_follows_rules() -> None:
    options = OfflineOptions.model_validate(
        {
            "rules": [
                {"contains": "weather", "tool": "get_weather", "arguments": {"city": "Paris"}},
                {"contains": "bill", "handoff": "billing"},
                {"contains": "plan", "consult": ["a", "b"]},
            ],
            "chunk_chars": 5,
        }
    )
    model = OfflineProvider("m", options, ProviderContext(agent="t"))
    tools = (
        ToolSpec("get_weather", "", {}),
        ToolSpec("transfer_to_billing", "", {}),
        ToolSpec("ask_a", "", {}),
        ToolSpec("ask_b", "", {}),
    )

    async def run(*messages: ChatMessage) -> list[object]:
        request = ModelRequest(system="", messages=messages, tools=tools, agent="t")
        return [e async for e in model.stream(request)]

    events = await run(ChatMessage("user", "weather today?"))
    calls = [e.call for e in events if isinstance(e, ToolCall)]
    assert calls[0].name == "get_weather" and calls[0].arguments == {"city": "Paris"}
    assert isinstance(events[-1], Stop) and events[-1].reason == "tool_use"
    events = await run(ChatMessage("user", "my bill"))
    assert [e.call.name for e in events if isinstance(e, ToolCall)] == ["transfer_to_billing"]
    events = await run(ChatMessage("user", "a plan"))
    assert [e.call.name for e in events if isinstance(e, ToolCall)] == ["ask_a", "ask_b"]
    events = await run(
        ChatMessage("user", "weather"),
        ChatMessage("tool", "sunny", tool_call_id="c", name="get_weather"),
    )
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "t found: get_weather: sunny"
    assert chunk_text("abc defgh ij", 5) == ["abc ", "defgh", " ij"]


def test_error_table_round_trip() -> None:
    for err in (
        InvalidArgument("bad", field="turn.message"),
        HopBudgetExceeded("path a>b>a"),
        AgentNotFound("no such agent"),
    ):
        back = from_status(err.code, err.message, list(err.trailing_metadata()))
        assert type(back) is type(err)
        assert back.field == err.field
    unknown = from_status(grpc.StatusCode.DATA_LOSS, "lost")
    assert isinstance(unknown, RemoteError) and unknown.status_code == grpc.StatusCode.DATA_LOSS


def test_history_round_trips_and_the_wire_form_is_made_once() -> None:
    """A history goes router -> agent on every turn: each message's protobuf form is made
    once and kept on the (immutable) message; the agent's conversion gives the same
    messages back, tool calls included, and skips a message with no role."""
    from mesh.convert import history_from_pb, message_to_pb
    from mesh.v1 import types_pb2

    call = ToolCallRequest("call_1", "lookup", {"city": "Oslo", "days": 2})
    history = [
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "", tool_calls=(call,), agent="a"),
        ChatMessage("tool", "sunny", tool_call_id="call_1", name="lookup"),
        ChatMessage("assistant", "It is sunny.", agent="a"),
    ]
    first = [message_to_pb(m) for m in history]
    assert [message_to_pb(m) for m in history] == first
    assert all(message_to_pb(m) is pb for m, pb in zip(history, first, strict=True))
    turn = types_pb2.Turn(history=[*first, types_pb2.Message(content="no role")])
    wire = types_pb2.Turn.FromString(turn.SerializeToString())
    assert history_from_pb(wire.history) == tuple(history)
    # The kept wire form is no part of a message's value, and a copy starts without it.
    same = ChatMessage("user", "weather?")
    assert same == history[0] and hash(same) == hash(history[0]) and same.wire is None
    assert "wire" not in repr(history[0])


def test_a_started_server_process_leaves_its_start_up_heap_out_of_collections() -> None:
    """``settle_heap`` (run by ``mesh agent`` / ``mesh router`` once serving) freezes what
    start-up made, so a full collection walks only what came later."""
    import subprocess
    import sys

    code = (
        "import gc, mesh.router, mesh.agent\n"
        "from mesh.cli._serve import settle_heap\n"
        "before = len(gc.get_objects())\n"
        "settle_heap()\n"
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    before, frozen, tracked = map(int, out.stdout.split())
    assert frozen > before // 2 and tracked < before // 10
