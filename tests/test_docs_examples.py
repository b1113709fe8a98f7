"""Every grpcurl (or ``buf curl``) example of README.md and docs/*.md runs as written
against the default mesh, started the way ``make run`` starts it.

The rules, so that a new example needs nothing in this file:

- **What is an example.** A fenced block (not json/yaml/python) with a line that calls
  grpcurl or ``buf curl``. The commands are read from the markdown; none is copied here.
  It runs whole, in a fresh ``bash -e -o pipefail`` in the repo, preceded by the
  ``export`` lines of the same file's earlier examples. PATH holds only the system
  directories: the docs call ``.venv/bin/...`` by its path.
- **Where the mesh listens.** ``mesh up --config services/mesh.yaml`` from the repo, on
  the documented ports (those of services/mesh.yaml), with only its data dir moved to a
  temporary one (``MESH_DATA_DIR``, passed to the examples' shell too). When one of those
  ports is taken on this machine, every service gets a free port instead and each
  documented ``127.0.0.1:PORT`` in the commands is rewritten to the service's actual
  address: the only rewrite there is.
- **Cluster examples** (docs/kubernetes.md) run against the local mesh at the address the
  port-forward would give, through a stand-in ``kubectl`` shell function:
  ``kubectl ... port-forward svc/NAME L:R`` does nothing (the local mesh already serves
  NAME at 127.0.0.1:L), and ``kubectl ... exec deploy/NAME -- CMD`` runs CMD here with the
  venv's bin directory first on PATH (the image's PATH has ``mesh``). Any other kubectl
  call fails the example.
- **Interactive examples** (``-d @`` reading the terminal, no here-document or pipe): the
  lines to type are the fenced json block right after the example, sent one at a time.
  A value ``"<from the X>"`` waits for the event carrying ``X`` and takes the same field
  from it. Once every line is sent and a ``final`` arrived, stdin is closed (Ctrl-D).
- **Output.** Every Chat stream printed is what the README says: events each tagged with
  ``agent`` and ``seq``, ending in a ``final`` with its ``hop_path``, one per Chat call.
  A json block of the example's section whose lines are events (objects with ``agent``)
  is output the docs show: each line must match an event the example printed (every key
  shown, with the value shown; ``...`` in a string matches anything; ``approval_id`` is
  per run). An approval answered ``approved: true`` makes the tool run.
- **Not run.** ``<!-- not-run: reason -->`` right before a block excludes it;
  ``test_not_run_blocks_are_listed`` lists them with their reasons.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh.config import load_config

from .meshtest import BIN, MESH_YAML, REPO, Proc, start_mesh

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->\s*\Z", re.S)
CALLS_GRPC = re.compile(r"^\s*(?:\S*/)?(?:grpcurl\s|buf\s+curl\s)", re.M)
HEADING = re.compile(r"^#{1,6} ", re.M)
NOT_SHELL = {"json", "yaml", "yml", "python", "toml", "proto", "text"}
#: Fields whose value is new on every run: shown as an example value, matched by type.
PER_RUN = {"approval_id", "turn_id"}
PLACEHOLDER = re.compile(r'"<from the (\w+)>"')
TIMEOUT = 90.0


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    section: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclass(frozen=True)
class Example:
    block: Block
    exports: str
    typed: list[str] = field(default_factory=list)
    shown: list[dict[str, Any]] = field(default_factory=list)


def _blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        headings = list(HEADING.finditer(before))
        section = before[headings[-1].start() :].splitlines()[0] if headings else ""
        marker = NOT_RUN.search(before)
        blocks.append(
            Block(
                path,
                before.count("\n") + 1,
                match.group(1),
                match.group(2),
                section,
                marker.group(1).strip() if marker else None,
            )
        )
    return blocks


def _events_shown(block: Block) -> list[dict[str, Any]] | None:
    """The block's lines as events, when it is a json block of events (else None)."""
    if block.lang != "json":
        return None
    events = []
    for line in block.body.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(event, dict) or "agent" not in event:
            return None
        events.append(event)
    return events or None


def _interactive(body: str) -> bool:
    joined = body.replace("\\\n", " ")
    return bool(re.search(r"-d @(\s|$)", joined)) and not re.search(r"<<|\s<\s|\|", joined)


