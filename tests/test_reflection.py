"""Server reflection v1 beside v1alpha: buf curl (v1) and grpcurl 1.8 (v1alpha) both work."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from .meshtest import grpcurl, mesh_config, offline_agent, serve_agent

REPO = Path(__file__).resolve().parent.parent


def _buf() -> str:
    return subprocess.run(
        [str(REPO / "scripts" / "ensure-buf.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.strip()


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_buf_curl_lists_through_reflection_v1_and_calls_chat() -> None:
    buf = _buf()
    config = mesh_config({"echo": offline_agent(default_reply="echo: {message}")})
    async with serve_agent(config, "echo") as (address, _server, _rt, _p):
        url = f"http://{address}"
        base = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
        code, out, err = await _run(*base, "--reflect-protocol", "grpc-v1", "--list-methods", url)
        assert code == 0, err
        assert "mesh.v1.AgentService/Chat" in out.split()
        code, out, err = await _run(
            *base,
            "--reflect-protocol",
            "grpc-v1",
            "-d",
            '{"turn": {"message": "hello buf"}}',
            f"{url}/mesh.v1.AgentService/Chat",
        )
        assert code == 0, err
        events = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
        assert events[-1]["final"]["content"] == "echo: hello buf"
        assert events[-1]["final"]["stopReason"] == "STOP_REASON_END_TURN"
        # grpcurl 1.8.6 speaks reflection v1alpha, and still works.
        listing = await asyncio.to_thread(grpcurl, address, "list")
        assert "mesh.v1.AgentService" in listing.stdout.split(), listing.stderr
