"""``mesh up``: the token service, every agent and the router, each its own process.

The children die with their supervisor: SIGINT, SIGTERM and SIGHUP (the terminal
closed) stop them in order (the router first, so it stops taking turns while the
agents finish theirs); on Linux each child also gets SIGTERM from the kernel when
the supervisor dies without a chance to clean up (``PR_SET_PDEATHSIG``, set in the
child between fork and exec), so even ``kill -9`` of ``mesh up`` leaves nothing
running. A child that exits on its own is named, with its exit code and its last
lines of output, and the others are stopped.

With ``--exit-with-parent`` (``make run`` uses it) ``mesh up`` asks the same of the
kernel for itself: SIGTERM, and so the orderly stop, when the process that started it
dies, even by ``kill -9``. It is not the default: ``mesh up`` run by hand may outlive
its shell on purpose (``nohup``, a process manager).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.cli._common import CommandError, add_config, config_of, venv_command
from mesh.config import MeshConfig, resolve_config_path

TAIL_LINES = 20
PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


#: Looked up before any fork: the child only calls it.
_PRCTL = _load_prctl()
#: The process that started this one, read as early as the command line can (at import):
#: ``--exit-with-parent`` checks that it was still there when the request took effect.
_LAUNCHER = os.getppid()


def _sigterm_when_parent_dies(parent: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; a no-op
    elsewhere). False when ``parent`` had already died (this process was re-parented)
    before the request took effect: no signal will come then."""
    if _PRCTL is None:
        return True
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() == parent


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM this child when ``parent`` dies (Linux)."""

    def setup() -> None:
        if not _sigterm_when_parent_dies(parent):  # the supervisor died before prctl
            os._exit(1)

    return setup


def _exit_with_launcher() -> None:
    """``--exit-with-parent``: SIGTERM (handled: the orderly stop) when the process that
    started ``mesh up`` dies. The kernel watches the thread that started it, which for
    make or a shell is their only one."""
    if _PRCTL is None:
        print(
            "mesh up: --exit-with-parent needs Linux (PR_SET_PDEATHSIG); ignored here",
            file=sys.stderr,
        )
    elif not _sigterm_when_parent_dies(_LAUNCHER):
        raise CommandError(
            f"the process that started it (pid {_LAUNCHER}) has already exited "
            "(--exit-with-parent); nothing was started"
        )


_PORT_LINES = ("metrics: ", "health: ")


@dataclass
class Child:
    """One supervised process, its output pumped into a tail and the terminal."""

    label: str
    ready_prefix: str
    popen: subprocess.Popen[str]
    wake: threading.Event
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    ready_line: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    eof: bool = False
    stage: int = 0
    """When it stops: the edges (0), then the router (1), the agents (2), and the token
    service last (3): a turn in flight finishes with every hop and token it needs."""

    def start_pump(self) -> None:
        threading.Thread(target=self._pump, name=f"pump {self.label}", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.tail.append(line.rstrip("\n"))
            if self.ready_line is None and line.startswith(self.ready_prefix):
                self.ready_line = line.strip()
                self.ready.set()
                self.wake.set()
            else:
                if line.startswith(_PORT_LINES):  # whose port it is, among several
                    line = f"{line.rstrip()} ({self.label})\n"
                sys.stderr.write(line)
                sys.stderr.flush()
        self.eof = True
        self.ready.set()
        self.wake.set()

    def report(self, when: str) -> str:
        code = self.popen.wait()
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return f"{self.label} exited with code {code} {when}; its last lines:\n{lines}"


class Supervisor:
    def __init__(self, config: MeshConfig, config_arg: list[str]) -> None:
        self.config = config
        self.config_arg = config_arg
        self.children: list[Child] = []
        self.wake = threading.Event()
        self.stopping = False
        self._signalled: set[int] = set()

    def on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True
        self.wake.set()

    def spawn(
        self, label: str, argv: list[str], ready_prefix: str, service: str = "", stage: int = 0
    ) -> Child:
        env = None
        if service and self.config.auth.enabled:
            from mesh.auth.runtime import child_env

            # Each child gets its own client secret, and only its own.
            env = {**os.environ, **child_env(self.config, service)}
        popen = subprocess.Popen(
            [sys.executable, "-m", "mesh", *argv, *self.config_arg],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops them in order
            preexec_fn=_die_with(os.getpid()),  # prctl only
        )
        child = Child(label, ready_prefix, popen, self.wake, stage=stage)
        self.children.append(child)
        child.start_pump()
        return child

    def wait_ready(self, child: Child) -> str:
        """The child's ready line (``prefix: address``); fails if it exits first."""
        while not child.ready.is_set() and not self.stopping:
            self.wake.wait()
            self.wake.clear()
        if self.stopping:
            raise _Stopped
        if child.ready_line is None:
            raise CommandError(child.report("before it was ready"))
        return child.ready_line

    def watch(self) -> None:
        """Until a signal, or a child exits (which is reported)."""
        while not self.stopping:
            for child in self.children:
                if child.popen.poll() is not None or child.eof:
                    raise CommandError(
                        child.report("while the mesh was running") + "\n"
                        "mesh up: stopping the others"
                    )
            self.wake.wait()
            self.wake.clear()

    def stop_all(self) -> list[int]:
        """Stop the children stage by stage (see :attr:`Child.stage`), each within the
        grace period: a turn in flight when Ctrl-C came finishes, handoffs and token
        exchanges included, before the agents and the token service go."""
        wait = self.config.server.grace_period_s + 5
        codes = []
        for stage in sorted({child.stage for child in self.children}):
            group = [c for c in self.children if c.stage == stage]
            for child in group:
                if child.popen.poll() is None and child.popen.pid not in self._signalled:
                    self._signalled.add(child.popen.pid)
                    child.popen.send_signal(signal.SIGTERM)
            for child in group:
                try:
                    codes.append(child.popen.wait(timeout=wait))
                except subprocess.TimeoutExpired:
                    print(f"mesh up: {child.label} did not stop within {wait:g}s; killing it")
                    child.popen.kill()
                    codes.append(child.popen.wait())
        return codes


