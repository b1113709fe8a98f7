"""The openai, azure_openai and openai_compatible kinds through the real SDK against a
local Chat Completions server.

Streams are ``chat.completion.chunk`` objects as SSE ``data:`` lines ending with
``data: [DONE]``, per the Chat Completions streaming reference: tool calls
arrive as ``delta.tool_calls`` fragments keyed by ``index`` (id, type and name
in the first, ``function.arguments`` pieces after), ``finish_reason`` closes
the choice and, with ``stream_options.include_usage``, a last chunk with empty
``choices`` carries ``usage``. Errors are ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.errors import ConfigError, ContextTooLong, ProviderAuthError, ProviderRateLimited
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
from .stubserver import HOLD, Chunk, Reply, StubServer, json_reply, sse

KEY = "sk-openai-test-0123456789"
AZURE_KEY = "azure-test-key-0123456789"
MODEL = "gpt-test"


def provider(stub: StubServer, **options: Any) -> Provider:
    opts: dict[str, Any] = {"base_url": f"{stub.url}/v1", "max_retries": 2, "timeout_s": 10}
    opts.update(options)
    env = {"OPENAI_API_KEY": KEY}
    return create_provider("openai", MODEL, opts, ProviderContext(agent="helper", environ=env))


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse(
        None,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1730000000,
            "model": MODEL,
            "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        },
    )


def usage_chunk(prompt: int, completion: int) -> bytes:
    return sse(
        None,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1730000000,
            "model": MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        },
    )


DONE = sse(None, "[DONE]")


def text_stream(pieces: list[str], finish: str = "stop") -> Reply:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    chunks += [chunk({}, finish), usage_chunk(17, len(pieces)), DONE]
    return Reply(chunks=chunks, content_type="text/event-stream")


def tool_stream(call_id: str, name: str, fragments: list[str], text: str = "") -> Reply:
    chunks = [chunk({"role": "assistant", "content": text or None})]
    chunks.append(
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )
    )
    chunks += [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
        for fragment in fragments
    ]
    chunks += [chunk({}, "tool_calls"), usage_chunk(30, 12), DONE]
    return Reply(chunks=chunks, content_type="text/event-stream")


def error(
    status: int, message: str, etype: str, code: str | None, headers: dict[str, str] | None = None
) -> Reply:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return json_reply(status, body, headers)


async def test_plain_answer(stub: StubServer) -> None:
    stub.queue(text_stream(["Hello! How can I help?"]))
    p = provider(stub, temperature=0.3)
    events = await collect(p.stream(ask("hi")))
    await p.aclose()
    assert text_of(events) == "Hello! How can I help?"
    assert stop_of(events) == "end_turn"
    assert (usage_of(events).input_tokens, usage_of(events).output_tokens) == (17, 1)
    [req] = stub.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    body = req.json()
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 1024
    assert body["temperature"] == 0.3
    assert body["messages"] == [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "hi"},
    ]
    assert "tools" not in body


async def test_streamed_answer_in_several_deltas(stub: StubServer) -> None:
    stub.queue(text_stream(["The ", "answer ", "is ", "42."], finish="length"))
    events = await collect(provider(stub).stream(ask("question")))
    assert deltas(events) == ["The ", "answer ", "is ", "42."]
    assert stop_of(events) == "max_tokens"


async def test_tool_call_then_result_goes_back_as_tool_message(stub: StubServer) -> None:
    stub.queue(
        tool_stream("call_abc", "get_weather", ['{"ci', 'ty": ', '"Paris"}']),
        text_stream(["It is 18°C in Paris."]),
    )
    p = provider(stub)
    first = ask("weather in Paris?", tools=[WEATHER])
    events = await collect(p.stream(first))
    [call] = calls_of(events)
    assert (call.id, call.name, dict(call.arguments)) == (
        "call_abc",
        "get_weather",
        {"city": "Paris"},
    )
    assert stop_of(events) == "tool_use"
    assert usage_of(events).output_tokens == 12

    events = await collect(p.stream(with_tool_result(first, call, "18°C")))
    assert text_of(events) == "It is 18°C in Paris."

    assert stub.requests[0].json()["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER.description,
                "parameters": dict(WEATHER.parameters),
            },
        }
    ]
    messages = stub.requests[1].json()["messages"]
    assert messages[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "call_abc", "content": "18°C"}


async def test_handoff_tool_call(stub: StubServer) -> None:
    stub.queue(
        tool_stream(
            "call_h",
            "transfer_to_billing",
            ['{"reason": "refund"', ', "message": "I want a refund"}'],
        )
    )
    events = await collect(
        provider(stub).stream(ask("I want a refund", tools=[WEATHER, TRANSFER_BILLING]))
    )
    [call] = calls_of(events)
    assert call.name == "transfer_to_billing"
    assert dict(call.arguments) == {"reason": "refund", "message": "I want a refund"}
    assert stop_of(events) == "tool_use"


async def test_parallel_tool_calls_are_assembled_per_index(stub: StubServer) -> None:
    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":'},
                    }
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":'},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}),
        chunk({}, "tool_calls"),
        DONE,
    ]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    events = await collect(provider(stub).stream(ask("Oslo and Rome?", tools=[WEATHER])))
    assert [(c.id, dict(c.arguments)) for c in calls_of(events)] == [
        ("c0", {"city": "Oslo"}),
        ("c1", {"city": "Rome"}),
    ]


async def test_429_is_retried_before_the_first_token(stub: StubServer) -> None:
    stub.queue(
        error(
            429, "Rate limit reached", "requests", "rate_limit_exceeded", {"retry-after-ms": "5"}
        ),
        text_stream(["after retry"]),
    )
    events = await collect(provider(stub).stream(ask("hi")))
    assert text_of(events) == "after retry"
    assert len(stub.requests) == 2


async def test_429_exhausted_is_rate_limited(stub: StubServer) -> None:
    stub.queue(
        *[
            error(
                429,
                "Rate limit reached",
                "requests",
                "rate_limit_exceeded",
                {"retry-after-ms": "1"},
            )
        ]
        * 2
    )
    with pytest.raises(ProviderRateLimited):
        await collect(provider(stub, max_retries=1).stream(ask("hi")))
    assert len(stub.requests) == 2


async def test_401_is_an_auth_error_and_not_retried(stub: StubServer) -> None:
    stub.queue(
        error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
        text_stream(["x"]),
    )
    with pytest.raises(ProviderAuthError) as info:
        await collect(provider(stub).stream(ask("hi")))
    assert len(stub.requests) == 1
    assert KEY not in str(info.value)


async def test_context_length_exceeded(stub: StubServer) -> None:
    stub.queue(
        error(
            400,
            "This model's maximum context length is 128000 tokens.",
            "invalid_request_error",
            "context_length_exceeded",
        )
    )
    with pytest.raises(ContextTooLong):
        await collect(provider(stub).stream(ask("hi")))


async def test_cancel_mid_stream_closes_the_connection(stub: StubServer) -> None:
    chunks: list[Chunk] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "first "}),
        HOLD,
    ]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    seen = await start_and_cancel(provider(stub), ask("long story"))
    assert text_of(seen) == "first "
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


async def test_aclose_mid_stream_closes_the_connection(stub: StubServer) -> None:
    chunks: list[Chunk] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "first "}),
        HOLD,
    ]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    events = provider(stub).stream(ask("long story"))
    assert text_of([await anext(events)]) == "first "
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


def test_missing_key_fails_at_start_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        create_provider("openai", MODEL, {}, ProviderContext(agent="a", environ={}))


# ----------------------------------------------------------------- azure


def azure(stub: StubServer, **options: Any) -> Provider:
    opts: dict[str, Any] = {
        "deployment": "gpt4o-prod",
        "api_version": "2024-10-21",
        "max_retries": 1,
        "timeout_s": 10,
    }
    opts.update(options)
    env = {"AZURE_OPENAI_ENDPOINT": stub.url, "AZURE_OPENAI_API_KEY": AZURE_KEY}
    return create_provider("azure_openai", "gpt-4o", opts, ProviderContext(agent="a", environ=env))


async def test_azure_url_shape_and_api_key_header(stub: StubServer) -> None:
    stub.queue(text_stream(["Hi ", "from Azure"]))
    events = await collect(azure(stub).stream(ask("hi")))
    assert deltas(events) == ["Hi ", "from Azure"]
    [req] = stub.requests
    assert req.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert req.query["api-version"] == ["2024-10-21"]
    assert req.headers["api-key"] == AZURE_KEY
    assert "authorization" not in req.headers


async def test_azure_tool_call_and_handoff(stub: StubServer) -> None:
    stub.queue(
        tool_stream("call_1", "transfer_to_billing", ['{"reason": "refund"}']),
        text_stream(["done"]),
    )
    p = azure(stub)
    first = ask("refund please", tools=[TRANSFER_BILLING])
    [call] = calls_of(await collect(p.stream(first)))
    assert call.name == "transfer_to_billing"
    await collect(p.stream(with_tool_result(first, call, "transferred")))
    assert stub.requests[1].json()["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "transferred",
    }


async def test_azure_401(stub: StubServer) -> None:
    stub.queue(
        json_reply(
            401,
            {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
        )
    )
    with pytest.raises(ProviderAuthError):
        await collect(azure(stub).stream(ask("hi")))
    assert len(stub.requests) == 1


def test_azure_missing_endpoint_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        create_provider(
            "azure_openai",
            "gpt-4o",
            {},
            ProviderContext(agent="a", environ={"AZURE_OPENAI_API_KEY": "k"}),
        )


# ----------------------------------------------------------------- openai_compatible


async def test_compatible_without_key_sends_no_authorization(stub: StubServer) -> None:
    stub.queue(text_stream(["local ", "answer"]))
    p = create_provider(
        "openai_compatible",
        "smollm2",
        {"base_url": f"{stub.url}/v1"},
        ProviderContext(agent="a", environ={"OPENAI_API_KEY": KEY}),
    )
    events = await collect(p.stream(ask("hi")))
    assert text_of(events) == "local answer"
    [req] = stub.requests
    assert "authorization" not in req.headers  # never leaks OPENAI_API_KEY to another server
    assert req.json()["max_tokens"] == 1024


async def test_compatible_with_named_key(stub: StubServer) -> None:
    stub.queue(text_stream(["ok"]))
    p = create_provider(
        "openai_compatible",
        "qwen",
        {"base_url_env": "VLLM_URL", "api_key_env": "VLLM_KEY"},
        ProviderContext(agent="a", environ={"VLLM_URL": f"{stub.url}/v1", "VLLM_KEY": "vk-1"}),
    )
    await collect(p.stream(ask("hi")))
    assert stub.requests[0].headers["authorization"] == "Bearer vk-1"


def test_compatible_needs_a_base_url() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        create_provider("openai_compatible", "m", {}, ProviderContext(agent="a", environ={}))
