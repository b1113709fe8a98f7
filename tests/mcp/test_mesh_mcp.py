"""The official MCP client talks to ``mesh mcp`` (stdio and streamable HTTP): one tool
per routable agent and sequence, answers through the router, progress first."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import config_from_dict
from tests.meshtest import REPO, Proc, RecordingProvider, serve_agent, serve_router, write_config

MESH = {
    "router": {
        "default_agent": "triage",
        "store": {"kind": "memory"},
        "sequences": {"review": {"steps": ["triage", "billing"], "description": "both"}},
    },
    "agents": {
        "triage": {"description": "routes questions", "provider": {"kind": "offline"}},
        "billing": {
            "description": "answers billing questions",
            "provider": {
                "kind": "offline",
                "chunk_chars": 8,
                "rules": [{"contains": "invoice", "reply": "Your invoice INV-7 is paid in full."}],
            },
        },
    },
}


BILLING: list[Any] = []
"""The billing agent's server of the mesh running now (a test may stop it)."""
RECORDS: dict[str, RecordingProvider] = {}
"""What each agent of the mesh running now received (e.g. the trace context of its turns)."""


@contextlib.asynccontextmanager
async def running_mesh(tmp_path: Path) -> AsyncIterator[tuple[Path, str]]:
    path = write_config(tmp_path, MESH)
    config = config_from_dict(MESH, source=str(path))
    async with serve_agent(config, "triage") as (triage, _, _, triage_seen):
        async with serve_agent(config, "billing") as (billing, server, _, billing_seen):
            static = {"triage": [triage], "billing": [billing]}
            BILLING[:] = [server]
            RECORDS.clear()
            RECORDS.update(triage=triage_seen, billing=billing_seen)
            async with serve_router(config, static) as (router, _app):
                yield path, router


async def ask_billing(client: Client) -> tuple[list[str], list[Any], str]:
    listing = await client.list_tools()
    names = sorted(t.name for t in listing.tools)
    order: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        order.append(("progress", progress, message))

    result = await client.call_tool(
        "ask_billing", {"message": "where is my invoice?"}, progress_callback=on_progress
    )
    order.append(("result", result.is_error))
    text = "".join(b.text for b in result.content if isinstance(b, mcp_types.TextContent))
    return names, order, text


def check(names: list[str], order: list[Any], text: str) -> None:
    assert names == ["ask_billing", "ask_review", "ask_triage"]
    assert "Your invoice INV-7 is paid in full." in text
    assert order[-1] == ("result", False)
    progress = order[:-1]
    assert len(progress) >= 3, order  # one per streamed delta, all before the result
    assert all(p[0] == "progress" for p in progress)
    assert [p[1] for p in progress] == sorted(p[1] for p in progress)  # increasing
    assert "".join(str(p[2]) for p in progress) == "Your invoice INV-7 is paid in full."


async def test_mesh_mcp_over_stdio(tmp_path: Path) -> None:
    async with running_mesh(tmp_path) as (path, router):
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "mesh", "mcp", "--config", str(path), "--router", router],
            cwd=str(REPO),
        )
        async with Client(params) as client:
            names, order, text = await ask_billing(client)
    check(names, order, text)


async def test_mesh_mcp_over_streamable_http(tmp_path: Path) -> None:
    async with running_mesh(tmp_path) as (path, router):
        args = ["mcp", "--config", str(path), "--router", router, "--transport", "http"]
        proc = Proc([*args, "--port", "0"])
        try:
            url = proc.wait_line("mcp: ")
            async with Client(url) as client:
                names, order, text = await ask_billing(client)
        finally:
            assert proc.stop() == 0
    check(names, order, text)


async def test_a_turn_that_fails_in_the_mesh_is_a_tool_error_naming_its_code(
    tmp_path: Path,
) -> None:
    async with running_mesh(tmp_path) as (path, router):
        await BILLING[0].stop(0)  # the agent behind ask_billing is gone
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "mesh", "mcp", "--config", str(path), "--router", router],
            cwd=str(REPO),
        )
        async with Client(params) as client:
            result = await client.call_tool("ask_billing", {"message": "where is my invoice?"})
    text = "".join(b.text for b in result.content if isinstance(b, mcp_types.TextContent))
    assert result.is_error and ": UNAVAILABLE: no healthy replica" in text, text


@pytest.mark.parametrize("transport", ["http"])
async def test_mesh_mcp_refuses_open_binding_without_auth(transport: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, MESH)
    proc = Proc(["mcp", "--config", str(path), "--transport", transport, "--host", "0.0.0.0"])
    assert proc.popen.wait(timeout=60) == 2
    err = "".join(proc.stderr)
    assert "needs auth.enabled" in err and "Traceback" not in err


async def test_mesh_mcp_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, MESH)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        proc = Proc(["mcp", "--config", str(path), "--transport", "http", "--port", port])
        assert proc.popen.wait(timeout=60) != 0
    err = "".join(proc.stderr)
    assert f"127.0.0.1:{port} is already in use" in err and "Traceback" not in err


def whoami() -> str:
    """Say who this call acts for, as the validated token says."""
    from mesh.context import current_principal

    principal = current_principal.get()
    assert principal is not None
    return json.dumps({"sub": principal.subject, "actors": list(principal.actor_chain)})


async def test_mesh_mcp_over_http_with_auth_delegates_the_caller(tmp_path: Path) -> None:
    data = {
        "data_dir": str(tmp_path),
        "router": {"default_agent": "billing", "store": {"kind": "memory"}},
        "auth": {
            "enabled": True,
            "sts": {"port": 0},
            "audiences": {"mcp": "mesh-mcp"},
            "clients": {"mcp": {}},  # mesh mcp is a client of the STS, like every service
        },
        "agents": {
            "billing": {
                "description": "says who asks",
                "tools": ["tests.mcp.test_mesh_mcp:whoami"],
                "provider": {
                    "kind": "offline",
                    "rules": [{"contains": "who", "tool": "whoami"}],
                    "after_tools": "{results}",
                },
            }
        },
    }
    path = write_config(tmp_path, data)
    config = config_from_dict(data, source=str(path))
    with TokenService(config):
        async with serve_agent(config, "billing") as (billing, *_):
            async with serve_router(config, {"billing": [billing]}) as (router, _app):
                args = ["mcp", "--config", str(path), "--router", router, "--transport", "http"]
                proc = Proc([*args, "--port", "0"])
                try:
                    url = proc.wait_line("mcp: ")
                    user = mint_user_token(config, "alice", ["mesh.chat"], 600, audience="mesh-mcp")
                    headers = {"Authorization": f"Bearer {user}"}
                    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
                        async with Client(streamable_http_client(url, http_client=http)) as client:
                            result = await client.call_tool("ask_billing", {"message": "who?"})
                    async with httpx2.AsyncClient(timeout=30) as anonymous:
                        refused = await anonymous.post(url, json={})
                finally:
                    assert proc.stop() == 0
    assert refused.status_code == 401
    assert not result.is_error, result.content
    text = "".join(b.text for b in result.content if isinstance(b, mcp_types.TextContent))
    seen = json.loads(text.removeprefix("whoami: "))
    assert seen["sub"] == "alice"
    assert "mesh-mcp" in seen["actors"]  # mesh mcp acted for alice (exchanged, not passed)
    assert seen["actors"][0] == "mesh-router"