def _examples() -> list[Example]:
    examples = []
    for path in DOCS:
        blocks = _blocks(path)
        exports = ""
        for index, block in enumerate(blocks):
            if block.lang in NOT_SHELL or block.not_run or not CALLS_GRPC.search(block.body):
                continue
            typed: list[str] = []
            if _interactive(block.body):
                follow = blocks[index + 1] if index + 1 < len(blocks) else None
                assert follow and follow.lang == "json", (
                    f"{block.name}: an interactive example needs the lines to type in a json "
                    "block right after it"
                )
                typed = [line for line in follow.body.splitlines() if line.strip()]
            shown = [
                event
                for other in blocks
                if other.section == block.section
                for event in (_events_shown(other) or [])
            ]
            examples.append(Example(block, exports, typed, shown))
            exports += "".join(
                line + "\n" for line in block.body.splitlines() if line.startswith("export ")
            )
    return examples


EXAMPLES = _examples()


def test_examples_are_found() -> None:
    """The extraction sees the examples the docs have (a broken regex would run none)."""
    names = {example.block.path.name for example in EXAMPLES}
    assert {"README.md", "orchestration.md", "kubernetes.md"} <= names, names
    assert any(example.typed for example in EXAMPLES)
    assert any(example.shown for example in EXAMPLES)


def test_not_run_blocks_are_listed() -> None:
    """Blocks excluded on purpose, each with its reason (printed with ``pytest -s``)."""
    excluded = [block for path in DOCS for block in _blocks(path) if block.not_run is not None]
    for block in excluded:
        assert block.not_run, f"{block.name}: a not-run marker needs a reason"
        print(f"not run: {block.name}: {block.not_run}")


# The mesh ------------------------------------------------------------------------------


@dataclass
class Mesh:
    proc: Proc
    env: dict[str, str]
    rewrite: dict[str, str]


def _documented_ports() -> dict[str, int]:
    config = load_config(MESH_YAML)
    ports = {f"agent {name}": agent.port for name, agent in config.agents.items()}
    ports["router"] = config.router.port
    ports["sts"] = config.auth.sts.port
    return {name: port for name, port in ports.items() if port}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _on_documented_ports(data: Path) -> Proc | None:
    """``mesh up`` as ``make run`` starts it, or None when a documented port is taken:
    checked first, and when another process took one since, ``mesh up`` exits naming
    it. (Any other failure to start shows again on the free ports.)"""
    if not all(_free(port) for port in _documented_ports().values()):
        return None
    proc = Proc(["up", "--config", "services/mesh.yaml"], {"MESH_DATA_DIR": str(data)})
    try:
        proc.wait_line("mesh up: running", timeout=90)
    except AssertionError as exited:
        print(f"docs examples: mesh up on the documented ports failed: {exited}")
        proc.stop()
        return None
    return proc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data = tmp_path_factory.mktemp("docs-mesh") / "data"
    rewrite: dict[str, str] = {}
    proc = _on_documented_ports(data)
    if proc is not None:
        env = {"MESH_DATA_DIR": str(data)}
        print("docs examples: mesh on the documented ports")
    else:
        proc, router, env = start_mesh(MESH_YAML, data)
        env = {**env, "MESH_ROUTER__PORT": router.rpartition(":")[2]}
    try:
        if "MESH_ROUTER__PORT" in env:
            proc.wait_line("mesh up: running", timeout=90)
            documented = _documented_ports()
            for line in proc.stdout:
                name, _, address = line.partition(": ")
                if name in documented:
                    actual = address.strip().removeprefix("https://")
                    rewrite[f"127.0.0.1:{documented[name]}"] = actual
            print(f"docs examples: a documented port is taken; rewriting {rewrite}")
        yield Mesh(proc, env, rewrite)
    finally:
        proc.stop()


# Running an example --------------------------------------------------------------------


def _prelude() -> str:
    venv = shlex.quote(str(BIN))
    return f"""kubectl() {{
  while [ $# -gt 0 ]; do
    case "$1" in
      port-forward) return 0 ;;
      --) shift; PATH={venv}:"$PATH" "$@"; return ;;
    esac
    shift
  done
  echo "kubectl stand-in: only port-forward and exec ... -- CMD run here" >&2
  return 2
}}
"""


def _script(example: Example, mesh: Mesh) -> str:
    script = _prelude() + example.exports + example.block.body
    for documented, actual in mesh.rewrite.items():
        script = script.replace(documented, actual)
    return script


def _shell(mesh: Mesh, home: Path) -> dict[str, str]:
    return {"PATH": SYSTEM_PATH, "HOME": str(home), **mesh.env}


