"""The real grpcurl binary against a real `mesh agent` process."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .meshtest import MESH_YAML, Proc, grpcurl, start_agent


@pytest.fixture(scope="module")
def billing() -> Iterator[str]:
    # One agent on its own, before any router or token service: auth off explicitly.
    proc, address = start_agent(MESH_YAML, "billing", {"MESH_AUTH__ENABLED": "false"})
    try:
        yield address
    finally:
        assert proc.stop() == 0


def _objects(text: str) -> list[dict[str, object]]:
    decoder = json.JSONDecoder()
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        out.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_list_shows_agent_and_health(billing: str) -> None:
    result = grpcurl(billing, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "mesh.v1.AgentService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_agent(billing: str) -> None:
    result = grpcurl(billing, "describe", "mesh.v1.AgentService")
    assert result.returncode == 0, result.stderr
    assert "rpc Chat ( stream .mesh.v1.ChatRequest ) returns ( stream .mesh.v1.ChatEvent )" in (
        result.stdout
    )
    assert "rpc Handoff" in result.stdout and "rpc Info" in result.stdout


def test_health_check_serving(billing: str) -> None:
    overall = grpcurl(billing, "grpc.health.v1.Health/Check")
    assert overall.returncode == 0, overall.stderr
    assert json.loads(overall.stdout) == {"status": "SERVING"}
    named = grpcurl(
        "-d", '{"service": "mesh.v1.AgentService"}', billing, "grpc.health.v1.Health/Check"
    )
    assert json.loads(named.stdout) == {"status": "SERVING"}


def test_chat_turn_streams_deltas_and_final(billing: str) -> None:
    result = grpcurl(
        "-d",
        '{"turn": {"conversation_id": "c-grpcurl", "message": "is a refund possible?"}}',
        billing,
        "mesh.v1.AgentService/Chat",
    )
    assert result.returncode == 0, result.stderr
    events = _objects(result.stdout)
    kinds = [
        next(k for k in ("delta", "tool_call", "tool_result", "final") if k in e) for e in events
    ]
    assert kinds[0] == "tool_call"
    assert kinds.count("delta") >= 2
    assert kinds[-1] == "final"
    final = events[-1]["final"]
    assert isinstance(final, dict)
    assert "refund of 42.00 EUR can be issued" in str(final["content"])
    assert all(e["agent"] == "billing" and e["conversation_id"] == "c-grpcurl" for e in events)


def test_info_over_grpcurl(billing: str) -> None:
    result = grpcurl(billing, "mesh.v1.AgentService/Info")
    info = json.loads(result.stdout)["info"]
    assert info["name"] == "billing"
    assert {t["name"] for t in info["tools"]} == {"lookup_invoice", "refund_status"}


def test_mesh_info_and_chat_commands(billing: str) -> None:
    plain = {"MESH_AUTH__ENABLED": "false"}
    info = Proc(["info", "--target", billing], plain)
    assert info.popen.wait(timeout=30) == 0
    assert json.loads("".join(info.stdout))["name"] == "billing"
    chat = Proc(["chat", "--target", billing, "show my invoice"], plain)
    assert chat.popen.wait(timeout=30) == 0, "".join(chat.stderr)
    out = "".join(chat.stdout)
    assert out.startswith("[billing] ")
    assert "INV-1001" in out
