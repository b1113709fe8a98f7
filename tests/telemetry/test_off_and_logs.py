"""Telemetry off costs nothing (no exporter, no thread); JSON logs carry the turn's trace id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mesh.client import AgentClient, create_channel
from tests.meshtest import MESH_YAML, REPO, start_mesh, write_config
from tests.telemetry.test_traces import small_mesh

_PROBE = """
import asyncio, json, sys, threading
from tests.meshtest import mesh_config, offline_agent, serve_agent, serve_router
from mesh.client import AgentClient, create_channel
from mesh import telemetry

async def main():
    config = mesh_config({"echo": offline_agent()}, router={"default_agent": "echo"},
                         server={"metrics_port": 0})
    async with serve_agent(config, "echo") as (address, server, _runtime, _provider):
        async with serve_router(config, {"echo": [address]}) as (router, _app):
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat(
                    "hello", metadata=[("traceparent", "00-" + "3" * 32 + "-" + "4" * 16 + "-01")])
                assert result.final is not None
            print(json.dumps({
                "threads": sorted(t.name for t in threading.enumerate()),
                "tracing": telemetry.state.tracing,
                "provider": telemetry.state.provider is not None,
                "exporter_loaded": any(m.startswith("opentelemetry.exporter") for m in sys.modules),
                "sdk_loaded": any(m.startswith("opentelemetry.sdk") for m in sys.modules),
                "metrics_port": server.metrics_port,
            }))

asyncio.run(main())
"""


def _probe(extra: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


def test_no_otel_variable_means_no_exporter_and_no_telemetry_thread() -> None:
    off = _probe({})
    assert off["tracing"] is False and off["provider"] is False
    assert off["exporter_loaded"] is False and off["sdk_loaded"] is False
    assert not [t for t in off["threads"] if "Otel" in t], off["threads"]
    assert off["metrics_port"]  # the metrics endpoint needs no thread either
    # The same probe with an endpoint set does create them: the check above can fail.
    on = _probe(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    )
    assert on["tracing"] is True and on["exporter_loaded"] is True
    assert [t for t in on["threads"] if "Otel" in t], on["threads"]


async def test_every_service_logs_json_lines_with_the_turns_trace_id(tmp_path: Path) -> None:
    mesh = small_mesh(auth=False)
    # An MCP stdio server too: its start is a spawn, where grpc's fork handlers used to
    # print a plain-text line. Required, so triage serves only once it runs.
    glossary = {"command": "python", "args": ["-m", "mcp_glossary"]}
    mesh["agents"]["triage"]["mcp_servers"] = [
        {"name": "glossary", "required": True, "stdio": glossary}
    ]
    config = write_config(tmp_path, mesh)
    env = {
        "MESH_LOG_FORMAT": "json",
        "MESH_LOG_LEVEL": "DEBUG",
        "PYTHONPATH": str(MESH_YAML.parent),
        "GRPC_VERBOSITY": "",  # grpc's own default, as users run it (the suite quiets it)
    }
    proc, address, _env = start_mesh(config, tmp_path / "data", env)
    trace_id = "5" * 32
    try:
        async with create_channel(address) as channel:
            result = await AgentClient(channel, router=True).chat(
                "I need a refund for INV-1001",
                conversation_id="logs-1",
                timeout=60,
                metadata=[("traceparent", f"00-{trace_id}-{'6' * 16}-01")],
            )
        assert result.final is not None and result.final.agent == "billing"
    finally:
        assert proc.stop() == 0, "".join(proc.stderr)
    lines = [line for line in "".join(proc.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    turn_lines = [
        r for r in records if r["message"].startswith("turn ") and "logs-1" in r["message"]
    ]
    services = {r.get("service") for r in turn_lines}
    assert {"router", "agent-triage", "agent-billing"} <= services, turn_lines
    assert all(r["trace_id"] == trace_id for r in turn_lines), turn_lines
