"""``python -m benchmarks``: start the servers, interleave the cases, write the report.

Every case runs once per repetition, in a new shuffled order each time, so that
the machine's noise falls on all of them alike; the report gives the median over
repetitions and the spread (half the min-max range, relative to the median).
Ratios are medians of per-repetition ratios of cases that ran in the same
repetition. The bench uses the mesh only from outside: its processes (``mesh agent``,
``mesh router``, ``mesh sts``, ``mesh token``), its mesh file and the ``mesh.v1``
gRPC contract.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import CHUNK_CHARS, LONG_MESSAGE, LONG_REPLY, SHORT_MESSAGE, eprint
from benchmarks.machine import load_average, machine_info
from benchmarks.procs import REPO, LoadGenProcess, Service
from benchmarks.report import render_markdown, write_docs

RESULTS = REPO / "benchmarks" / "results"
CONCURRENCY = (1, 16, 128)
HOLD_COUNTS = (1000, 10000)
#: Messages of history the router hands the agent per turn in the bench's mesh files.
HISTORY_LIMIT = 20
DEFAULT_HISTORY_LIMIT = 200
"""``router.store.history_limit`` as shipped: one router row runs with it."""
SAMPLED = 0.1
"""The share of turns the sampled tracing row records (`OTEL_TRACES_SAMPLER_ARG`)."""
SAMPLED_ROW = "router tracing 10%"


@dataclass
class Case:
    """One measured cell: a target, a load shape, and the processes that do the work."""

    key: str
    group: str
    target: str
    loadgen: str
    kind: str
    address: str
    concurrency: int
    servers: list[str]
    message: str = SHORT_MESSAGE
    agent: str = ""
    conversation: str = "worker"
    metadata: list[tuple[str, str]] = field(default_factory=list)
    users: list[list[tuple[str, str]]] = field(default_factory=list)
    """Per-user metadata (a bearer each): load worker i is user i, as clients are."""
    tls_ca: str = ""


def _server_block() -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "idle_stream_timeout_s": 3600,
        "max_concurrent_rpcs": 30000,
        "max_concurrent_streams": 20000,
        "max_message_bytes": 64 * 1024 * 1024,
        "grace_period_s": 1,
    }


def mesh_file(
    directory: Path,
    name: str,
    *,
    store: str = "memory",
    auth: bool = False,
    tls: bool = False,
    history_limit: int = HISTORY_LIMIT,
) -> Path:
    data: dict[str, Any] = {
        "name": f"bench-{name}",
        "data_dir": str(directory / ("data-auth" if auth else f"data-{name}")),
        "server": _server_block(),
        "router": {
            "default_agent": "a",
            "store": {"kind": store, "history_limit": history_limit},
        },
        "agents": {
            "a": {
                "description": "answers (offline model)",
                "provider": {
                    "kind": "offline",
                    "chunk_chars": CHUNK_CHARS,
                    "rules": [{"contains": "long", "reply": LONG_REPLY}],
                },
            },
            "front": {
                "description": "transfers every turn to a",
                "provider": {
                    "kind": "offline",
                    "rules": [{"matches": ".", "handoff": "a", "reason": "bench"}],
                },
                "handoffs": [{"target": "a", "modes": ["transfer"]}],
            },
        },
    }
    if auth:
        data["auth"] = {"enabled": True, "sts": {"port": 0}, "tls": {"enabled": tls}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def role(service: str) -> str:
    """The column a process's CPU goes in: router, agent, proxy or redis."""
    for prefix in ("router", "agent", "proxy", "redis"):
        if service.startswith(prefix):
            return prefix
    return service


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.services: dict[str, Service] = {}
        self.loadgens: dict[str, LoadGenProcess] = {}
        self.notes: list[str] = []
        self.hold_rows: list[dict[str, Any]] = []
        self.tls_ca = ""
        self.users: list[str] = []
        """A user token per load worker for the auth cases."""

    # -- processes ----------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: list[str],
        prefix: str,
        *,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> Service:
        eprint(f"  starting {name}")
        service = Service(name, argv, prefix, self.logs, env=env, command=command)
        self.services[name] = service
        return service

    def agent(self, name: str, config: Path, agent: str, uv: bool = True) -> Service:
        argv = ["benchmarks.serve", *(["--uvloop"] if uv else [])]
        argv += ["agent", agent, "--config", str(config), "--port", "0"]
        return self.start(name, argv, f"agent {agent}: ")

    def router(
        self,
        name: str,
        config: Path,
        agents: dict[str, Service],
        uv: bool = True,
        env: dict[str, str] | None = None,
    ) -> Service:
        argv = ["benchmarks.serve", *(["--uvloop"] if uv else [])]
        argv += ["router", "--config", str(config), "--port", "0"]
        for agent, service in agents.items():
            argv += ["--static", f"{agent}={service.address}"]
        return self.start(name, argv, "router: ", env=env)

    def proxy(self, name: str, upstream: Service, uv: bool = True) -> Service:
        argv = ["benchmarks.proxy", "--upstream", upstream.address]
        return self.start(name, [*argv, *(["--uvloop"] if uv else [])], "proxy: ")

    def redis(self) -> str | None:
        """A redis-server of our own on a unix socket; its URL, or None without Redis."""
        server = shutil.which("redis-server")
        if server is None:
            setup = subprocess.run([str(REPO / "scripts" / "ensure-redis.sh")], check=False)
            server = shutil.which("redis-server") if setup.returncode == 0 else None
        if server is None:
            self.notes.append("redis-server is not installed: the Redis rows were skipped")
            return None
        sock = self.work / "redis.sock"
        command = [server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.work)]
        self.start("redis", [], "ready to accept connections", command=command)
        return f"unix://{sock}"

    def start_all(self) -> dict[str, str]:
        base = mesh_file(self.work, "base")
        a = self.agent("agent-a", base, "a")
        front = self.agent("agent-front", base, "front")
        self.proxy("proxy", a)
        self.router("router", base, {"a": a, "front": front})
        long = mesh_file(self.work, "history", history_limit=DEFAULT_HISTORY_LIMIT)
        self.router("router-history", long, {"a": a})
        if self.args.sqlite:
            sqlite = mesh_file(self.work, "sqlite", store="sqlite")
            self.router("router-sqlite", sqlite, {"a": a})
        if self.args.redis and (url := self.redis()):
            redis = mesh_file(self.work, "redis", store="redis")
            self.router("router-redis", redis, {"a": a}, env={"MESH_REDIS_URL": url})
        if self.args.asyncio:  # the same three on plain asyncio (MESH_EVENT_LOOP=asyncio)
            a_plain = self.agent("agent-a-asyncio", base, "a", uv=False)
            self.proxy("proxy-asyncio", a_plain, uv=False)
            self.router("router-asyncio", base, {"a": a_plain}, uv=False)
        tokens = self._start_auth() if self.args.auth else {}
        if self.args.tracing:
            self._start_traced(base)
        self.loadgens["asyncio"] = LoadGenProcess("loadgen", False, self.logs)
        return tokens

    def _start_auth(self) -> dict[str, str]:
        path = mesh_file(self.work, "auth", auth=True)
        self.start("sts", ["mesh", "sts", "--config", str(path), "--port", "0"], "sts: ")
        a = self.agent("agent-a-auth", path, "a")
        self.router("router-auth", path, {"a": a})
        tls = mesh_file(self.work, "auth-tls", auth=True, tls=True)
        a_tls = self.agent("agent-a-tls", tls, "a")
        self.router("router-tls", tls, {"a": a_tls})
        self.tls_ca = str(self.work / "data-auth" / "sts" / "tls" / "ca.pem")
        token = subprocess.run(
            [*(sys.executable, "-m", "mesh", "token", "--config", str(path)), "--sub", "bench"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=REPO,
        ).stdout.strip()
        # One user per load worker (a router holds at most router.max_streams_per_user
        # streams of one user): minted with the token service's key, as `mesh token` does.
        from mesh.auth.sts import mint_user_token
        from mesh.config import load_config

        config = load_config(path)
        workers = max(CONCURRENCY)
        self.users = [mint_user_token(config, f"bench-{i:03d}") for i in range(workers)]
        return {"router": token}

    def _start_traced(self, base: Path) -> None:
        """A router and agent exporting every span over OTLP to a local receiver."""
        sink = self.start("otlp-sink", ["benchmarks.otlp_sink"], "otlp: ")
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.address}
        argv = ["benchmarks.serve", "agent", "a", "--config", str(base), "--port", "0"]
        a = self.start("agent-a-traced", argv, "agent a: ", env=env)
        self.router("router-traced", base, {"a": a}, env=env)
        # The same, recording one turn in ten (the agent follows the router's decision).
        env = {**env, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
        env["OTEL_TRACES_SAMPLER_ARG"] = str(SAMPLED)
        a = self.start("agent-a-sampled", argv, "agent a: ", env=env)
        self.router("router-sampled", base, {"a": a}, env=env)

    def stop_all(self) -> None:
        for loadgen in self.loadgens.values():
            loadgen.stop()
        for service in reversed(list(self.services.values())):
            service.stop()

    # -- cases --------------------------------------------------------------------------

    def cases(self, tokens: dict[str, str]) -> list[Case]:
        s = self.services
        out: list[Case] = []
        bearer = [("authorization", f"Bearer {tokens['router']}")] if tokens else []

        def spec(kind: str, service: str, servers: list[str], **extra: Any) -> dict[str, Any]:
            return {"kind": kind, "address": s[service].address, "servers": servers, **extra}

        grid: list[tuple[str, dict[str, Any]]] = [
            ("direct", spec("agent", "agent-a", ["agent-a"])),
            ("raw proxy", spec("agent", "proxy", ["proxy", "agent-a"])),
            ("router", spec("router", "router", ["router", "agent-a"])),
            (
                f"router history {DEFAULT_HISTORY_LIMIT}",
                spec("router", "router-history", ["router-history", "agent-a"]),
            ),
        ]
        if "router-sqlite" in s:
            servers = ["router-sqlite", "agent-a"]
            grid.append(("router SQLite", spec("router", "router-sqlite", servers)))
        if "router-redis" in s:
            servers = ["router-redis", "agent-a", "redis"]
            grid.append(("router Redis", spec("router", "router-redis", servers)))
        if tokens:
            users = [[("authorization", f"Bearer {t}")] for t in self.users]
            servers = ["router-auth", "agent-a-auth"]
            auth = spec("router", "router-auth", servers, metadata=bearer, users=users)
            grid.append(("router auth", auth))
            servers = ["router-tls", "agent-a-tls"]
            tls = spec(
                "router", "router-tls", servers, metadata=bearer, users=users, tls_ca=self.tls_ca
            )
            grid.append(("router auth+TLS", tls))
        if "router-traced" in s:
            servers = ["router-traced", "agent-a-traced", "otlp-sink"]
            grid.append(("router tracing", spec("router", "router-traced", servers)))
        servers = ["router", "agent-front", "agent-a"]
        grid.append(("transfer", spec("router", "router", servers, agent="front")))
        targets = dict(grid)
        for name, kw in grid:
            for c in CONCURRENCY:
                key = f"turns/{name}/c{c}"
                out.append(Case(key, "turns", name, "asyncio", concurrency=c, **kw))
        if "router-sampled" in s:
            name = SAMPLED_ROW
            servers = ["router-sampled", "agent-a-sampled", "otlp-sink"]
            kw = spec("router", "router-sampled", servers)
            out.append(Case(f"turns/{name}/c16", "turns", name, "asyncio", concurrency=16, **kw))
        # Every turn a new conversation (no history to load, a new conversation to store).
        fresh = [("router", c) for c in CONCURRENCY]
        fresh += [(n, 16) for n in ("router SQLite", "router Redis", "transfer") if n in targets]
        for name, c in fresh:
            out.append(
                Case(
                    f"newconv/{name}/c{c}",
                    "newconv",
                    name,
                    "asyncio",
                    concurrency=c,
                    conversation="turn",
                    **targets[name],
                )
            )
        for name, label in (("direct", "0 hops"), ("raw proxy", "raw proxy"), ("router", "1 hop")):
            kw = {**targets[name], "message": LONG_MESSAGE}
            out.append(Case(f"stream/{label}", "stream", label, "asyncio", concurrency=1, **kw))
        if self.args.asyncio:
            plain = {
                "direct": spec("agent", "agent-a-asyncio", ["agent-a-asyncio"]),
                "raw proxy": spec("agent", "proxy-asyncio", ["proxy-asyncio", "agent-a-asyncio"]),
                "router": spec("router", "router-asyncio", ["router-asyncio", "agent-a-asyncio"]),
            }
            for name, kw in plain.items():
                key = f"asyncio/{name}/c16"
                out.append(Case(key, "asyncio", name, "asyncio", concurrency=16, **kw))
        return out

    def warm(self, cases: list[Case]) -> None:
        seen: set[tuple[str, str, str]] = set()
        for case in cases:
            key = (case.loadgen, case.address, case.agent)
            if key in seen:
                continue
            seen.add(key)
            for _attempt in range(20):
                result = self.measure(case, warmup=0.0, duration=0.3, concurrency=2)
                if result["errors"] == 0 and result["turns"] > 0:
                    break
                time.sleep(0.25)
            else:
                raise RuntimeError(f"{case.key} never answered: {result['error_samples']}")

    def measure(
        self,
        case: Case,
        *,
        warmup: float,
        duration: float,
        concurrency: int | None = None,
    ) -> dict[str, Any]:
        loadgen = self.loadgens[case.loadgen]
        return loadgen.request(
            {
                "op": "turns",
                "kind": case.kind,
                "address": case.address,
                "agent": case.agent,
                "message": case.message,
                "metadata": case.metadata,
                "users": case.users,
                "conversation": case.conversation,
                "tls_ca": case.tls_ca,
                "concurrency": concurrency or case.concurrency,
                "warmup": warmup,
                "duration": duration,
                "pids": {name: self.services[name].pid for name in case.servers},
            }
        )

    # -- idle streams held by one router ------------------------------------------------

    def hold(self) -> list[dict[str, Any]]:
        base = mesh_file(self.work, "hold")
        a = self.services["agent-a"]
        router = self.router("router-hold", base, {"a": a})
        loadgen = self.loadgens["asyncio"]
        servers = ["router-hold"]
        case = Case("hold", "hold", "router", "asyncio", "router", router.address, 1, servers)
        self.warm([case])
        rows = self.hold_rows  # kept by main() even if a later step fails
        baseline = router.rss()
        rows.append({"streams": 0, "router_rss_mib": baseline, "open_s": 0.0, "errors": 0})
        held = 0
        for count in self.args.hold:
            result = loadgen.request(
                {
                    "op": "hold",
                    "address": router.address,
                    "count": count - held,
                    "message": SHORT_MESSAGE,
                    "per_channel": 1000,
                    "parallel": 200,
                }
            )
            held = int(result["held"])
            rss = router.rss()
            rows.append(
                {
                    "requested": count,
                    "streams": held,
                    "router_rss_mib": rss,
                    "kib_per_stream": (rss - baseline) * 1024 / held if held else 0.0,
                    "open_s": result["seconds"],
                    "errors": result["errors"],
                    "error_samples": result["error_samples"],
                }
            )
            eprint(f"  holding {held} streams: router RSS {rss:.0f} MiB")
        loadgen.request({"op": "release"})
        router.stop()
        del self.services["router-hold"]
        return rows


METRICS = (
    "turns_per_s",
    "deltas_per_s",
    "p50_ms",
    "p99_ms",
    "ttfd_p50_ms",
    "ttfd_p99_ms",
)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, reps in runs.items():
        row: dict[str, Any] = {"reps": len(reps), "errors": sum(int(r["errors"]) for r in reps)}
        for metric in METRICS:
            values = [float(r[metric]) for r in reps]
            median = statistics.median(values)
            spread = (max(values) - min(values)) / 2 / median * 100 if median else 0.0
            row[metric] = median
            row[metric + "_spread_pct"] = spread
        processes = reps[0]["cpu_ms_per_turn"].keys()
        row["cpu_ms_per_turn"] = {
            name: statistics.median(float(r["cpu_ms_per_turn"][name]) for r in reps)
            for name in processes
        }
        samples = [s for r in reps for s in r.get("error_samples", [])]
        row["error_samples"] = samples[:3]
        out[key] = row
    return out


def paired_ratio(
    runs: dict[str, list[dict[str, Any]]], num: str, den: str, metric: str = "turns_per_s"
) -> float | None:
    """Median over repetitions of num/den for one metric (cases of the same repetition)."""
    if num not in runs or den not in runs:
        return None
    values = [
        float(a[metric]) / float(b[metric])
        for a, b in zip(runs[num], runs[den], strict=False)
        if float(b[metric])
    ]
    return statistics.median(values) if values else None


def ratio_pairs() -> list[tuple[str, str, str]]:
    pairs: list[tuple[str, str, str]] = []
    for c in CONCURRENCY:
        t = f"c{c}"
        pairs += [
            (f"router/direct c={c}", f"turns/router/{t}", f"turns/direct/{t}"),
            (f"router/raw proxy c={c}", f"turns/router/{t}", f"turns/raw proxy/{t}"),
            (f"raw proxy/direct c={c}", f"turns/raw proxy/{t}", f"turns/direct/{t}"),
            (f"transfer/direct c={c}", f"turns/transfer/{t}", f"turns/direct/{t}"),
            (f"SQLite/memory store c={c}", f"turns/router SQLite/{t}", f"turns/router/{t}"),
            (f"Redis/memory store c={c}", f"turns/router Redis/{t}", f"turns/router/{t}"),
            (f"auth/no auth c={c}", f"turns/router auth/{t}", f"turns/router/{t}"),
            (f"auth+TLS/no auth c={c}", f"turns/router auth+TLS/{t}", f"turns/router/{t}"),
            (f"auth+TLS/auth c={c}", f"turns/router auth+TLS/{t}", f"turns/router auth/{t}"),
            (f"tracing/no tracing c={c}", f"turns/router tracing/{t}", f"turns/router/{t}"),
            (f"sampled tracing/no tracing c={c}", f"turns/{SAMPLED_ROW}/{t}", f"turns/router/{t}"),
            (
                f"history {DEFAULT_HISTORY_LIMIT}/{HISTORY_LIMIT} c={c}",
                f"turns/router history {DEFAULT_HISTORY_LIMIT}/{t}",
                f"turns/router/{t}",
            ),
            (
                f"router/direct, a new conversation every turn c={c}",
                f"newconv/router/{t}",
                f"turns/direct/{t}",
            ),
            (
                f"router, new conversation/kept conversation c={c}",
                f"newconv/router/{t}",
                f"turns/router/{t}",
            ),
        ]
    for store in ("SQLite", "Redis"):
        pairs.append(
            (
                f"{store}/memory store, new conversations c=16",
                f"newconv/router {store}/c16",
                "newconv/router/c16",
            )
        )
    pairs += [
        ("transfer/direct, new conversations c=16", "newconv/transfer/c16", "turns/direct/c16"),
        ("1 hop/0 hops streaming", "stream/1 hop", "stream/0 hops"),
        ("raw proxy/0 hops streaming", "stream/raw proxy", "stream/0 hops"),
    ]
    for name in ("direct", "raw proxy", "router"):
        pairs.append((f"{name}: uvloop/asyncio c=16", f"turns/{name}/c16", f"asyncio/{name}/c16"))
    return pairs


def ratios(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for name, num, den in ratio_pairs():
        # A streamed turn is one long reply: its rate is deltas, not turns.
        metric = "deltas_per_s" if num.startswith("stream/") else "turns_per_s"
        throughput = paired_ratio(runs, num, den, metric)
        if throughput is None:
            continue
        out.append(
            {
                "ratio": name,
                "num": num,
                "den": den,
                "throughput": throughput,
                "p50": paired_ratio(runs, num, den, "p50_ms"),
                "deltas": paired_ratio(runs, num, den, "deltas_per_s"),
                "metric": metric,
                "reps": [
                    float(a[metric]) / float(b[metric])
                    for a, b in zip(runs[num], runs[den], strict=False)
                    if float(b[metric])
                ],
            }
        )
    return out


def _ratio(report_ratios: list[dict[str, Any]], name: str) -> float | None:
    for r in report_ratios:
        if r["ratio"] == name:
            value: float = r["throughput"]
            return value
    return None


def targets(
    summary: dict[str, dict[str, Any]], found: list[dict[str, Any]], hold: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, each with the value this run measured and whether it holds."""
    out: list[dict[str, Any]] = []

    def ratio_target(label: str, name: str, minimum: float) -> None:
        value = _ratio(found, name)
        out.append(
            {
                "target": f"{label} >= {minimum:g}",
                "measured": None if value is None else round(value, 3),
                "unit": "x",
                "holds": None if value is None else value >= minimum,
            }
        )

    for c in (16, 128):
        ratio_target(f"router/direct turns/s c={c}", f"router/direct c={c}", 0.6)
    for c in CONCURRENCY:
        ratio_target(f"router/raw proxy turns/s c={c}", f"router/raw proxy c={c}", 0.95)
    ratio_target("SQLite/memory store c=16", "SQLite/memory store c=16", 0.85)
    ratio_target("Redis/memory store c=16", "Redis/memory store c=16", 0.8)
    ratio_target("auth on/auth off c=16", "auth/no auth c=16", 0.9)
    tls = _ratio(found, "auth+TLS/no auth c=16")
    out.append(
        {
            "target": "auth+TLS/auth off c=16 (reported)",
            "measured": None if tls is None else round(tls, 3),
            "unit": "x",
            "holds": None,
        }
    )
    ratio_target("tracing on/off through the router c=16", "tracing/no tracing c=16", 0.9)
    ratio_target("transfer/direct turns/s c=16", "transfer/direct c=16", 0.4)
    row = summary.get("turns/router/c16")
    cpu = row["cpu_ms_per_turn"].get("router") if row else None
    out.append(
        {
            "target": "router process CPU per turn c=16 <= 0.5 ms",
            "measured": None if cpu is None else round(cpu, 3),
            "unit": "ms",
            "holds": None if cpu is None else cpu <= 0.5,
        }
    )
    big = [r for r in hold if r.get("requested", 0) >= 10000]
    if big:
        r = big[-1]
        ok = r["errors"] == 0 and r["kib_per_stream"] <= 35
        measured = (
            f"{r['streams']:,} of {r['requested']:,} streams open, {r['errors']} errors, "
            f"{r['kib_per_stream']:.1f} KiB per stream"
        )
    else:
        ok, measured = None, "not run (needs --hold 10000)"
    out.append(
        {
            "target": "10,000 idle Chat streams: 0 errors, router RSS <= 35 KiB per stream",
            "measured": measured,
            "unit": "",
            "holds": ok,
        }
    )
    return out


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
        eprint(f"work dir kept: {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
            yield Path(tmp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--reps", type=int, default=5, help="repetitions of every case")
    p.add_argument("--duration", type=float, default=1.5, help="measured seconds per case")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    p.add_argument("--quick", action="store_true", help="1 repetition, short windows (development)")
    p.add_argument("--no-auth", dest="auth", action="store_false", help="skip the auth cases")
    p.add_argument(
        "--no-asyncio",
        dest="asyncio",
        action="store_false",
        help="skip the cases with the services on plain asyncio (every other row runs them on "
        "uvloop, their default)",
    )
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip SQLite cases")
    p.add_argument("--no-redis", dest="redis", action="store_false", help="skip Redis cases")
    p.add_argument(
        "--no-tracing", dest="tracing", action="store_false", help="skip the tracing-on cases"
    )
    p.add_argument(
        "--hold",
        type=int,
        nargs="*",
        default=list(HOLD_COUNTS),
        help="idle streams one router holds (cumulative steps)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/json go")
    p.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite docs/benchmarks.md and the README's table from this run "
        "(default: yes, but not for --quick)",
    )
    p.add_argument("--seed", type=int, default=7, help="seed of the case order")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    if args.docs is None:
        args.docs = not args.quick
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 1.0, 0.3
        args.hold = [min(h, 1000) for h in args.hold][:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_before = load_average()
    rng = random.Random(args.seed)
    with _workdir(args.keep) as work:
        bench = Bench(args, work)
        try:
            eprint("starting servers")
            tokens = bench.start_all()
            cases = bench.cases(tokens)
            eprint(f"warming {len(cases)} cases")
            bench.warm(cases)
            runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in cases}
            for rep in range(args.reps):
                order = cases[:]
                rng.shuffle(order)
                eprint(f"repetition {rep + 1}/{args.reps} ({len(order)} cases)")
                for case in order:
                    result = bench.measure(case, warmup=args.warmup, duration=args.duration)
                    result["rep"] = rep
                    runs[case.key].append(result)
            eprint("holding idle streams")
            try:
                hold = bench.hold() if args.hold else []
            except RuntimeError as err:  # keep the measured cases even if this part fails
                eprint(f"holding idle streams failed: {err}")
                hold = [
                    *bench.hold_rows,
                    {"streams": 0, "router_rss_mib": 0.0, "errors": 1, "failed": str(err)},
                ]
            loops = {name: lg.loop for name, lg in bench.loadgens.items()}
        finally:
            bench.stop_all()
    summary = summarize(runs)
    found = ratios(runs)
    report: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "elapsed_s": round(time.time() - started, 1),
        "quick": args.quick,
        "settings": {
            "reps": args.reps,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "seed": args.seed,
            "loops": loops,
            "short_message": SHORT_MESSAGE,
            "long_reply_chars": len(LONG_REPLY),
            "chunk_chars": CHUNK_CHARS,
            "history_limit": HISTORY_LIMIT,
        },
        "machine": {
            **machine_info(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "notes": bench.notes,
        "cases": {
            c.key: {
                "group": c.group,
                "target": c.target,
                "concurrency": c.concurrency,
                "conversation": c.conversation,
                "loadgen": c.loadgen,
                "servers": c.servers,
            }
            for c in cases
        },
        "summary": summary,
        "ratios": found,
        "targets": targets(summary, found, hold),
        "hold": hold,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    markdown = render_markdown(report)
    (args.out / "latest.md").write_text(markdown)
    if args.docs:
        write_docs(report, REPO / "docs" / "benchmarks.md", REPO / "README.md")
    print(markdown)
    eprint(f"wrote {args.out / 'latest.md'} and latest.json in {report['elapsed_s']} s")
    return 0
