"""``mesh up`` supervises real processes: they die with it, and it says what failed."""

from __future__ import annotations

import os
import queue
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from .meshtest import REPO, Proc, mesh_token, offline_agent, start_mesh, write_config


def _config(tmp_path: Path, **agents: dict[str, object]) -> Path:
    agents = agents or {"alpha": offline_agent(), "beta": offline_agent()}
    return write_config(tmp_path, {"agents": agents, "auth": {"enabled": False}})


def _env(tmp_path: Path, agents: tuple[str, ...]) -> dict[str, str]:
    env = {f"MESH_AGENTS__{a.upper()}__PORT": "0" for a in agents}
    env["MESH_DATA_DIR"] = str(tmp_path / "data")
    return env


def _up(config: Path, tmp_path: Path, agents: tuple[str, ...] = ("alpha", "beta")) -> Proc:
    return Proc(["up", "--config", str(config), "--router-port", "0"], _env(tmp_path, agents))


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    """Wait (on pidfds, no polling) until every pid has exited; returns those still alive."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    try:
        pending = set(fds)
        while pending:
            ready, _, _ = select.select(list(pending), [], [], timeout)
            if not ready:
                break
            pending -= set(ready)
        return [fds[fd] for fd in pending]
    finally:
        for fd in fds:
            os.close(fd)


def _running(proc: Proc) -> list[int]:
    proc.wait_line("mesh up: running", timeout=90)
    children = _children(proc.popen.pid)
    assert len(children) == 3  # two agents and the router
    return children


def test_sigkill_of_mesh_up_leaves_no_child(tmp_path: Path) -> None:
    proc = _up(_config(tmp_path), tmp_path)
    children = _running(proc)
    proc.popen.kill()  # SIGKILL: no handler runs in mesh up
    proc.popen.wait()
    # The kernel's parent-death signal stops them (they drain and exit).
    assert _wait_gone(children) == []


#: A parent as make is: it starts its argv as a child and waits for it (no exec).
LAUNCHER = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_kill_9_of_the_process_that_started_mesh_up_stops_it_and_every_child(
    tmp_path: Path,
) -> None:
    """`make run`'s `mesh up --exit-with-parent`, started by a parent that is then killed
    with SIGKILL: the kernel's SIGTERM starts the orderly stop, and nothing is left."""
    argv = [sys.executable, "-m", "mesh", "up", "--config", str(_config(tmp_path))]
    argv += ["--router-port", "0", "--exit-with-parent"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_env(tmp_path, ("alpha", "beta"))}
    with (tmp_path / "stderr.log").open("w") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=REPO,
        )
    assert launcher.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(launcher.stdout, lines), daemon=True).start()
    try:
        while (line := lines.get(timeout=90)) != "mesh up: running; Ctrl-C stops everything\n":
            assert line is not None, (tmp_path / "stderr.log").read_text()  # it exited
        (up,) = _children(launcher.pid)
        children = _children(up)
        assert len(children) == 3  # two agents and the router
    finally:
        launcher.kill()  # SIGKILL, as `kill -9` of make: mesh up is not told by it
        launcher.wait()
    assert _wait_gone([up, *children]) == []
    err_text = (tmp_path / "stderr.log").read_text()
    assert "Traceback" not in err_text and "did not stop within" not in err_text


