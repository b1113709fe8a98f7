"""Bad command lines and bad config files get one clear message and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from .meshtest import MESH_YAML, Proc, offline_agent, write_config


def _run(*args: str) -> tuple[int, str]:
    proc = Proc(list(args))
    code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)  # let the pumps drain
    return code, "".join(proc.stderr)


def test_unknown_agent_name() -> None:
    code, err = _run("agent", "nobody", "--config", str(MESH_YAML))
    assert code == 2
    assert "unknown agent 'nobody'" in err
    assert "billing" in err  # lists the known ones


def test_malformed_field_is_named(tmp_path: Path) -> None:
    agent = offline_agent()
    agent["limits"] = {"max_tool_rounds": "many"}
    config = write_config(tmp_path, {"agents": {"a": agent}})
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert str(config) in err
    assert "agents.a.limits.max_tool_rounds" in err


def test_unknown_handoff_target_is_named(tmp_path: Path) -> None:
    agent = offline_agent()
    agent["handoffs"] = [{"target": "ghost"}]
    config = write_config(tmp_path, {"agents": {"a": agent}})
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert "agents.a.handoffs: unknown target 'ghost'" in err


def test_a_bad_value_from_the_environment_names_its_variable() -> None:
    proc = Proc(
        ["agent", "billing", "--config", str(MESH_YAML)], {"MESH_SERVER__GRACE_PERIOD_S": "abc"}
    )
    code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)
    line = _one_line("".join(proc.stderr))
    assert code == 2
    assert "server.grace_period_s: Input should be a valid number" in line
    assert line.endswith("(from $MESH_SERVER__GRACE_PERIOD_S)")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("agents:\n  a: {description: [unclosed\n")
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert f"{config}:" in err and "invalid YAML" in err


def test_missing_file(tmp_path: Path) -> None:
    code, err = _run("agent", "a", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "no such file" in err


def test_help_on_every_command() -> None:
    for command in ([], ["agent"], ["up"], ["chat"], ["info"], ["new", "agent"]):
        proc = Proc([*command, "--help"])
        assert proc.popen.wait(timeout=30) == 0
        proc.lines.get(timeout=10)
        assert "usage: mesh" in "".join(proc.stdout)


# -- everyday failures through the real binary: one line, non-zero exit -----------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_chat_with_the_router_down(tmp_path: Path) -> None:
    # Nothing listens on this port: the router is down.
    port = _free_port()
    code, err = _run("chat", "--config", str(MESH_YAML), "--router", f"127.0.0.1:{port}", "hi")
    assert code == 1
    line = _one_line(err)
    assert f"cannot reach the router at 127.0.0.1:{port}: is it running?" in line
    assert "--router HOST:PORT" in line  # a flag `mesh chat` has
    # An agent's commands point at it with --target, the flag they have.
    code, err = _run(
        "info", "--config", str(MESH_YAML), "--no-auth", "--target", f"127.0.0.1:{port}"
    )
    assert code == 1
    line = _one_line("\n".join(x for x in err.splitlines() if "--no-auth" not in x))
    assert f"cannot reach the agent at 127.0.0.1:{port}" in line and "--target HOST:PORT" in line


def test_agent_on_a_busy_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = _run(
            "agent", "billing", "--config", str(MESH_YAML), "--no-auth", "--port", str(port)
        )
    assert code == 1
    line = [x for x in err.splitlines() if "--no-auth" not in x]
    assert len(line) == 1 and "Traceback" not in err, err
    assert f"127.0.0.1:{port} is already in use" in line[0]
    assert "--port 0" in line[0]


def test_the_token_service_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = Proc(
            ["sts", "--config", str(MESH_YAML), "--port", str(port)],
            {"MESH_DATA_DIR": str(tmp_path)},
        )
        code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)
    line = _one_line("".join(proc.stderr))
    assert code == 2
    assert f"127.0.0.1:{port} is already in use, so the token service cannot listen" in line


def test_a_busy_metrics_port_is_the_one_named() -> None:
    """Not the service's own (free) port: the metrics port that is taken."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = Proc(
            ["agent", "billing", "--config", str(MESH_YAML), "--no-auth", "--port", "0"],
            {"MESH_SERVER__METRICS_PORT": str(port)},
        )
        code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)
    err = "".join(proc.stderr)
    assert code == 1 and "Traceback" not in err, err
    assert f"127.0.0.1:{port} is already in use, so agent billing's metrics port" in err
    assert "server.metrics_port 0" in err


