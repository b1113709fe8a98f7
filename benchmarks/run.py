"""``python -m benchmarks``: start the servers, interleave the cases, write the report.

Every case runs once per repetition, in a new shuffled order each time, so that
the machine's noise falls on all of them alike; the report gives the median over
repetitions and the spread (half the min-max range, relative to the median).
Ratios are medians of per-repetition ratios of cases that ran in the same
repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import CHUNK_CHARS, LONG_MESSAGE, LONG_REPLY, SHORT_MESSAGE, eprint
from benchmarks.machine import machine_info
from benchmarks.procs import REPO, LoadGenProcess, Service
from benchmarks.report import render_markdown

RESULTS = REPO / "benchmarks" / "results"
CONCURRENCY = (1, 16, 128)
HOLD_COUNTS = (1000, 10000)


@dataclass
class Case:
    """One measured cell: a target, a load shape, and who does the work."""

    key: str
    group: str
    target: str
    loadgen: str
    kind: str
    address: str
    concurrency: int
    message: str = SHORT_MESSAGE
    agent: str = ""
    fresh: bool = False
    metadata: list[tuple[str, str]] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)


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
    keep_streams: bool = True,
) -> Path:
    data: dict[str, Any] = {
        "name": f"bench-{name}",
        "data_dir": str(directory / f"data-{name}"),
        "server": _server_block(),
        "router": {
            "default_agent": "a",
            "store": {"kind": store},
            # 0: the router opens a new agent Chat stream for every turn (the old way).
            "keep_agent_streams_s": 5.0 if keep_streams else 0.0,
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
        data["auth"] = {"enabled": True, "sts": {"port": 0}}
        data["data_dir"] = str(directory / "data-auth")
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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

    # -- processes ----------------------------------------------------------------------

    def start(self, name: str, argv: list[str], prefix: str) -> Service:
        eprint(f"  starting {name}")
        service = Service(name, argv, prefix, self.logs)
        self.services[name] = service
        return service

    def agent(self, name: str, config: Path, agent: str, uv: bool = False) -> Service:
        argv = ["benchmarks.serve", *(["--uvloop"] if uv else [])]
        argv += ["agent", agent, "--config", str(config), "--port", "0"]
        return self.start(name, argv, f"agent {agent}: ")

    def router(
        self, name: str, config: Path, agents: dict[str, Service], uv: bool = False
    ) -> Service:
        argv = ["benchmarks.serve", *(["--uvloop"] if uv else [])]
        argv += ["router", "--config", str(config), "--port", "0"]
        for agent, service in agents.items():
            argv += ["--static", f"{agent}={service.address}"]
        return self.start(name, argv, "router: ")

    def start_all(self) -> dict[str, str]:
        base = mesh_file(self.work, "base")
        tokens: dict[str, str] = {}
        self.start("echo", ["benchmarks.echo"], "echo: ")
        a = self.agent("agent-a", base, "a")
        front = self.agent("agent-front", base, "front")
        self.router("router", base, {"a": a, "front": front})
        if self.args.sqlite:
            sqlite = mesh_file(self.work, "sqlite", store="sqlite")
            self.router("router-sqlite", sqlite, {"a": a, "front": front})
        fresh_agent_streams = mesh_file(self.work, "nokeep", keep_streams=False)
        self.router("router-nokeep", fresh_agent_streams, {"a": a, "front": front})
        if self.args.uvloop:
            self.start("echo-uv", ["benchmarks.echo", "--uvloop"], "echo: ")
            a_uv = self.agent("agent-a-uv", base, "a", uv=True)
            self.router("router-uv", base, {"a": a_uv}, uv=True)
        if self.args.auth:
            tokens = self._start_auth()
        self.loadgens["asyncio"] = LoadGenProcess("loadgen", False, self.logs)
        if self.args.uvloop:
            self.loadgens["uvloop"] = LoadGenProcess("loadgen-uv", True, self.logs)
        return tokens

    def _start_auth(self) -> dict[str, str]:
        from mesh.auth.sts import mint_user_token
        from mesh.config import load_config

        path = mesh_file(self.work, "auth", auth=True)
        self.start("sts", ["benchmarks.serve", "sts", "--config", str(path)], "sts: ")
        a = self.agent("agent-a-auth", path, "a")
        front = self.agent("agent-front-auth", path, "front")
        self.router("router-auth", path, {"a": a, "front": front})
        config = load_config(path)
        return {
            "router": mint_user_token(config, "bench-user", ttl_s=7200),
            "a": mint_user_token(
                config, "bench-user", ttl_s=7200, audience=config.auth.audience_for("a")
            ),
        }

    def stop_all(self) -> None:
        for loadgen in self.loadgens.values():
            loadgen.stop()
        for service in reversed(list(self.services.values())):
            service.stop()

    # -- cases --------------------------------------------------------------------------

    def cases(self, tokens: dict[str, str]) -> list[Case]:
        s = self.services
        out: list[Case] = []
        bearer_router = [("authorization", f"Bearer {tokens['router']}")] if tokens else []
        bearer_a = [("authorization", f"Bearer {tokens['a']}")] if tokens else []

        def targets(auth: bool) -> list[tuple[str, dict[str, Any]]]:
            suffix = "-auth" if auth else ""
            router_md = bearer_router if auth else []
            return [
                (
                    "direct" + (" +auth" if auth else ""),
                    {
                        "kind": "agent",
                        "address": s[f"agent-a{suffix}"].address,
                        "metadata": bearer_a if auth else [],
                        "servers": [f"agent-a{suffix}"],
                    },
                ),
                (
                    "router" + (" +auth" if auth else ""),
                    {
                        "kind": "router",
                        "address": s[f"router{suffix}"].address,
                        "metadata": router_md,
                        "servers": [f"router{suffix}", f"agent-a{suffix}"],
                    },
                ),
                (
                    "transfer" + (" +auth" if auth else ""),
                    {
                        "kind": "router",
                        "address": s[f"router{suffix}"].address,
                        "agent": "front",
                        "metadata": router_md,
                        "servers": [f"router{suffix}", f"agent-front{suffix}", f"agent-a{suffix}"],
                    },
                ),
            ]

        bare = ("bare", {"kind": "bare", "address": s["echo"].address, "servers": ["echo"]})
        grid = [bare, *targets(False)]
        if tokens:
            grid += targets(True)
        for name, spec in grid:
            for c in CONCURRENCY:
                out.append(
                    Case(f"turns/{name}/c{c}", "turns", name, "asyncio", concurrency=c, **spec)
                )
        stream_names = {"bare": "bare", "direct": "0 hops", "router": "1 hop", "transfer": "2 hops"}
        for name, spec in grid:
            if name in stream_names or name == "router +auth":
                label = stream_names.get(name, "1 hop +auth")
                out.append(
                    Case(
                        f"stream/{label}",
                        "stream",
                        label,
                        "asyncio",
                        concurrency=1,
                        message=LONG_MESSAGE,
                        **spec,
                    )
                )
        for name, spec in grid:
            if name in ("bare", "direct", "router", "direct +auth", "router +auth"):
                out.append(
                    Case(
                        f"fresh/{name}",
                        "fresh",
                        name,
                        "asyncio",
                        concurrency=16,
                        fresh=True,
                        **spec,
                    )
                )
        for c in (1, 16):
            out.append(
                Case(
                    f"nokeep/router/c{c}",
                    "nokeep",
                    "router (new agent stream per turn)",
                    "asyncio",
                    "router",
                    s["router-nokeep"].address,
                    c,
                    servers=["router-nokeep", "agent-a"],
                )
            )
        if "router-sqlite" in s:
            for c in (1, 16):
                out.append(
                    Case(
                        f"sqlite/router/c{c}",
                        "sqlite",
                        "router (SQLite store)",
                        "asyncio",
                        "router",
                        s["router-sqlite"].address,
                        c,
                        servers=["router-sqlite", "agent-a"],
                    )
                )
        if self.args.uvloop:
            plain = {
                "bare": ("bare", s["echo"].address, ["echo"]),
                "direct": ("agent", s["agent-a"].address, ["agent-a"]),
                "router": ("router", s["router"].address, ["router", "agent-a"]),
            }
            fast = {
                "bare": ("bare", s["echo-uv"].address, ["echo-uv"]),
                "direct": ("agent", s["agent-a-uv"].address, ["agent-a-uv"]),
                "router": ("router", s["router-uv"].address, ["router-uv", "agent-a-uv"]),
            }
            for target in ("bare", "direct", "router"):
                for label, loop, table in (
                    ("client uvloop", "uvloop", plain),
                    ("servers uvloop", "asyncio", fast),
                    ("both uvloop", "uvloop", fast),
                ):
                    kind, address, servers = table[target]
                    out.append(
                        Case(
                            f"uvloop/{target}/{label}",
                            "uvloop",
                            f"{target} · {label}",
                            loop,
                            kind,
                            address,
                            16,
                            servers=servers,
                        )
                    )
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
        servers = [self.services[name] for name in case.servers]
        cpu0 = [p.cpu() for p in servers]
        lg0 = loadgen.cpu()
        wall0 = time.monotonic()
        result = loadgen.request(
            {
                "op": "turns",
                "kind": case.kind,
                "address": case.address,
                "agent": case.agent,
                "message": case.message,
                "metadata": case.metadata,
                "fresh": case.fresh,
                "concurrency": concurrency or case.concurrency,
                "warmup": warmup,
                "duration": duration,
            }
        )
        wall = time.monotonic() - wall0
        server_cpu = sum(p.cpu() - c0 for p, c0 in zip(servers, cpu0, strict=True))
        lg_cpu = loadgen.cpu() - lg0
        # CPU is read over the whole call (warm-up included): scale to the window.
        share = duration / wall if wall > 0 else 0.0
        turns = max(int(result["turns"]), 1)
        result["server_cpu_ms_per_turn"] = server_cpu * share / turns * 1000
        result["loadgen_cpu_ms_per_turn"] = lg_cpu * share / turns * 1000
        result["cpu_busy_pct"] = (server_cpu + lg_cpu) / wall * 100 if wall > 0 else 0.0
        return result

    # -- idle streams held by one router ------------------------------------------------

    def hold(self) -> list[dict[str, Any]]:
        base = mesh_file(self.work, "hold")
        a = self.services["agent-a"]
        router = self.router("router-hold", base, {"a": a})
        loadgen = self.loadgens["asyncio"]
        case = Case(
            "hold",
            "hold",
            "router",
            "asyncio",
            "router",
            router.address,
            1,
            servers=["router-hold"],
        )
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
        time.sleep(1.0)  # let the router notice the cancels before reading its memory
        rows.append({"streams": 0, "after_release": True, "router_rss_mib": router.rss()})
        router.stop()
        del self.services["router-hold"]
        return rows


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, reps in runs.items():
        row: dict[str, Any] = {"reps": len(reps), "errors": sum(int(r["errors"]) for r in reps)}
        for metric in (
            "turns_per_s",
            "deltas_per_s",
            "p50_ms",
            "p99_ms",
            "ttfd_p50_ms",
            "ttfd_p99_ms",
            "server_cpu_ms_per_turn",
            "loadgen_cpu_ms_per_turn",
            "cpu_busy_pct",
        ):
            values = [float(r[metric]) for r in reps]
            median = statistics.median(values)
            spread = (max(values) - min(values)) / 2 / median * 100 if median else 0.0
            row[metric] = median
            row[metric + "_spread_pct"] = spread
        samples = [s for r in reps for s in r.get("error_samples", [])]
        row["error_samples"] = samples[:3]
        out[key] = row
    return out


def paired_ratio(
    runs: dict[str, list[dict[str, Any]]], num: str, den: str, metric: str
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


def ratios(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    pairs: list[tuple[str, str, str]] = []
    for c in CONCURRENCY:
        pairs += [
            (f"router/direct c={c}", f"turns/router/c{c}", f"turns/direct/c{c}"),
            (f"transfer/direct c={c}", f"turns/transfer/c{c}", f"turns/direct/c{c}"),
            (f"direct/bare c={c}", f"turns/direct/c{c}", f"turns/bare/c{c}"),
            (f"auth/no-auth direct c={c}", f"turns/direct +auth/c{c}", f"turns/direct/c{c}"),
            (f"auth/no-auth router c={c}", f"turns/router +auth/c{c}", f"turns/router/c{c}"),
            (f"auth/no-auth transfer c={c}", f"turns/transfer +auth/c{c}", f"turns/transfer/c{c}"),
        ]
    pairs += [
        ("1 hop/0 hops streaming", "stream/1 hop", "stream/0 hops"),
        ("2 hops/0 hops streaming", "stream/2 hops", "stream/0 hops"),
        ("0 hops/bare streaming", "stream/0 hops", "stream/bare"),
        ("auth/no-auth fresh stream, router", "fresh/router +auth", "fresh/router"),
        ("auth/no-auth fresh stream, direct", "fresh/direct +auth", "fresh/direct"),
    ]
    for target in ("bare", "direct", "router"):
        for label in ("client uvloop", "servers uvloop", "both uvloop"):
            pairs.append(
                (
                    f"{target}: {label}/asyncio c=16",
                    f"uvloop/{target}/{label}",
                    f"turns/{target}/c16",
                )
            )
    pairs.append(("SQLite/memory store c=16", "sqlite/router/c16", "turns/router/c16"))
    for c in (1, 16):
        pairs.append(
            (
                f"kept agent stream/new stream per turn c={c}",
                f"turns/router/c{c}",
                f"nokeep/router/c{c}",
            )
        )
    out = []
    for name, num, den in pairs:
        throughput = paired_ratio(runs, num, den, "turns_per_s")
        if throughput is None:
            continue
        out.append(
            {
                "ratio": name,
                "throughput": throughput,
                "p50": paired_ratio(runs, num, den, "p50_ms"),
                "deltas": paired_ratio(runs, num, den, "deltas_per_s"),
                "server_cpu": paired_ratio(runs, num, den, "server_cpu_ms_per_turn"),
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
    p.add_argument("--quick", action="store_true", help="1 repetition, short windows (smoke)")
    p.add_argument("--no-auth", dest="auth", action="store_false", help="skip the auth cases")
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="skip uvloop cases")
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false", help="skip SQLite cases")
    p.add_argument(
        "--hold",
        type=int,
        nargs="*",
        default=list(HOLD_COUNTS),
        help="idle streams one router holds (cumulative steps)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/json go")
    p.add_argument("--seed", type=int, default=7, help="seed of the case order")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 0.5, 0.2
        args.hold = [min(h, 1000) for h in args.hold][:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
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
    report: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "elapsed_s": round(time.time() - started, 1),
        "settings": {
            "reps": args.reps,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "seed": args.seed,
            "loops": loops,
            "short_message": SHORT_MESSAGE,
            "long_reply_chars": len(LONG_REPLY),
            "chunk_chars": CHUNK_CHARS,
        },
        "machine": machine_info(),
        "cases": {
            c.key: {
                "group": c.group,
                "target": c.target,
                "concurrency": c.concurrency,
                "fresh": c.fresh,
                "loadgen": c.loadgen,
                "servers": c.servers,
            }
            for c in cases
        },
        "summary": summary,
        "ratios": ratios(runs),
        "hold": hold,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    markdown = render_markdown(report)
    (args.out / "latest.md").write_text(markdown)
    print(markdown)
    eprint(f"wrote {args.out / 'latest.md'} and latest.json in {report['elapsed_s']} s")
    return 0
