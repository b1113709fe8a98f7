"""``mesh up`` with ``a2a.enabled`` runs the A2A edge, starts nothing for a remote A2A
agent, and an a2a-sdk client reaches the remote agent through edge, router and agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from a2a.types import TaskState

from mesh.config import load_config
from tests.a2a.test_a2a_edge import answer_chunks, final_state, sdk_client, user_message
from tests.a2a.test_a2a_remote import remote_agent
from tests.meshtest import Proc, free_ports_env, write_config


async def test_mesh_up_runs_the_edge_and_reaches_a_remote_agent(tmp_path: Path) -> None:
    async with remote_agent() as (url, remote):
        path = write_config(
            tmp_path,
            {
                "router": {"default_agent": "helper", "store": {"kind": "memory"}},
                "auth": {"enabled": False},
                "a2a": {"enabled": True, "port": 0},
                "agents": {
                    "helper": {
                        "description": "sends invoices elsewhere",
                        "handoffs": [{"target": "remote", "modes": ["transfer"]}],
                        "provider": {
                            "kind": "offline",
                            "rules": [{"contains": "invoice", "handoff": "remote"}],
                        },
                    },
                    "remote": {"description": "a remote A2A agent", "a2a": {"url": url}},
                },
            },
        )
        env = free_ports_env(load_config(path), tmp_path)
        proc = Proc(["up", "--config", str(path), "--router-port", "0"], env)
        try:
            edge = await asyncio.to_thread(proc.wait_line, "a2a: ", 60)
            await asyncio.to_thread(proc.wait_line, "mesh up: running", 60)
            async with httpx.AsyncClient(timeout=30) as http:
                card, client = await sdk_client(http, edge)
                events = [e async for e in client.send_message(user_message("my invoice?"))]
                await client.close()
        finally:
            code = proc.stop()
    assert code == 0, "".join(proc.stderr)
    assert card.name == "mesh" and {s.tags[0] for s in card.skills} == {"helper", "remote"}
    assert "".join(answer_chunks(events)) == "remote answers: my invoice?"
    assert final_state(events) == TaskState.TASK_STATE_COMPLETED
    assert remote.calls[0]["mesh"]["source_agent"] == "helper"
    assert not any("agent remote" in line for line in proc.stdout)  # nothing started for it