def _objects(stdout: str) -> list[dict[str, Any]]:
    """The top-level JSON objects grpcurl printed (each starts with a line ``{``)."""
    objects = []
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\{$", stdout, re.M):
        with contextlib.suppress(json.JSONDecodeError):
            value, _ = decoder.raw_decode(stdout, match.start())
            if isinstance(value, dict):
                objects.append(value)
    return objects


class _Stream:
    """An interactive example: stdin written line by line, events read as they come."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            ["/bin/bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.stdout = ""
        self.stderr = ""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.popen.stderr is not None
        self.stderr = self.popen.stderr.read()

    def next_event(self) -> dict[str, Any]:
        pending = ""
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no event within {TIMEOUT}s: {self.stdout}") from None
            assert line is not None, f"the example ended: {self.stdout}{self.stderr}"
            self.stdout += line
            pending += line
            if line.rstrip("\n") == "}":
                event: dict[str, Any] = json.loads(pending)
                self.events.append(event)
                return event

    def wait_for(self, key: str) -> dict[str, Any]:
        for event in self.events:
            if key in event:
                return event
        while True:
            event = self.next_event()
            if key in event:
                return event

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def finish(self) -> int:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            self.stdout += line
        return self.popen.wait(timeout=TIMEOUT)


def _run_interactive(example: Example, script: str, env: dict[str, str]) -> tuple[int, str, str]:
    stream = _Stream(script, env)
    try:
        for line in example.typed:
            for key in PLACEHOLDER.findall(line):
                event = stream.wait_for(key)[key]
                field_name = re.search(rf'"(\w+)": "<from the {key}>"', line)
                assert field_name, line
                line = line.replace(f'"<from the {key}>"', json.dumps(event[field_name[1]]))
            stream.send(line)
        stream.wait_for("final")
        code = stream.finish()
    finally:
        if stream.popen.poll() is None:
            stream.popen.kill()
            stream.popen.wait()
    return code, stream.stdout, stream.stderr


def _matches(shown: Any, actual: Any, key: str = "") -> bool:
    if key in PER_RUN:
        return isinstance(actual, type(shown))
    if isinstance(shown, dict):
        return isinstance(actual, dict) and all(
            k in actual and _matches(v, actual[k], k) for k, v in shown.items()
        )
    if isinstance(shown, list):
        return (
            isinstance(actual, list)
            and len(shown) == len(actual)
            and all(_matches(s, a) for s, a in zip(shown, actual, strict=True))
        )
    if isinstance(shown, str) and "..." in shown:
        pattern = ".*".join(re.escape(part) for part in shown.split("..."))
        return isinstance(actual, str) and re.fullmatch(pattern, actual, re.S) is not None
    if isinstance(shown, int) and isinstance(actual, str):
        return str(shown) == actual  # proto JSON prints 64-bit integers as strings
    return bool(shown == actual)


def _kind(event: dict[str, Any]) -> str:
    return next(k for k in event if k not in {"agent", "seq", "conversation_id", "turn_id"})


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.block.name for e in EXAMPLES])
def test_docs_example_runs_as_written(example: Example, mesh: Mesh, tmp_path: Path) -> None:
    script = _script(example, mesh)
    env = _shell(mesh, tmp_path)
    if example.typed:
        code, stdout, stderr = _run_interactive(example, script, env)
    else:
        done = subprocess.run(
            ["/bin/bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            check=False,
        )
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    assert code == 0, (example.block.name, stdout, stderr)
    assert "Traceback" not in stderr, stderr

    events = [obj for obj in _objects(stdout) if "agent" in obj]
    chats = len(re.findall(r"Service/Chat\b", example.block.body))
    finals = [event for event in events if "final" in event]
    assert len(finals) == chats, (example.block.name, stdout)
    for event in events:
        assert event["agent"] and int(event["seq"]) > 0, event
    for final in finals:
        assert final["final"]["content"] and final["final"]["hop_path"], final

    for shown in example.shown:
        same_kind = [event for event in events if _kind(shown) in event]
        assert any(_matches(shown, event) for event in same_kind), (
            f"{example.block.name}: the docs show {json.dumps(shown)}; printed: {same_kind}"
        )
    for line in example.typed:
        answer = json.loads(PLACEHOLDER.sub('"x"', line)).get("approval")
        if answer and answer.get("approved"):
            request = next(e["approval_request"] for e in events if "approval_request" in e)
            result = next(
                e["tool_result"]
                for e in events
                if "tool_result" in e and e["tool_result"]["call_id"] == request["call"]["id"]
            )
            assert not result.get("is_error"), result
