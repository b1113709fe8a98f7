"""Tools that misbehave never take their agent down: a real ``mesh agent`` process."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mesh.client import AgentClient, create_channel
from mesh.v1 import types_pb2

from .meshtest import Proc, offline_agent, write_config

TOOLS = textwrap.dedent(
    '''
    import sys
    import time


    def quit_now() -> str:
        """Exits like an argparse CLI does."""
        sys.exit(2)


    async def interrupt() -> str:
        """Raises KeyboardInterrupt from an async tool."""
        raise KeyboardInterrupt


    def hang(seconds: int) -> str:
        """Blocks its thread."""
        time.sleep(seconds)
        return "woke"


    def ping() -> str:
        """Answers at once."""
        return "pong"
    '''
)


def _config(tmp_path: Path) -> Path:
    (tmp_path / "flaky_tools.py").write_text(TOOLS)
    agent = offline_agent(
        rules=[
            {"contains": "exit", "tool": "quit_now"},
            {"contains": "interrupt", "tool": "interrupt"},
            {"contains": "hang", "tool": "hang", "arguments": {"seconds": 3600}},
            {"contains": "ping", "tool": "ping"},
        ],
        after_tools="after: {results}",
    )
    agent["tools"] = [f"flaky_tools:{n}" for n in ("quit_now", "interrupt", "hang", "ping")]
    agent["limits"] = {"tool_workers": 2, "tool_timeouts_s": {"hang": 0.2}}
    return write_config(
        tmp_path, {"agents": {"tooly": agent}, "auth": {"enabled": False}}, "mesh.yaml"
    )


def _results(events: list[types_pb2.ChatEvent]) -> list[types_pb2.ToolResult]:
    return [e.tool_result for e in events if e.WhichOneof("kind") == "tool_result"]


async def test_exiting_and_hanging_tools_leave_the_agent_up(tmp_path: Path) -> None:
    config = _config(tmp_path)
    proc = Proc(["agent", "tooly", "--config", str(config), "--port", "0"])
    address = proc.wait_line("agent tooly: ")
    try:
        async with create_channel(address) as channel:
            client = AgentClient(channel)
            exited = _results((await client.chat("please exit", timeout=30)).events)
            assert [r.name for r in exited] == ["quit_now"]
            assert exited[0].is_error and "SystemExit: 2" in exited[0].content
            interrupted = _results((await client.chat("interrupt me", timeout=30)).events)
            assert interrupted[0].is_error and "KeyboardInterrupt" in interrupted[0].content
            assert proc.popen.poll() is None

            # Two hung sync tools hold both workers (they time out but run on) ...
            for _ in range(2):
                hung = _results((await client.chat("hang", timeout=30)).events)
                assert hung[0].is_error and "timed out after 0.2s" in hung[0].content
                assert "cannot be interrupted" in hung[0].content
            # ... so the next sync tool is refused at once with a clear error, not a hang,
            pinged = _results((await client.chat("ping", timeout=30)).events)
            assert pinged[0].is_error
            assert "all 2 tool workers of tooly are held" in pinged[0].content
            # while the agent still answers.
            info = await client.info()
            assert info.name == "tooly"
            final = (await client.chat("hello there", timeout=30)).final
            assert final is not None
    finally:
        # A hung daemon thread never keeps the agent from draining and exiting.
        assert proc.stop(timeout=30) == 0
