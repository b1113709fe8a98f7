"""``mesh chat``: the interactive chat through a real pseudo-terminal, ``-`` from stdin,
``--context``, and a clean end of every call (audited OK, never CANCELLED)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .meshtest import (
    MESH_YAML,
    QUICK_DRAIN,
    Proc,
    chat_terminal,
    offline_agent,
    start_mesh,
    write_config,
)


def _mesh_file(tmp_path: Path) -> Path:
    triage = offline_agent(
        rules=[{"contains": "hello", "reply": "Hello from triage."}],
        default_reply="triage heard {message} (message {turns})",
    )
    helper = offline_agent(default_reply="helper here: {message}")
    billing = offline_agent(default_reply="billing here: {message}")
    slow = offline_agent(default_reply="slow " * 400, chunk_chars=5, delay_ms=50)
    return write_config(
        tmp_path,
        {
            "agents": {"triage": triage, "helper": helper, "billing": billing, "slow": slow},
            "router": {
                "default_agent": "triage",
                "routes": [{"context": {"department": "finance"}, "agent": "billing"}],
            },
            "auth": {"enabled": False},
        },
    )


def test_interactive_chat_through_a_terminal(tmp_path: Path) -> None:
    config = _mesh_file(tmp_path)
    mesh, router, env = start_mesh(config, tmp_path / "data", QUICK_DRAIN)
    try:
        with chat_terminal(config, router, env) as term:
            term.expect(r"you> ")
            # Two turns of one conversation: the second sees the first.
            term.send("hello\n")
            term.expect(r"\[triage\] Hello from triage\.")
            term.expect(r"you> ")
            term.send("what now\n")
            term.expect(r"\[triage\] triage heard what now \(message 2\)")
            term.expect(r"you> ")
            # Switch agent.
            term.send("/agent helper\n")
            term.expect(r"talking to helper")
            term.send("are you there\n")
            term.expect(r"\[helper\] helper here: are you there")
            # A context key that a CONDITIONAL route picks billing on.
            term.send("/agent -\n/new\n/context department=finance\n")
            term.expect(r"context: department=finance")
            term.send("my money\n")
            term.expect(r"\[billing\] billing here: my money")
            term.send("/history\n")
            term.expect(r"you: my money\nbilling: billing here: my money")
            # Ctrl-C while an answer streams cancels that turn, not the chat.
            term.send("/context department=\n/agent slow\ngo\n")
            term.expect(r"\[slow\] slow slow")
            term.send("\x03")
            term.expect(r"-- slow cancelled")
            term.expect(r"you> ")
            term.send("/agent helper\nstill here\n")
            term.expect(r"\[helper\] helper here: still here")
            term.send("/quit\n")
            assert term.wait() == 0
    finally:
        assert mesh.stop() == 0
    assert "Traceback" not in "".join(mesh.stderr)


def test_message_from_stdin_with_context(tmp_path: Path) -> None:
    config = _mesh_file(tmp_path)
    mesh, router, env = start_mesh(config, tmp_path / "data", QUICK_DRAIN)
    try:
        long_message = "figures " * 40_000  # longer than a command line may be
        chat = subprocess.run(
            [
                *(sys.executable, "-m", "mesh", "chat", "--config", str(config)),
                *("--router", router, "--context", "department=finance", "-"),
            ],
            input=long_message,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
            check=False,
        )
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith("[billing] billing here: figures figures")
    finally:
        mesh.stop()


def test_a_successful_chat_is_audited_ok_and_logs_no_warning(tmp_path: Path) -> None:
    """The demo conversations through the shipped mesh with auth on (a greeting, two
    TRANSFERs with tools, a parallel CONSULT, a sequence, a CONDITIONAL route by
    context, an MCP tool, a goodbye), each in a conversation of its own: every call
    ends OK at every hop and no process logs anything at WARNING or above."""
    mesh, router, env = start_mesh(MESH_YAML, tmp_path / "data")
    demos = [
        (["hello"], "[triage] Hello!"),
        (["show my invoice"], "[billing]"),
        (["where is my order?"], "[orders]"),
        (["give me a plan"], "[triage]"),
        (["brief me on grpc"], "[writer]"),
        (["--context", "department=finance", "what do I owe?"], "[billing]"),
        (["define hop budget"], "[researcher]"),
        (["bye"], "[triage]"),
    ]
    try:
        for n, (args, expected) in enumerate(demos):
            base = ["chat", "--config", str(MESH_YAML), "--router", router]
            chat = Proc([*base, "--conversation", f"demo-{n}", *args], env)
            assert chat.popen.wait(timeout=60) == 0, "".join(chat.stderr)
            chat.lines.get(timeout=10)
            assert expected in "".join(chat.stdout), (args, chat.stdout)
    finally:
        assert mesh.stop() == 0
    logs = "".join(mesh.stderr)
    audited = [line for line in logs.splitlines() if "mesh.v1.RouterService/Chat" in line]
    assert audited and all('"status":"OK"' in line for line in audited), audited
    loud = [line for line in logs.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not loud, loud
    assert "Task was destroyed" not in logs and "Traceback" not in logs
