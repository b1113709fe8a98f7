"""``mesh chat``: the interactive chat through a real pseudo-terminal, ``-`` from stdin,
``--context``, and a clean end of every call (audited OK, never CANCELLED)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

from .meshtest import MESH_YAML, Proc, offline_agent, start_mesh, write_config

#: These tests are not about the drain: do not wait out the default grace period.
QUICK_DRAIN = {"MESH_SERVER__GRACE_PERIOD_S": "3"}


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


class Terminal:
    """A process on a pseudo-terminal (its controlling tty: Ctrl-C is a real SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: becomes `mesh chat`
            os.execve(sys.executable, [sys.executable, "-m", "mesh", *argv], env)  # noqa: S606
        self.pid, self.fd = pid, fd
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Read until ``pattern`` (a regex) appears in what came after the last match."""
        while True:
            match = re.search(pattern, self.seen)
            if match:
                self.seen = self.seen[match.end() :]
                return match
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"no {pattern!r} within {timeout}s; got:\n{self.seen}"
            try:
                chunk = os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                chunk = ""
            assert chunk, f"the chat ended before {pattern!r}; got:\n{self.seen}"
            self.seen += chunk.replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_interactive_chat_through_a_terminal(tmp_path: Path) -> None:
    config = _mesh_file(tmp_path)
    mesh, router, env = start_mesh(config, tmp_path / "data", QUICK_DRAIN)
    try:
        term = Terminal(
            ["chat", "--config", str(config), "--router", router],
            {**os.environ, **env, "TERM": "dumb"},
        )
        try:
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
            if term.fd >= 0 and Path(f"/proc/{term.pid}").exists():
                os.kill(term.pid, signal.SIGKILL)
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
    """Through the shipped mesh with auth on: the call ends OK at every hop."""
    mesh, router, env = start_mesh(MESH_YAML, tmp_path / "data")
    try:
        chat = Proc(["chat", "--config", str(MESH_YAML), "--router", router, "hello"], env)
        assert chat.popen.wait(timeout=60) == 0, "".join(chat.stderr)
        chat.lines.get(timeout=10)
        assert "".join(chat.stdout).startswith("[triage] Hello!")
    finally:
        assert mesh.stop() == 0
    logs = "".join(mesh.stderr)
    audited = [line for line in logs.splitlines() if "mesh.v1.RouterService/Chat" in line]
    assert audited and all('"status":"OK"' in line for line in audited), audited
    assert not [line for line in logs.splitlines() if " WARNING " in line or " ERROR " in line]