def test_mesh_up_refuses_one_fixed_metrics_port_for_every_service(tmp_path: Path) -> None:
    proc = Proc(
        ["up", "--config", str(MESH_YAML), "--router-port", "0"],
        {"MESH_SERVER__METRICS_PORT": "50077", "MESH_DATA_DIR": str(tmp_path)},
    )
    code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)
    err = "".join(proc.stderr)
    assert code != 0 and "Traceback" not in err, err
    assert "server.metrics_port is 50077: under `mesh up` every service" in err


def test_a_token_with_a_line_break_is_one_line(tmp_path: Path) -> None:
    """A pasted token that carries a line break or a space is named as such; one that
    only ends in a line break (a CRLF file) is used as the token it is."""
    args = ["chat", "--config", str(MESH_YAML), "--router", "127.0.0.1:9", "hello"]
    for bad in ("eyJhbGciOi.x\ny.z", "eyJ abc.def.ghi"):
        proc = Proc(args, {"MESH_TOKEN": bad})
        code = proc.popen.wait(timeout=60)
        proc.lines.get(timeout=10)
        err = "".join(proc.stderr)
        assert code == 2 and "Traceback" not in err, err
        assert "$MESH_TOKEN holds characters a header cannot carry" in err
        assert "eyJ" not in err  # the value is never echoed
    proc = Proc(args, {"MESH_TOKEN": "eyJhbGciOi.abc.def\r\n"})
    code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)
    err = "".join(proc.stderr)
    assert "Traceback" not in err and "cannot carry" not in err, err
    assert "127.0.0.1:9" in err  # it got as far as the (absent) router


def _slow_talker(tmp_path: Path) -> Path:
    agent = offline_agent(default_reply="word " * 200, chunk_chars=5, delay_ms=5)
    return write_config(tmp_path, {"agents": {"talker": agent}, "auth": {"enabled": False}})


def test_chat_json_into_a_closed_pipe(tmp_path: Path) -> None:
    """`mesh chat --json ... | head -1`: one line about the closed pipe, exit 141."""
    config = _slow_talker(tmp_path)
    agent = Proc(["agent", "talker", "--config", str(config), "--port", "0"])
    try:
        address = agent.wait_line("agent talker: ")
        chat = subprocess.Popen(
            [
                *(sys.executable, "-m", "mesh", "chat", "--config", str(config)),
                *("--target", address, "--json", "talk to me"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert chat.stdout is not None and chat.stderr is not None
        first = chat.stdout.readline()
        assert first.startswith("{")
        chat.stdout.close()  # what `head -1` does after its line
        code = chat.wait(timeout=60)
        err = chat.stderr.read()
        assert code == 141
        assert _one_line(err) == "mesh chat: output closed before the end (broken pipe)"
    finally:
        agent.stop()


def test_new_agent_with_a_bad_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"agents": {"a": offline_agent()}})
    for bad in ("Bad-Name", "my_notes"):  # my_notes: Kubernetes refuses '_' in a name
        code, err = _run("new", "agent", bad, "--config", str(config))
        assert code == 2
        assert _one_line(err).startswith(f"mesh new: agent name {bad!r}: use lowercase")
        assert not (tmp_path / bad).exists()


def test_a2a_edge_before_the_token_service_ever_ran(tmp_path: Path) -> None:
    # A fresh data dir: the embedded token service's CA does not exist yet.
    proc = Proc(
        ["a2a", "--config", str(MESH_YAML), "--port", "0"], {"MESH_DATA_DIR": str(tmp_path)}
    )
    code = proc.popen.wait(timeout=60)
    err = "".join(proc.stderr_lines())
    assert code == 2, err
    line = _one_line(err)
    assert "ca.pem does not exist" in line and "mesh sts" in line
