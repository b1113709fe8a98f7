"""A real local model answering through an agent and the router to the client."""

from __future__ import annotations

from pathlib import Path

import httpx

from mesh.client import AgentClient, create_channel
from mesh.providers.base import ChatMessage, ModelRequest, ProviderContext, TextDelta, UsageReport
from mesh.providers.registry import create_provider
from tests.meshtest import mesh_config, serve_agent, serve_router

from .test_provider_llama import llama_server, model_path, pytestmark

__all__ = ["llama_server", "model_path", "pytestmark"]


async def _ask_through_router(
    provider: dict[str, object],
) -> tuple[str, list[str], tuple[int, int]]:
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
    usage = result.final.final.usage
    return result.final.final.content, deltas, (usage.input_tokens, usage.output_tokens)


async def test_openai_compatible_llama_server_through_router(llama_server: str) -> None:
    text, deltas, (input_tokens, output_tokens) = await _ask_through_router(
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
    # llama_cpp.server streams no usage (it ignores stream_options.include_usage); the
    # provider asks for the prompt's count and counts the streamed tokens. The prompt is
    # more than the question's four words (the chat template and the agent's instructions).
    assert input_tokens > 4, input_tokens
    assert 0 < output_tokens <= 32, output_tokens


async def test_in_process_llama_agent_through_router(model_path: Path) -> None:
    text, deltas, (input_tokens, output_tokens) = await _ask_through_router(
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
    assert input_tokens > 0 and 0 < output_tokens <= 32


async def _stream_usage(base_url: str, **options: object) -> tuple[UsageReport, int]:
    provider = create_provider(
        "openai_compatible",
        "smollm2",
        {"base_url": base_url, "temperature": 0.0, "max_tokens": 24, **options},
        ProviderContext(agent="local", environ={}),
    )
    usage: UsageReport | None = None
    deltas = 0
    try:
        request = ModelRequest(
            system="", messages=[ChatMessage(role="user", content="Name three colours.")]
        )
        async for event in provider.stream(request):
            if isinstance(event, TextDelta):
                deltas += 1
            elif isinstance(event, UsageReport):
                usage = event
    finally:
        await provider.aclose()
    assert usage is not None
    return usage, deltas


async def test_openai_compatible_usage_equals_the_servers_own_count(llama_server: str) -> None:
    """The server streams no usage; the provider's numbers are the ones the same server
    reports for the same request without streaming (greedy decoding: the same answer)."""
    without, _ = await _stream_usage(llama_server, usage_fallback="none")
    assert (without.input_tokens, without.output_tokens) == (0, 0)  # nothing streamed
    usage, deltas = await _stream_usage(llama_server)
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{llama_server}/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Name three colours."}],
                "temperature": 0.0,
                "max_tokens": 24,
            },
        )
    expected = response.json()["usage"]
    assert usage.input_tokens == expected["prompt_tokens"] > 4
    assert usage.output_tokens == expected["completion_tokens"] == deltas
