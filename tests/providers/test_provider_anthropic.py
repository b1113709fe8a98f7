"""The anthropic provider through the real SDK against a local Messages API server.

The SSE sequences follow the Messages streaming documentation: message_start,
content_block_start, ping, content_block_delta (text_delta / input_json_delta),
content_block_stop, message_delta, message_stop; errors are JSON bodies of
``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.errors import (
    ConfigError,
    ContextTooLong,
    ProviderAuthError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers.base import ModelEvent, Provider, ProviderContext
from mesh.providers.registry import create_provider, validate_options

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

KEY = "sk-ant-test-0123456789"
MODEL = "claude-test-1"


def provider(stub: StubServer, **options: Any) -> Provider:
    opts: dict[str, Any] = {"base_url": stub.url, "max_retries": 2, "timeout_s": 10}
    opts.update(options)
    return create_provider(
        "anthropic",
        MODEL,
        opts,
        ProviderContext(agent="helper", environ={"ANTHROPIC_API_KEY": KEY}),
    )


def message_start(input_tokens: int = 21) -> bytes:
    return sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": MODEL,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        },
    )


def text_block(index: int, pieces: list[str]) -> list[bytes]:
    out = [
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
    ]
    if index == 0:
        out.append(sse("ping", {"type": "ping"}))
    out += [
        sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in pieces
    ]
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


def tool_block(index: int, tool_id: str, name: str, fragments: list[str]) -> list[bytes]:
    out = [
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
            },
        )
    ]
    out += [
        sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            },
        )
        for fragment in fragments
    ]
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


def message_end(stop_reason: str, output_tokens: int) -> list[bytes]:
    return [
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]


def stream(*blocks: list[bytes], stop: str = "end_turn", output_tokens: int = 9) -> Reply:
    chunks = [message_start()]
    for block in blocks:
        chunks += block
    chunks += message_end(stop, output_tokens)
    return Reply(chunks=chunks, content_type="text/event-stream")


def error(status: int, etype: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"type": "error", "error": {"type": etype, "message": message}}
    return json_reply(status, body, headers)


async def test_plain_answer(stub: StubServer) -> None:
    stub.queue(stream(text_block(0, ["Hello! How can I help?"])))
    p = provider(stub, temperature=0.5)
    events = await collect(p.stream(ask("hi")))
    await p.aclose()

    assert text_of(events) == "Hello! How can I help?"
    assert stop_of(events) == "end_turn"
    assert usage_of(events).input_tokens == 21
    assert usage_of(events).output_tokens == 9
    [req] = stub.requests
    assert req.method == "POST"
    assert req.path == "/v1/messages"
    # This SDK generation sends the key as a bearer token; older ones used x-api-key.
    assert KEY in (req.headers.get("x-api-key"), req.headers.get("authorization", "")[7:])
    assert "anthropic-version" in req.headers
    body = req.json()
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["max_tokens"] == 1024
    assert body["temperature"] == 0.5
    assert body["system"] == "You are a helpful agent."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert "tools" not in body


async def test_streamed_answer_in_several_deltas(stub: StubServer) -> None:
    stub.queue(stream(text_block(0, ["The ", "answer ", "is ", "42."]), output_tokens=4))
    p = provider(stub)
    events = await collect(p.stream(ask("question")))
    assert deltas(events) == ["The ", "answer ", "is ", "42."]
    assert stop_of(events) == "end_turn"


async def test_tool_call_then_result_goes_back_as_tool_result_block(stub: StubServer) -> None:
    stub.queue(
        stream(
            text_block(0, ["Let me check."]),
            tool_block(1, "toolu_01A", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
            stop="tool_use",
        ),
        stream(text_block(0, ["It is 18°C in Paris."])),
    )
    p = provider(stub)
    first = ask("weather in Paris?", tools=[WEATHER])
    events = await collect(p.stream(first))
    [call] = calls_of(events)
    assert (call.id, call.name, dict(call.arguments)) == (
        "toolu_01A",
        "get_weather",
        {"city": "Paris"},
    )
    assert text_of(events) == "Let me check."
    assert stop_of(events) == "tool_use"

    events = await collect(p.stream(with_tool_result(first, call, "18°C", text="Let me check.")))
    assert text_of(events) == "It is 18°C in Paris."

    tools = stub.requests[0].json()["tools"]
    assert tools == [
        {
            "name": "get_weather",
            "description": WEATHER.description,
            "input_schema": dict(WEATHER.parameters),
        }
    ]
    messages = stub.requests[1].json()["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {
                "type": "tool_use",
                "id": "toolu_01A",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
        ],
    }
    assert messages[2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01A",
                "content": "18°C",
                "is_error": False,
            }
        ],
    }


async def test_handoff_tool_call(stub: StubServer) -> None:
    stub.queue(
        stream(
            tool_block(
                0,
                "toolu_02",
                "transfer_to_billing",
                ['{"reason": "refund request", ', '"message": "I want a refund"}'],
            ),
            stop="tool_use",
        )
    )
    p = provider(stub)
    events = await collect(p.stream(ask("I want a refund", tools=[TRANSFER_BILLING, WEATHER])))
    [call] = calls_of(events)
    assert call.name == "transfer_to_billing"
    assert dict(call.arguments) == {"reason": "refund request", "message": "I want a refund"}
    assert stop_of(events) == "tool_use"
    names = [t["name"] for t in stub.requests[0].json()["tools"]]
    assert names == ["transfer_to_billing", "get_weather"]


async def test_429_is_retried_before_the_first_token(stub: StubServer) -> None:
    stub.queue(
        error(429, "rate_limit_error", "slow down", {"retry-after-ms": "5"}),
        stream(text_block(0, ["after retry"])),
    )
    p = provider(stub)
    events = await collect(p.stream(ask("hi")))
    assert text_of(events) == "after retry"
    assert len(stub.requests) == 2


async def test_429_exhausted_is_rate_limited(stub: StubServer) -> None:
    stub.queue(*[error(429, "rate_limit_error", "slow down", {"retry-after-ms": "1"})] * 2)
    p = provider(stub, max_retries=1)
    with pytest.raises(ProviderRateLimited):
        await collect(p.stream(ask("hi")))
    assert len(stub.requests) == 2


async def test_401_is_an_auth_error_and_not_retried(stub: StubServer) -> None:
    stub.queue(
        error(401, "authentication_error", "invalid x-api-key"), stream(text_block(0, ["x"]))
    )
    p = provider(stub)
    with pytest.raises(ProviderAuthError) as info:
        await collect(p.stream(ask("hi")))
    assert len(stub.requests) == 1
    assert KEY not in str(info.value)


async def test_prompt_too_long_is_context_too_long(stub: StubServer) -> None:
    stub.queue(error(400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000"))
    p = provider(stub)
    with pytest.raises(ContextTooLong):
        await collect(p.stream(ask("hi")))


async def test_error_event_mid_stream_is_not_retried(stub: StubServer) -> None:
    chunks = [
        message_start(),
        *text_block(0, ["partial "])[:3],
        sse(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
    ]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"), stream(text_block(0, ["x"])))
    p = provider(stub)
    seen: list[ModelEvent] = []

    async def consume() -> None:
        async for event in p.stream(ask("hi")):
            seen.append(event)

    with pytest.raises(ProviderUnavailable):
        await consume()
    assert text_of(seen) == "partial "  # the text that flowed before the error
    assert len(stub.requests) == 1


async def test_cancel_mid_stream_closes_the_connection(stub: StubServer) -> None:
    chunks: list[Chunk] = [message_start(), *text_block(0, ["first "])[:3], HOLD]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    p = provider(stub)
    seen = await start_and_cancel(p, ask("long story"))
    assert text_of(seen) == "first "
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


async def test_aclose_mid_stream_closes_the_connection(stub: StubServer) -> None:
    chunks: list[Chunk] = [message_start(), *text_block(0, ["first "])[:3], HOLD]
    stub.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    p = provider(stub)
    events = p.stream(ask("long story"))
    assert text_of([await anext(events)]) == "first "
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


def test_missing_key_fails_at_start_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="MY_ANTHROPIC_KEY"):
        create_provider(
            "anthropic",
            MODEL,
            {"api_key_env": "MY_ANTHROPIC_KEY"},
            ProviderContext(agent="a", environ={"ANTHROPIC_API_KEY": KEY}),
        )


def test_options_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="temprature"):
        validate_options("anthropic", {"temprature": 0.2})
