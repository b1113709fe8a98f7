"""The ollama provider through the real SDK against a local ``/api/chat`` server.

Streams are NDJSON objects ``{"model", "created_at", "message": {"role",
"content", "tool_calls"?}, "done": false}`` ending with a ``done: true`` object
carrying ``done_reason``, ``prompt_eval_count`` and ``eval_count`` (the Ollama
API reference); tool calls come whole, arguments as an object. Errors are
``{"error": "..."}`` with the HTTP status.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.errors import ConfigError, ProviderAuthError, ProviderRateLimited
from mesh.providers.base import Provider, ProviderContext
from mesh.providers.registry import create_provider

from .helpers import (
    TRANSFER_BILLING,
    WEATHER,
    ask,
    calls_of,
    collect,
    deltas,
    start_and_cancel,
    stop_of,
    text_of,
    usage_of,
    with_tool_result,
)
from .stubserver import HOLD, Chunk, Reply, StubServer, json_reply, ndjson

MODEL = "llama3.2"
STAMP = "2024-11-21T10:00:00.000000Z"


def provider(stub: StubServer, **options: Any) -> Provider:
    opts: dict[str, Any] = {"host": stub.url, "retry_backoff_s": 0.01, "timeout_s": 10}
    opts.update(options)
    return create_provider("ollama", MODEL, opts, ProviderContext(agent="helper", environ={}))


def part(content: str = "", tool_calls: list[dict[str, Any]] | None = None) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return ndjson({"model": MODEL, "created_at": STAMP, "message": message, "done": False})


def final(reason: str = "stop", prompt: int = 26, evals: int = 5) -> bytes:
    return ndjson(
        {
            "model": MODEL,
            "created_at": STAMP,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": prompt,
            "prompt_eval_duration": 342546000,
            "eval_count": evals,
            "eval_duration": 4535599000,
        }
    )


def stream(*chunks: Chunk) -> Reply:
    return Reply(chunks=list(chunks), content_type="application/x-ndjson")


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}}


async def test_plain_answer(stub: StubServer) -> None:
    stub.queue(stream(part("Hello! How can I help?"), final()))
    p = provider(stub, temperature=0.1, num_ctx=8192)
    events = await collect(p.stream(ask("hi")))
    await p.aclose()
    assert text_of(events) == "Hello! How can I help?"
    assert stop_of(events) == "end_turn"
    assert (usage_of(events).input_tokens, usage_of(events).output_tokens) == (26, 5)
    [req] = stub.requests
    assert req.path == "/api/chat"
    body = req.json()
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["options"] == {"num_predict": 1024, "temperature": 0.1, "num_ctx": 8192}
    assert body["messages"] == [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "hi"},
    ]


async def test_streamed_answer_in_several_deltas(stub: StubServer) -> None:
    stub.queue(stream(part("The "), part("answer "), part("is "), part("42."), final("length")))
    events = await collect(provider(stub).stream(ask("question")))
    assert deltas(events) == ["The ", "answer ", "is ", "42."]
    assert stop_of(events) == "max_tokens"


async def test_tool_call_then_result_goes_back_as_tool_message(stub: StubServer) -> None:
    stub.queue(
        stream(part("", [call("get_weather", {"city": "Paris"})]), final()),
        stream(part("It is 18°C in Paris."), final()),
    )
    p = provider(stub)
    first = ask("weather in Paris?", tools=[WEATHER])
    events = await collect(p.stream(first))
    [tool_call] = calls_of(events)
    assert (tool_call.name, dict(tool_call.arguments)) == ("get_weather", {"city": "Paris"})
    assert tool_call.id
    assert stop_of(events) == "tool_use"

    events = await collect(p.stream(with_tool_result(first, tool_call, "18°C")))
    assert text_of(events) == "It is 18°C in Paris."

    tools = stub.requests[0].json()["tools"]
    assert tools[0]["type"] == "function"
    assert tools[0]["function"]["name"] == "get_weather"
    assert tools[0]["function"]["parameters"]["required"] == ["city"]
    messages = stub.requests[1].json()["messages"]
    assert messages[2] == {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    assert messages[3] == {"role": "tool", "content": "18°C", "tool_name": "get_weather"}


async def test_handoff_tool_call(stub: StubServer) -> None:
    stub.queue(stream(part("", [call("transfer_to_billing", {"reason": "refund"})]), final()))
    events = await collect(provider(stub).stream(ask("refund!", tools=[TRANSFER_BILLING])))
    [tool_call] = calls_of(events)
    assert (tool_call.name, dict(tool_call.arguments)) == (
        "transfer_to_billing",
        {"reason": "refund"},
    )
    assert stop_of(events) == "tool_use"


async def test_429_is_retried_before_the_first_token(stub: StubServer) -> None:
    stub.queue(
        json_reply(429, {"error": "too many requests"}), stream(part("after retry"), final())
    )
    events = await collect(provider(stub).stream(ask("hi")))
    assert text_of(events) == "after retry"
    assert len(stub.requests) == 2


async def test_429_exhausted_is_rate_limited(stub: StubServer) -> None:
    stub.queue(*[json_reply(429, {"error": "busy"})] * 3)
    with pytest.raises(ProviderRateLimited):
        await collect(provider(stub, max_retries=2).stream(ask("hi")))
    assert len(stub.requests) == 3


async def test_401_is_an_auth_error_and_not_retried(stub: StubServer) -> None:
    stub.queue(json_reply(401, {"error": "unauthorized"}), stream(part("x"), final()))
    with pytest.raises(ProviderAuthError):
        await collect(provider(stub).stream(ask("hi")))
    assert len(stub.requests) == 1


async def test_bearer_key_from_named_variable(stub: StubServer) -> None:
    stub.queue(stream(part("ok"), final()))
    p = create_provider(
        "ollama",
        MODEL,
        {"host_env": "MY_OLLAMA", "api_key_env": "MY_OLLAMA_KEY"},
        ProviderContext(agent="a", environ={"MY_OLLAMA": stub.url, "MY_OLLAMA_KEY": "ok-1"}),
    )
    await collect(p.stream(ask("hi")))
    assert stub.requests[0].headers["authorization"] == "Bearer ok-1"


def test_missing_named_key_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="MY_OLLAMA_KEY"):
        create_provider(
            "ollama",
            MODEL,
            {"api_key_env": "MY_OLLAMA_KEY"},
            ProviderContext(agent="a", environ={}),
        )


async def test_cancel_mid_stream_closes_the_connection(stub: StubServer) -> None:
    stub.queue(stream(part("first "), HOLD))
    seen = await start_and_cancel(provider(stub), ask("long story"))
    assert text_of(seen) == "first "
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


async def test_aclose_mid_stream_closes_the_connection(stub: StubServer) -> None:
    stub.queue(stream(part("first "), HOLD))
    events = provider(stub).stream(ask("long story"))
    assert text_of([await anext(events)]) == "first "
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)