class _Stopped(Exception):
    """A signal arrived while the mesh was starting."""


def _fixed_ports(
    config: MeshConfig, router_port: int, with_sts: bool
) -> list[tuple[str, str, int]]:
    ports: list[tuple[str, str, int]] = []
    if with_sts and config.auth.sts.port:
        ports.append(
            ("the token service (auth.sts.port)", config.auth.sts.host, config.auth.sts.port)
        )
    for name, agent in config.agents.items():
        if agent.port and agent.a2a is None:
            ports.append((f"agent {name} (agents.{name}.port)", config.server.host, agent.port))
    if router_port:
        ports.append(("the router (router.port)", config.router.host, router_port))
    if config.a2a.enabled and config.a2a.port:
        ports.append(("the A2A edge (a2a.port)", config.a2a.host, config.a2a.port))
    if config.a2a.enabled and config.a2a.grpc_port:
        ports.append(("the A2A edge (a2a.grpc_port)", config.a2a.host, config.a2a.grpc_port))
    return ports


def check_ports(config: MeshConfig, router_port: int, with_sts: bool) -> None:
    """Fail in one line, before starting anything, when a port of the mesh is taken, or
    when every service would try the same fixed health or metrics port."""
    for name in ("health", "metrics"):
        fixed = getattr(config.server, f"{name}_port")
        if fixed:
            raise CommandError(
                f"server.{name}_port is {fixed}: under `mesh up` every service would listen "
                f"there; set it to 0 (each service picks a free port and prints it)"
            )
    for what, host, port in _fixed_ports(config, router_port, with_sts):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                raise CommandError(
                    f"port {port} on {host}, for {what}, is already in use: is an earlier "
                    f"`mesh up` still running? Stop it (`ss -ltnp 'sport = :{port}'` shows "
                    f"what holds it) or choose another port in {config.source or 'the mesh file'}"
                ) from None


