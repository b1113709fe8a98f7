"""A real local model answering through an agent and the router to the client."""

from __future__ import annotations

from pathlib import Path

from mesh.client import AgentClient, create_channel
from tests.meshtest import mesh_config, serve_agent, serve_router

from .test_provider_llama import llama_server, model_path, pytestmark

__all__ = ["llama_server", "model_path", "pytestmark"]


async def _ask_through_router(provider: dict[str, object]) -> tuple[str, list[str]]:
    config = mesh_config(
        {"local": {"description": "a small local model", "provider": provider}},
        router={"default_agent": "local", "store": {"kind": "memory"}},
    )
    async with serve_agent(config, "local") as (address, _server, _rt, recording):
        async with serve_router(config, {"local": [address]}) as (router, _app):
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat(
                    "Name three colours.", timeout=120
                )
    assert recording.closed.is_set()
    deltas = [e.delta.text for e in result.events if e.WhichOneof("kind") == "delta"]
    assert result.final is not None and result.final.agent == "local"
    assert list(result.final.final.hop_path) == ["local"]
    return result.final.final.content, deltas


async def test_openai_compatible_llama_server_through_router(llama_server: str) -> None:
    text, deltas = await _ask_through_router(
        {
            "kind": "openai_compatible",
            "model": "smollm2",
            "base_url": llama_server,
            "temperature": 0.0,
            "max_tokens": 32,
            "timeout_s": 60,
        }
    )
    assert len(deltas) > 1  # streamed token by token across both hops
    assert "".join(deltas) == text
    assert len(text.split()) >= 2, text


async def test_in_process_llama_agent_through_router(model_path: Path) -> None:
    text, deltas = await _ask_through_router(
        {
            "kind": "llama_cpp",
            "model": "smollm2-135m-instruct",
            "model_path": str(model_path),
            "temperature": 0.0,
            "seed": 7,
            "n_ctx": 2048,
            "max_tokens": 32,
        }
    )
    assert len(deltas) > 1
    assert len(text.split()) >= 2, text
