"""A real Prometheus scrapes a running mesh; PromQL returns the turns and handoffs we caused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from mesh.client import AgentClient, create_channel
from tests.meshtest import MESH_YAML, Proc, write_config
from tests.telemetry.test_traces import small_mesh

# `make test` installs Debian's prometheus (scripts/ensure-prometheus.sh): a missing
# binary is a failure, never a skip.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{"job_name": "mesh", "static_configs": [{"targets": targets}]}],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(base: str, promql: str) -> float | None:
    try:
        response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return None  # not up yet
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def _until(base: str, promql: str, expected: float, timeout: float = 60.0) -> float | None:
    """Poll the query API (Prometheus scrapes on its own clock) until it returns ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = None
    while loop.time() < deadline:
        value = await asyncio.to_thread(_query, base, promql)
        if value == expected:
            return value
        await asyncio.sleep(0.25)
    return value


async def test_prometheus_scrapes_turn_and_handoff_counters(tmp_path: Path) -> None:
    config = write_config(tmp_path, small_mesh(auth=False))
    env = {"MESH_SERVER__METRICS_PORT": "0", "PYTHONPATH": str(MESH_YAML.parent)}
    procs: list[Proc] = []
    try:
        static, metrics = [], []
        for name in ("triage", "billing", "orders"):
            agent = Proc(["agent", name, "--config", str(config), "--port", "0"], env)
            procs.append(agent)
            static += ["--static", f"{name}={agent.wait_line(f'agent {name}: ')}"]
            metrics.append(agent.wait_line("metrics: "))
        router = Proc(["router", "--config", str(config), "--port", "0", *static], env)
        procs.append(router)
        address = router.wait_line("router: ")
        metrics.append(router.wait_line("metrics: "))
        async with create_channel(address) as channel:
            client = AgentClient(channel, router=True)
            for n in range(3):
                result = await client.chat(
                    f"refund for INV-{n}", conversation_id=f"r{n}", timeout=60
                )
                assert result.final is not None and result.final.agent == "billing"
            for n in range(2):
                result = await client.chat("give me a plan", conversation_id=f"p{n}", timeout=60)
                assert result.final is not None and result.final.agent == "triage"
            result = await client.chat("hello", conversation_id="h", timeout=60)
            for name in ("user-22242-alice@example.com", "x" * 300):  # no such agents
                failed = await client.chat("hi", agent=name, timeout=60)
                assert failed.events[-1].error.reason == "AGENT_NOT_FOUND"
        with prometheus(tmp_path, metrics) as base:
            turns = 'sum(mesh_turns_total{job="mesh",service="router",outcome="ok"})'
            assert await _until(base, turns, 6.0) == 6.0
            by_agent = 'sum(mesh_turns_total{service="router",agent="billing",outcome="ok"})'
            assert await _until(base, by_agent, 3.0) == 3.0
            transfers = 'sum(mesh_handoffs_total{mode="transfer"})'
            assert await _until(base, transfers, 3.0) == 3.0
            consults = 'sum(mesh_handoffs_total{mode="consult"})'
            assert await _until(base, consults, 4.0) == 4.0
            # Each agent counted its own turns: billing ran 3 transfers and 2 consults.
            billing = 'sum(mesh_turns_total{service="agent",agent="billing",outcome="ok"})'
            assert await _until(base, billing, 5.0) == 5.0
            tokens = 'sum(mesh_model_tokens_total{agent="billing",gen_ai_token_type="output"}) > 0'
            assert (await _until(base, f"count({tokens})", 1.0)) == 1.0
            # A name the router does not know is one "unknown" series, not one per name.
            unknown = 'mesh_turns_total{service="router",outcome="AGENT_NOT_FOUND"}'
            assert await _until(base, f"sum({unknown})", 2.0) == 2.0
            assert await _until(base, f"count({unknown})", 1.0) == 1.0
            named = f'count({unknown[:-1]},agent="unknown"}})'
            assert await _until(base, named, 1.0) == 1.0
    finally:
        for proc in reversed(procs):
            proc.stop()
