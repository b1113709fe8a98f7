"""The Markdown report of a run (``benchmarks/results/latest.md``)."""

from __future__ import annotations

from typing import Any


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _spread(row: dict[str, Any], metric: str) -> str:
    return f"±{row.get(metric + '_spread_pct', 0.0):.0f}%"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _rows(report: dict[str, Any], group: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    cases = report["cases"]
    return [
        (key, cases[key], report["summary"][key])
        for key in cases
        if cases[key]["group"] == group and key in report["summary"]
    ]


def headline(report: dict[str, Any]) -> list[str]:
    """The compact table for the README: one row per target."""
    summary = report["summary"]
    targets: list[str] = []
    for _key, case, _row in _rows(report, "turns"):
        if case["target"] not in targets:
            targets.append(case["target"])
    stream_label = {
        "bare": "bare",
        "direct": "0 hops",
        "router": "1 hop",
        "transfer": "2 hops",
        "router +auth": "1 hop +auth",
    }
    rows = []
    for target in targets:

        def get(c: int, metric: str, target: str = target) -> float:
            row = summary.get(f"turns/{target}/c{c}")
            return float(row[metric]) if row else 0.0

        stream = summary.get(f"stream/{stream_label.get(target, '')}")
        rows.append(
            [
                target,
                _num(get(1, "turns_per_s")),
                _num(get(16, "turns_per_s")),
                _num(get(128, "turns_per_s")),
                _ms(get(1, "p50_ms")),
                _ms(get(1, "p99_ms")),
                _ms(get(128, "p99_ms")),
                _ms(get(1, "ttfd_p50_ms")),
                _num(float(stream["deltas_per_s"])) if stream else "-",
                _ms(get(16, "server_cpu_ms_per_turn")),
            ]
        )
    return _table(
        [
            "target",
            "turns/s c=1",
            "c=16",
            "c=128",
            "p50 ms c=1",
            "p99 ms c=1",
            "p99 ms c=128",
            "first delta ms c=1",
            "deltas/s (stream)",
            "server CPU ms/turn c=16",
        ],
        rows,
    )


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated {report['generated']} in {report['elapsed_s']} s by `make bench` "
        f"(`python -m benchmarks`). {s['reps']} repetitions of every case, interleaved in a "
        f"shuffled order; each case {s['warmup_s']} s warm-up + {s['duration_s']} s measured. "
        "Figures are medians over repetitions; ± is half the min-max range.",
        "",
        f"**Machine:** {m['cpu']}, {m['cpus_usable']} usable CPUs, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['implementation']} {m['python']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, uvloop {m['uvloop']}. Loopback only.",
        "",
        f"**Placement:** {m['placement']}.",
        "",
        "## Headline",
        "",
        *headline(report),
        "",
        "## Turns (short reply, one long-lived Chat stream per worker)",
        "",
        f"A turn sends `{s['short_message']}` and reads deltas until the final event "
        f"(reply chunked at {s['chunk_chars']} characters). `c` = concurrent streams.",
        "",
    ]
    rows = []
    for _key, case, row in _rows(report, "turns"):
        rows.append(
            [
                case["target"],
                str(case["concurrency"]),
                f"{_num(row['turns_per_s'])} {_spread(row, 'turns_per_s')}",
                f"{_ms(row['p50_ms'])} {_spread(row, 'p50_ms')}",
                _ms(row["p99_ms"]),
                _ms(row["ttfd_p50_ms"]),
                _ms(row["server_cpu_ms_per_turn"]),
                _ms(row["loadgen_cpu_ms_per_turn"]),
                f"{row['cpu_busy_pct']:.0f}%",
                str(row["errors"]),
            ]
        )
    lines += _table(
        [
            "target",
            "c",
            "turns/s",
            "p50 ms",
            "p99 ms",
            "first delta p50 ms",
            "server CPU ms/turn",
            "client CPU ms/turn",
            "CPU busy",
            "errors",
        ],
        rows,
    )
    lines += ["", "## Ratios (median of per-repetition ratios)", ""]
    rows = []
    for r in report["ratios"]:
        rows.append(
            [
                r["ratio"],
                f"{r['throughput']:.2f}" if r["throughput"] is not None else "-",
                f"{r['p50']:.2f}" if r["p50"] is not None else "-",
                f"{r['server_cpu']:.2f}" if r["server_cpu"] is not None else "-",
                f"{r['deltas']:.2f}" if r.get("deltas") is not None else "-",
            ]
        )
    lines += _table(["ratio", "turns/s", "p50 latency", "server CPU/turn", "deltas/s"], rows)
    lines += [
        "",
        "## Streaming (one stream, long reply)",
        "",
        f"A turn whose reply is {s['long_reply_chars']:,} characters, streamed as "
        f"{s['chunk_chars']}-character deltas; deltas/s counts deltas arriving in the window.",
        "",
    ]
    rows = []
    for _key, case, row in _rows(report, "stream"):
        rows.append(
            [
                case["target"],
                f"{_num(row['deltas_per_s'])} {_spread(row, 'deltas_per_s')}",
                _ms(row["ttfd_p50_ms"]),
                _ms(row["p50_ms"]),
                f"{row['cpu_busy_pct']:.0f}%",
                str(row["errors"]),
            ]
        )
    lines += _table(
        ["path", "deltas/s", "first delta p50 ms", "whole turn p50 ms", "CPU busy", "errors"], rows
    )
    for group, title, note in (
        (
            "fresh",
            "A new stream per turn (c=16)",
            "Each turn opens its own Chat call and closes it: the per-call costs (HTTP/2 stream, "
            "interceptors, JWT validation on the first hop) that a long-lived stream pays once.",
        ),
        (
            "nokeep",
            "Router opening a new agent stream every turn",
            "`router.keep_agent_streams_s: 0`, as the router worked before it kept a client "
            "stream's agent Chat stream open between turns; the `router` rows above keep it.",
        ),
        (
            "sqlite",
            "Router with the default SQLite store",
            "The other router cases use the memory store; SQLite commits every turn with "
            "synchronous=FULL before the final event is sent.",
        ),
        (
            "uvloop",
            "uvloop (c=16)",
            "`client uvloop`: the load generator on uvloop; `servers uvloop`: the services "
            "started through `benchmarks.serve --uvloop`; compare with the asyncio rows above.",
        ),
    ):
        group_rows = _rows(report, group)
        if not group_rows:
            continue
        lines += ["", f"## {title}", "", note, ""]
        rows = []
        for _key, case, row in group_rows:
            rows.append(
                [
                    case["target"],
                    str(case["concurrency"]),
                    f"{_num(row['turns_per_s'])} {_spread(row, 'turns_per_s')}",
                    _ms(row["p50_ms"]),
                    _ms(row["p99_ms"]),
                    _ms(row["server_cpu_ms_per_turn"]),
                    str(row["errors"]),
                ]
            )
        lines += _table(
            ["target", "c", "turns/s", "p50 ms", "p99 ms", "server CPU ms/turn", "errors"], rows
        )
    if report["hold"]:
        lines += [
            "",
            "## Idle Chat streams held by one router process",
            "",
            "A fresh router (memory store, idle timeout 1 h, max_concurrent_rpcs 30,000); each "
            "stream takes one turn, then stays open and idle. RSS of the router process.",
            "",
        ]
        rows = []
        for row in report["hold"]:
            label = "after release" if row.get("after_release") else _num(row["streams"])
            rows.append(
                [
                    label,
                    _num(row["router_rss_mib"], 1),
                    _num(row["kib_per_stream"], 1) if "kib_per_stream" in row else "-",
                    f"{row['open_s']:.1f}" if "open_s" in row else "-",
                    str(row.get("errors", "-")),
                ]
            )
        lines += _table(
            ["open streams", "router RSS MiB", "KiB per stream", "open time s", "errors"], rows
        )
    errors = [(k, v["error_samples"]) for k, v in report["summary"].items() if v["errors"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- `{k}`: {samples}" for k, samples in errors]
    lines.append("")
    return "\n".join(lines)