def test_exit_with_parent_starts_nothing_when_the_parent_is_already_gone(
    tmp_path: Path,
) -> None:
    """The parent died before the kernel took the request (here: a pid that was never
    the parent): no signal would come, so mesh up says so and starts nothing."""
    run = (
        "import sys\n"
        "from mesh.cli import _supervisor, main\n"
        "_supervisor._LAUNCHER = 999_999_999\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["up", "--config", str(_config(tmp_path)), "--router-port", "0", "--exit-with-parent"]
    done = subprocess.run(
        [sys.executable, "-c", run, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **_env(tmp_path, ("alpha", "beta"))},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "mesh up: the process that started it (pid 999999999) has already exited "
        "(--exit-with-parent); nothing was started"
    ]


def test_make_run_starts_mesh_up_with_exit_with_parent() -> None:
    """The command `make run` runs (make -n prints it; UV set: no uv lookup)."""
    out = subprocess.run(
        ["make", "-n", "run", "UV=uv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines() if "bin/mesh up" in line]
    assert commands == [
        [".venv/bin/mesh", "up", "--config", "services/mesh.yaml", "--exit-with-parent"]
    ]


def test_sighup_stops_every_child(tmp_path: Path) -> None:
    proc = _up(_config(tmp_path), tmp_path)
    children = _running(proc)
    proc.signal(signal.SIGHUP)  # the terminal closed
    assert proc.popen.wait(timeout=60) == 0
    assert _wait_gone(children) == []


def test_a_child_that_exits_is_named_with_its_code_and_output(tmp_path: Path) -> None:
    proc = _up(_config(tmp_path), tmp_path)
    alpha, beta, router = _running(proc)
    os.kill(beta, signal.SIGKILL)
    assert proc.popen.wait(timeout=60) == 1
    assert _wait_gone([alpha, router]) == []
    err = "".join(proc.stderr)
    assert "mesh up: agent beta exited with code -9 while the mesh was running" in err
    assert "its last lines:\n    agent beta: 127.0.0.1:" in err
    assert "Traceback" not in err


def test_a_child_failing_at_start_is_reported(tmp_path: Path) -> None:
    broken = offline_agent()
    broken["tools"] = ["no_such_module:tool"]
    proc = _up(
        _config(tmp_path, alpha=offline_agent(), broken=broken), tmp_path, ("alpha", "broken")
    )
    assert proc.popen.wait(timeout=60) == 1
    err = "".join(proc.stderr)
    assert "mesh up: agent broken exited with code 2 before it was ready; its last lines:" in err
    assert "cannot import 'no_such_module'" in err
    assert "Traceback" not in err


def test_a_taken_port_is_named_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        agent = {**offline_agent(), "port": port}
        config = _config(tmp_path, alpha=agent)
        proc = Proc(["up", "--config", str(config), "--router-port", "0"])
        assert proc.popen.wait(timeout=60) == 1
    proc.lines.get(timeout=10)
    err = [line for line in "".join(proc.stderr).splitlines() if line.strip()]
    assert len(err) == 1, err
    assert (
        f"port {port} on 127.0.0.1, for agent alpha (agents.alpha.port), is already in use"
        in err[0]
    )
    assert "ss -ltnp" in err[0]
    assert proc.stdout == []  # nothing was started


async def test_ctrl_c_lets_a_turn_in_flight_finish_its_next_hop(tmp_path: Path) -> None:
    """Ctrl-C while the first step of a sequence streams: the router drains first, so
    the turn's next hop still finds its agent serving and the token service issuing
    (all stopped at once, the next hop got UNAVAILABLE), and then everything exits 0."""
    from mesh.client import AgentClient, create_channel, turn_request

    config = write_config(
        tmp_path,
        {
            "router": {"sequences": {"plan": {"steps": ["front", "back"]}}},
            "auth": {"enabled": True},
            "server": {"grace_period_s": 30},
            "agents": {
                "front": offline_agent(chunk_chars=4, delay_ms=400),
                "back": offline_agent(default_reply="back: {message}"),
            },
        },
    )
    proc, router, env = start_mesh(config, tmp_path / "data", {"MESH_SERVER__METRICS_PORT": "0"})
    proc.wait_line("mesh up: running", timeout=90)
    token = mesh_token(config, env)
    async with create_channel(router) as channel:
        stream = AgentClient(channel, router=True).open(
            metadata=[("authorization", f"Bearer {token}")], timeout=120
        )
        events = stream.turn(turn_request("a question that takes a while", agent="plan"))
        first = await anext(events)
        assert first.WhichOneof("kind") == "delta" and first.agent == "front"
        proc.signal(signal.SIGINT)  # front is mid-answer; back and the tokens come later
        rest = [event async for event in events]
    final = rest[-1]
    assert final.WhichOneof("kind") == "final", rest[-1]
    assert final.agent == "back" and list(final.final.hop_path) == ["front", "back"]
    assert proc.popen.wait(timeout=120) == 0, "".join(proc.stderr)
    # Each service's metrics line says whose port it is.
    owners = re.findall(r"^metrics: 127\.0\.0\.1:\d+ \((.+)\)$", "".join(proc.stderr), re.M)
    assert sorted(owners) == ["agent back", "agent front", "the router"], owners