def _ca_hint(config: MeshConfig) -> str:
    return config.auth.tls.ca_file or str(config.data_dir / "sts" / "tls" / "ca.pem")


def try_lines(config: MeshConfig, address: str) -> list[str]:
    """Commands to try, runnable as printed from this directory in a fresh shell."""
    mesh, grpcurl = venv_command("mesh"), venv_command("grpcurl")
    source = Path(config.source) if config.source else None
    default = resolve_config_path(None)
    same = source is None or (default.exists() and source.resolve() == default.resolve())
    cfg = "" if same else f" --config {source}"
    auth = config.auth
    lines = [f"{mesh} chat{cfg} --router {address} 'I need a refund for INV-1001'"]
    transport = "-plaintext" if not auth.tls.enabled else f"-cacert {_ca_hint(config)}"
    header = ""
    if auth.enabled:
        lines.append(f"export MESH_TOKEN=$({mesh} token{cfg} --sub alice)")
        header = ' -H "authorization: Bearer $MESH_TOKEN"'
    lines.append(f"{grpcurl} {transport}{header} {address} list")
    turn = '\'{"turn": {"message": "hello"}}\''
    lines.append(f"{grpcurl} {transport}{header} -d {turn} {address} mesh.v1.RouterService/Chat")
    return lines


def cmd_up(args: argparse.Namespace) -> int:
    config = config_of(args)
    router_port = config.router.port if args.router_port is None else args.router_port
    auth = config.auth
    with_sts = auth.enabled and auth.exchanger == "embedded" and not auth.issuer
    check_ports(config, router_port, with_sts)
    sup = Supervisor(config, ["--config", str(Path(config.source).resolve())])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, sup.on_signal)
    if args.exit_with_parent:  # after the handlers: the signal must stop things in order
        _exit_with_launcher()
    failed = False
    try:
        static: list[str] = []
        lines = []
        if with_sts:
            # The token service first: every other service fetches its keys at start.
            lines.append(
                sup.wait_ready(sup.spawn("the token service (mesh sts)", ["sts"], "sts: ", stage=3))
            )
        for name, agent in config.agents.items():
            if agent.a2a is not None:
                continue  # a remote A2A agent: nothing to start, the router calls its URL
            for replica in range(agent.replicas):
                port = agent.port if replica == 0 else 0
                label = f"agent {name}" + (
                    f" (replica {replica + 1})" if agent.replicas > 1 else ""
                )
                argv = ["agent", name, "--port", str(port)]
                child = sup.spawn(label, argv, f"agent {name}: ", service=name, stage=2)
                line = sup.wait_ready(child)
                lines.append(line)
                static += ["--static", f"{name}={line.split(': ', 1)[1]}"]
        router = sup.spawn(
            "the router",
            ["router", "--port", str(router_port), *static],
            "router: ",
            service="router",
            stage=1,
        )
        address = sup.wait_ready(router).split(": ", 1)[1]
        if config.a2a.enabled:
            edge = ["a2a", "--router", address, "--port", str(config.a2a.port)]
            lines.append(sup.wait_ready(sup.spawn("the A2A edge (mesh a2a)", edge, "a2a: ")))
        for line in lines:
            print(line, flush=True)
        print(f"router: {address}", flush=True)
        for line in try_lines(config, address):
            print(f"try: {line}", flush=True)
        print("mesh up: running; Ctrl-C stops everything", flush=True)
        sup.watch()
    except _Stopped:
        pass
    except CommandError:
        failed = True
        raise
    finally:
        codes = sup.stop_all()
    return 0 if not failed and all(c == 0 for c in codes) else 1


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run the router and every agent, each its own process")
    add_config(p)
    p.add_argument("--router-port", type=int, help="router port (default: router.port; 0 = any)")
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop everything, as Ctrl-C does, when the process that started mesh up "
        "exits, even by kill -9 (`make run` uses it; Linux only). Not for nohup or a "
        "process manager, where mesh up should outlive its parent",
    )
    p.set_defaults(func=cmd_up)
