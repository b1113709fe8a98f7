"""What ``mesh mcp`` carries beside the answer: the caller's W3C trace context (into the
router call, so the agents' turn continues the caller's trace) and its Prometheus
metrics, as the agents and a scrape of the real endpoint see them."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp import Client, StdioServerParameters
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from prometheus_client.parser import text_string_to_metric_families

from tests.mcp.test_mesh_mcp import RECORDS, running_mesh
from tests.meshtest import REPO, Proc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
QUESTION = {"message": "where is my invoice?"}


@contextlib.contextmanager
def mesh_mcp_http(path: Path, router: str, *extra: str) -> Iterator[Proc]:
    """A ``mesh mcp --transport http`` process on a free port; it must exit 0."""
    args = ["mcp", "--config", str(path), "--router", router, "--transport", "http"]
    proc = Proc([*args, "--port", "0", *extra])
    try:
        yield proc
    finally:
        assert proc.stop() == 0, "".join(proc.stderr)


@contextlib.asynccontextmanager
async def mcp_client(transport: str, path: Path, router: str) -> AsyncIterator[Client]:
    """The MCP SDK's client, connected to a real ``mesh mcp`` over ``transport``."""
    if transport == "stdio":
        args = ["-m", "mesh", "mcp", "--config", str(path), "--router", router]
        params = StdioServerParameters(command=sys.executable, args=args, cwd=str(REPO))
        async with Client(params) as client:
            yield client
        return
    with mesh_mcp_http(path, router) as proc:
        async with Client(proc.wait_line("mcp: ")) as client:
            yield client
    assert loud(proc) == []


def loud(proc: Proc) -> list[str]:
    """The exited process's stderr lines at WARNING or above, and any traceback."""
    levels = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    return [line for line in proc.stderr_lines() if any(level in line for level in levels)]


def text_of(result: mcp_types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, mcp_types.TextContent))


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_callers_trace_context_in_meta_reaches_the_agent(
    transport: str, tmp_path: Path
) -> None:
    # The SDK's client writes the current span's context into `_meta` itself (SEP-414),
    # over `meta=`: with the caller's span current, `_meta` carries the caller's trace
    # whether or not this test process records spans (if it does, the SDK's client span
    # is a child in that trace).
    state = TraceState([("vendor", "abc")])
    caller = SpanContext(int(TRACE_ID, 16), 0x00F067AA0BA902B7, True, TraceFlags(1), state)
    meta: Any = {"traceparent": PARENT, "tracestate": "vendor=abc", "baggage": "tenant=acme"}
    async with running_mesh(tmp_path) as (path, router):
        async with mcp_client(transport, path, router) as client:
            with trace.use_span(NonRecordingSpan(caller)):
                result = await client.call_tool("ask_billing", QUESTION, meta=meta)
        [seen] = RECORDS["billing"].traces  # the billing agent's one turn
    assert not result.is_error, text_of(result)
    assert "Your invoice INV-7 is paid in full." in text_of(result)
    assert seen["traceparent"].split("-")[1] == TRACE_ID, seen
    assert seen.get("tracestate") == "vendor=abc", seen
    assert seen.get("baggage") == "tenant=acme", seen


async def post_call(
    http: httpx2.AsyncClient, url: str, meta: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    """One tools/call POSTed as written: the SDK's client would put its own trace
    context in `_meta` when this process records spans, and these cases need exact bytes."""
    params = {"name": "ask_billing", "arguments": QUESTION, "_meta": meta}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    wire = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
        **headers,
    }
    response = await http.post(url, json=body, headers=wire)
    assert response.status_code == 200, response.text
    events = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    answer = [m for m in map(json.loads, events) if m.get("id") == 1]
    assert answer and "result" in answer[0], response.text
    result: dict[str, Any] = answer[0]["result"]
    return result


async def test_http_traceparent_header_is_forwarded_and_malformed_ones_dropped(
    tmp_path: Path,
) -> None:
    upper = f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01"  # W3C: lowercase hex only
    header_trace = "0af7651916cd43dd8448eb211c80319c"
    header_parent = f"00-{header_trace}-b7ad6b7169203331-01"
    async with running_mesh(tmp_path) as (path, router):
        with mesh_mcp_http(path, router) as proc:
            url = proc.wait_line("mcp: ")
            async with httpx2.AsyncClient(timeout=60) as http:
                malformed = await post_call(
                    http,
                    url,
                    {"traceparent": upper, "tracestate": "vendor=abc", "baggage": "a b"},
                    {"traceparent": "garbage", "baggage": "tenant"},
                )
                from_header = await post_call(http, url, {}, {"traceparent": header_parent})
                both = await post_call(
                    http, url, {"traceparent": PARENT}, {"traceparent": header_parent}
                )
        bad, by_header, by_meta = RECORDS["billing"].traces
    for result in (malformed, from_header, both):
        assert result["isError"] is False, result
    # Dropped, never forwarded as-is: nothing of the malformed context reached the agent.
    assert not {"garbage", upper, "vendor=abc", "a b", "tenant"} & set(bad.values()), bad
    assert TRACE_ID not in bad.get("traceparent", "").lower(), bad
    assert by_header["traceparent"].split("-")[1] == header_trace, by_header
    assert by_meta["traceparent"].split("-")[1] == TRACE_ID, by_meta  # `_meta` wins
    # The MCP SDK's own span middleware reads `_meta` too: OpenTelemetry warns (one
    # line) of the malformed baggage member. Nothing else is loud.
    others = [line for line in loud(proc) if "opentelemetry.baggage" not in line]
    assert others == [], others


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of the mesh_mcp_* families."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("mesh_mcp_"):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_mesh_mcp_counts_tool_calls_on_its_metrics_endpoint(tmp_path: Path) -> None:
    async with running_mesh(tmp_path) as (path, router):
        with mesh_mcp_http(path, router, "--metrics-port", "0") as proc:
            metrics = f"http://{proc.wait_line('metrics: ')}"
            async with Client(proc.wait_line("mcp: ")) as client:
                ok = [await client.call_tool("ask_billing", QUESTION) for _ in range(2)]
                ok.append(await client.call_tool("ask_triage", {"message": "hello"}))
                unknown = await client.call_tool("ask_nobody", {"message": "hi"})
                bad_id = {**QUESTION, "conversation_id": "not a valid id"}
                failed = await client.call_tool("ask_billing", bad_id)
            async with httpx2.AsyncClient(timeout=30) as http:
                scraped = await http.get(f"{metrics}/metrics")
                ready = await http.get(f"{metrics}/readyz")
    assert all(not r.is_error for r in ok), [text_of(r) for r in ok]
    assert unknown.is_error and failed.is_error and "INVALID_ARGUMENT" in text_of(failed)
    assert scraped.status_code == 200 and ready.status_code == 200
    got = samples(scraped.text)
    calls = {k[1]: v for k, v in got.items() if k[0] == "mesh_mcp_tool_calls_total"}
    assert calls == {
        (("agent", "billing"), ("outcome", "ok")): 2.0,
        (("agent", "triage"), ("outcome", "ok")): 1.0,
        (("agent", "billing"), ("outcome", "INVALID_ARGUMENT")): 1.0,
    }  # no series for the unknown tool: labels come from the config, never the caller
    count = "mesh_mcp_tool_call_duration_seconds_count"
    assert got[(count, (("agent", "billing"),))] == 3.0
    assert got[(count, (("agent", "triage"),))] == 1.0
    assert loud(proc) == []  # the failed calls were the caller's tool errors, not logs
