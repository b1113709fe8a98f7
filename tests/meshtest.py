"""Shared helpers for tests that start real processes and servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from mesh.agent._runtime import AgentRuntime
from mesh.agent._serve import build_agent_server
from mesh.config import MeshConfig, config_from_dict
from mesh.providers.base import ModelEvent, ModelRequest, Provider
from mesh.server import MeshServer

REPO = Path(__file__).resolve().parent.parent
MESH_YAML = REPO / "services" / "mesh.yaml"
BIN = Path(sys.executable).parent


def tool_path(name: str) -> str:
    """An executable installed in the project's venv (grpcurl, kubectl, ...)."""
    found = shutil.which(name, path=str(BIN))
    assert found, f"{name} is not installed in {BIN}; run `make setup`"
    return found


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """The real grpcurl (plaintext, 30 s max), its output captured."""
    return subprocess.run(
        [tool_path("grpcurl"), "-plaintext", "-max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(directory: Path, data: dict[str, Any], name: str = "mesh.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


#: Every process the tests started; the suite's last check reads their output.
STARTED: list[Proc] = []


class Proc:
    """A ``python -m mesh ...`` process whose stdout lines can be awaited."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path = REPO):
        self.args = list(args)
        STARTED.append(self)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mesh", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        self._err_pump = threading.Thread(target=self._pump_err, daemon=True)
        self._err_pump.start()

    def _pump_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.stdout.append(line)
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The rest of the first stdout line starting with ``prefix``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line {prefix!r} within {timeout}s; stderr:\n{''.join(self.stderr)}"
                ) from None
            if line is None:
                code = self.popen.wait()
                raise AssertionError(
                    f"process exited {code} before {prefix!r}; stderr:\n{''.join(self.stderr)}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def stderr_lines(self, timeout: float = 10.0) -> list[str]:
        """Everything the exited process wrote to stderr (waits for the pipe's end)."""
        self._err_pump.join(timeout)
        return list(self.stderr)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@contextlib.contextmanager
def mesh_process(args: Sequence[str], env: dict[str, str] | None = None) -> Iterator[Proc]:
    proc = Proc(args, env)
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.stop()


def start_agent(config: Path, name: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    proc = Proc(["agent", name, "--config", str(config), "--port", "0"], env)
    return proc, proc.wait_line(f"agent {name}: ")


def offline_agent(description: str = "test agent", **provider: Any) -> dict[str, Any]:
    return {"description": description, "provider": {"kind": "offline", **provider}}


def mesh_config(agents: dict[str, Any], **extra: Any) -> MeshConfig:
    return config_from_dict({"agents": agents, **extra}, source="<test>")


class RecordingProvider:
    """Wraps a provider and records, on the server side, when its streams open and close."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.model = inner.model
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.requests: list[ModelRequest] = []
        self.traces: list[dict[str, str]] = []
        """The W3C trace context each model call ran in (what the agent received)."""

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        from mesh.context import current_trace_context

        self.requests.append(request)
        self.traces.append(dict(current_trace_context.get({})))
        self.opened.set()
        self.closed.clear()
        try:
            async for event in self.inner.stream(request):
                yield event
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RawAgent:
    """A bare gRPC server with one ``mesh.v1.AgentService/Chat`` handler and a health
    service that says SERVING once started: an agent the mesh did not build."""

    def __init__(self, chat: Any) -> None:
        import grpc
        from grpc_health.v1 import health_pb2_grpc
        from grpc_health.v1._async import HealthServicer

        from mesh.v1 import types_pb2

        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.stream_stream_rpc_method_handler(
            chat,
            request_deserializer=types_pb2.ChatRequest.FromString,
            response_serializer=types_pb2.ChatEvent.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("mesh.v1.AgentService", {"Chat": handler}),)
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    async def start(self) -> int:
        from grpc_health.v1 import health_pb2

        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set("mesh.v1.AgentService", health_pb2.HealthCheckResponse.SERVING)
        return port


@contextlib.asynccontextmanager
async def serve_agent(
    config: MeshConfig, name: str, *, record: bool = True
) -> AsyncIterator[tuple[str, MeshServer, AgentRuntime, RecordingProvider]]:
    """An in-process agent server on 127.0.0.1:0 whose provider is recorded."""
    from mesh.agent._serve import build_runtime
    from mesh.mcp import close_toolset

    inner = build_runtime(config, name).provider
    recording = RecordingProvider(inner)
    server, runtime = build_agent_server(config, name, provider=recording)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}", server, runtime, recording
    finally:
        await server.stop(0)
        await close_toolset(runtime)


def free_ports_env(config: MeshConfig, data_dir: Path) -> dict[str, str]:
    """Environment overrides that put every service of ``config`` on a free port."""
    env = {f"MESH_AGENTS__{name.upper()}__PORT": "0" for name in config.agents}
    env["MESH_ROUTER__PORT"] = "0"
    env["MESH_AUTH__STS__PORT"] = "0"
    env["MESH_DATA_DIR"] = str(data_dir)
    return env


def start_mesh(
    config: Path, data_dir: Path, env: dict[str, str] | None = None
) -> tuple[Proc, str, dict[str, str]]:
    """``mesh up`` on free ports; returns the process, the router's address and the
    environment that points clients (``mesh chat``, ``mesh token``) at this mesh."""
    from mesh.config import load_config

    full = {**free_ports_env(load_config(config), data_dir), **(env or {})}
    proc = Proc(["up", "--config", str(config), "--router-port", "0"], full)
    return proc, proc.wait_line("router: ", timeout=60), full


def mesh_token(config: Path, env: dict[str, str], sub: str = "alice") -> str:
    """A user token from ``mesh token`` (prints only the token)."""
    proc = Proc(["token", "--config", str(config), "--sub", sub], env)
    assert proc.popen.wait(timeout=30) == 0, "".join(proc.stderr)
    token = proc.wait_line("")
    assert token.count(".") == 2
    return token


@contextlib.asynccontextmanager
async def serve_router(
    config: MeshConfig, static: dict[str, list[str]]
) -> AsyncIterator[tuple[str, Any]]:
    """An in-process router on 127.0.0.1:0 over the given agent endpoints."""
    from mesh.router import MemoryStore, RouterApp, with_static

    app = RouterApp(with_static(config, static), store=MemoryStore())
    port = await app.start("127.0.0.1", 0)
    for agent in static:
        assert await app.pool.wait_healthy(agent, 10), f"{agent} never turned healthy"
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        await app.stop()


@contextlib.contextmanager
def redis_server(directory: Path | None = None) -> Iterator[str]:
    """A real ``redis-server`` on a unix socket in a temporary directory (or in
    ``directory``: a second server there takes the first one's socket, a restart),
    persisting nothing (no RDB snapshots, no append-only file); yields its ``unix://`` URL."""
    import pytest

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; `make test` installs it")
    with contextlib.ExitStack() as stack:
        tmp = str(directory) if directory else stack.enter_context(tempfile.TemporaryDirectory())
        sock = Path(tmp) / "redis.sock"
        args = ["--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([server, *args, "--dir", tmp], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "ready to accept connections" in line.lower():
                    break
            else:
                raise AssertionError("redis-server did not start")
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            yield f"unix://{sock}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


#: For `mesh up` in tests that are not about the drain: do not wait out the default grace.
QUICK_DRAIN = {"MESH_SERVER__GRACE_PERIOD_S": "3"}


class Terminal:
    """A process on a pseudo-terminal (its controlling tty: Ctrl-C is a real SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: becomes `python -m mesh <argv>`
            os.execve(sys.executable, [sys.executable, "-m", "mesh", *argv], env)  # noqa: S606
        self.pid, self.fd = pid, fd
        self.seen = ""
        self.exited = False

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
        self.exited = True
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        """SIGKILL the process if it was not waited for (a test that failed midway)."""
        if not self.exited:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()


@contextlib.contextmanager
def chat_terminal(config: Path, router: str, env: dict[str, str]) -> Iterator[Terminal]:
    """``mesh chat`` against ``router`` on a pseudo-terminal (TERM=dumb); killed on the
    way out unless the test waited for it."""
    term = Terminal(
        ["chat", "--config", str(config), "--router", router],
        {**os.environ, **env, "TERM": "dumb"},
    )
    try:
        yield term
    finally:
        term.kill()
