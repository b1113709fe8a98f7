"""The claude_cli provider against a stand-in ``claude`` executable on PATH.

The stand-in (``fake_claude.py``) honours the same flags and writes the same
``stream-json`` lines as the real CLI in headless mode, keeps sessions for
``--resume`` and logs every invocation, so these tests see exactly what the
provider ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError, ProviderAuthError, ProviderUnavailable
from mesh.providers.base import ChatMessage, ModelRequest, Provider, ProviderContext
from mesh.providers.registry import create_provider

from .helpers import (
    TRANSFER_BILLING,
    WEATHER,
    ask,
    calls_of,
    collect,
    deltas,
    start_and_cancel,
    stop_of,
    text_of,
    usage_of,
    with_tool_result,
)

FAKE = Path(__file__).with_name("fake_claude.py")


@dataclass
class Cli:
    state: Path
    env: dict[str, str]

    def provider(self, **options: Any) -> Provider:
        opts: dict[str, Any] = {"timeout_s": 20, "kill_grace_s": 1.0}
        opts.update(options)
        return create_provider(
            "claude_cli", "sonnet", opts, ProviderContext(agent="helper", environ=self.env)
        )

    def calls(self) -> list[dict[str, Any]]:
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    async def hang_pid(self) -> int:
        path = self.state / "hang.pid"
        for _ in range(200):
            if path.exists() and path.read_text():
                return int(path.read_text())
            await asyncio.sleep(0.01)
        raise AssertionError("the stand-in never started hanging")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "claude"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import runpy, sys\n"
        "sys.argv[0] = 'claude'\n"
        f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    state = tmp_path / "state"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_CLAUDE_STATE": str(state),
        "HOME": str(tmp_path),
    }
    return Cli(state, env)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def arg_after(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


async def test_plain_answer_streams_deltas(cli: Cli) -> None:
    p = cli.provider()
    events = await collect(p.stream(ask("hello there", conversation="c1")))
    assert text_of(events) == "Turn 1: you said hello there"
    assert len(deltas(events)) > 1  # token deltas from --include-partial-messages
    assert stop_of(events) == "end_turn"
    assert usage_of(events).input_tokens == 115
    [call] = cli.calls()
    argv = call["argv"]
    assert argv[:5] == [
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
    ]
    assert arg_after(argv, "--model") == "sonnet"
    assert arg_after(argv, "--append-system-prompt") == "You are a helpful agent."
    assert "--resume" not in argv
    assert call["stdin"] is True
    assert call["prompt"] == "hello there"
    assert "hello there" not in argv


async def test_whole_messages_without_partial_streaming(cli: Cli) -> None:
    p = cli.provider(partial_messages=False, input="arg")
    events = await collect(p.stream(ask("hello")))
    assert text_of(events) == "Turn 1: you said hello"  # not doubled
    [call] = cli.calls()
    assert "--include-partial-messages" not in call["argv"]
    assert call["stdin"] is False
    assert call["argv"][-1] == "hello"


async def test_session_resumes_per_conversation(cli: Cli) -> None:
    p = cli.provider()
    first = ask("one", conversation="conv-A")
    events = await collect(p.stream(first))
    reply = text_of(events)
    second = ModelRequest(
        system=first.system,
        messages=[
            *first.messages,
            ChatMessage(role="assistant", content=reply),
            ChatMessage(role="user", content="two"),
        ],
        conversation_id="conv-A",
    )
    events = await collect(p.stream(second))
    assert text_of(events) == "Turn 2: you said two"
    await collect(p.stream(ask("other", conversation="conv-B")))

    calls = cli.calls()
    session = json.loads((cli.state / "sessions").iterdir().__next__().read_text())
    assert session  # the stand-in kept the session
    assert arg_after(calls[1]["argv"], "--resume") is not None
    assert calls[1]["prompt"] == "two"  # only the new message, not the transcript
    assert "--resume" not in calls[2]["argv"]  # another conversation, another session


async def test_lost_session_falls_back_to_the_transcript(cli: Cli) -> None:
    p = cli.provider()
    first = ask("one", conversation="conv-L")
    reply = text_of(await collect(p.stream(first)))
    for path in (cli.state / "sessions").iterdir():
        path.unlink()  # e.g. another machine, or the CLI's store was cleaned
    second = ModelRequest(
        system=first.system,
        messages=[
            *first.messages,
            ChatMessage(role="assistant", content=reply),
            ChatMessage(role="user", content="two"),
        ],
        conversation_id="conv-L",
    )
    events = await collect(p.stream(second))
    assert text_of(events).startswith("Turn 1:")  # a fresh session
    calls = cli.calls()
    assert "--resume" in calls[1]["argv"]
    assert "--resume" not in calls[2]["argv"]
    assert "<assistant>" in calls[2]["prompt"]  # the whole conversation was sent


async def test_tool_call_then_result_goes_back_resumed(cli: Cli) -> None:
    p = cli.provider()
    first = ask("weather in Paris?", tools=[WEATHER], conversation="conv-T")
    events = await collect(p.stream(first))
    [call] = calls_of(events)
    assert (call.name, dict(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert stop_of(events) == "tool_use"
    assert "<tool_call>" not in text_of(events)

    events = await collect(p.stream(with_tool_result(first, call, "18°C")))
    assert text_of(events) == "The tool said: 18°C"
    calls = cli.calls()
    assert "get_weather" in (arg_after(calls[0]["argv"], "--append-system-prompt") or "")
    assert arg_after(calls[1]["argv"], "--resume") is not None
    assert calls[1]["prompt"].startswith("<tool_response>")
    assert json.loads(calls[1]["prompt"].split("\n")[1])["content"] == "18°C"


async def test_handoff_tool_call(cli: Cli) -> None:
    p = cli.provider()
    events = await collect(p.stream(ask("I want a refund", tools=[TRANSFER_BILLING])))
    [call] = calls_of(events)
    assert (call.name, dict(call.arguments)) == ("transfer_to_billing", {"reason": "refund"})
    assert text_of(events).strip() == "Let me transfer you."
    assert stop_of(events) == "tool_use"


async def test_auth_failure(cli: Cli) -> None:
    with pytest.raises(ProviderAuthError, match="login"):
        await collect(cli.provider().stream(ask("badkey")))


async def test_cancel_kills_the_cli(cli: Cli) -> None:
    p = cli.provider()
    seen = await start_and_cancel(p, ask("hang please"))
    assert text_of(seen) == "Thinking..."
    pid = await cli.hang_pid()
    assert not alive(pid)  # terminated and reaped before the cancel completed


async def test_aclose_kills_a_cli_that_ignores_sigterm(cli: Cli) -> None:
    p = cli.provider(kill_grace_s=0.2)
    events = p.stream(ask("hang stubborn"))
    assert text_of([await anext(events)]) == "Thinking..."
    pid = await cli.hang_pid()
    await events.aclose()  # type: ignore[attr-defined]
    assert not alive(pid)


async def test_timeout_kills_the_cli(cli: Cli) -> None:
    p = cli.provider(timeout_s=0.5, partial_messages=False)
    with pytest.raises(ProviderUnavailable, match="within"):
        await collect(p.stream(ask("hang")))
    assert not alive(await cli.hang_pid())


def test_missing_executable_fails_at_start(cli: Cli) -> None:
    with pytest.raises(ConfigError, match="no-such-claude"):
        cli.provider(executable="no-such-claude")
