"""The gemini provider through the real ``google-genai`` SDK against a local Gemini API.

The server speaks the API's streaming wire format: ``POST
/v1beta/models/{model}:streamGenerateContent?alt=sse`` answered with server-sent
events whose ``data:`` is a ``GenerateContentResponse`` (CRLF-separated, as
Google's servers send them): text parts, ``functionCall`` parts (whole, with a
``thoughtSignature`` from thinking models), ``finishReason`` and cumulative
``usageMetadata`` on the last chunk. Errors are JSON bodies of ``{"error": {"code",
"message", "status", "details"}}``, or such an object as an event mid-stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.agent import AgentRuntime, Final, HandoffRequested, TurnInput
from mesh.errors import (
    ConfigError,
    ContextTooLong,
    ProviderAuthError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers.base import ModelEvent, Provider, ProviderContext
from mesh.providers.registry import create_provider, validate_options
from tests.meshtest import mesh_config

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
from .stubserver import HOLD, Chunk, Recorded, Reply, StubServer, json_reply

KEY = "AIzaSy-test-0123456789abcdef"
MODEL = "gemini-test"
SIGNATURE = b"\x12\x24thought-signature-bytes\x00\xff"
STREAM_PATH = f"/v1beta/models/{MODEL}:streamGenerateContent"


#: Providers made by a test, closed after it (their HTTP clients hold connections).
_MADE: list[Provider] = []


@pytest.fixture(autouse=True)
async def _close_providers() -> AsyncIterator[None]:
    yield
    while _MADE:
        await _MADE.pop().aclose()


def gemini(options: dict[str, Any], environ: dict[str, str]) -> Provider:
    made = create_provider(
        "gemini", MODEL, options, ProviderContext(agent="helper", environ=environ)
    )
    _MADE.append(made)
    return made


def provider(stub: StubServer, env: dict[str, str] | None = None, **options: Any) -> Provider:
    opts: dict[str, Any] = {"base_url": stub.url, "timeout_s": 10, "retry_backoff_s": 0}
    opts.update(options)
    return gemini(opts, {"GEMINI_API_KEY": KEY} if env is None else env)


def event(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\r\n\r\n".encode()


def usage(prompt: int, out: int, thoughts: int = 0) -> dict[str, Any]:
    body = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "totalTokenCount": prompt + out + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        body["thoughtsTokenCount"] = thoughts
    return body


def chunk(parts: list[dict[str, Any]], *, finish: str | None = None, **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return event(
        {
            "candidates": [candidate],
            "modelVersion": MODEL,
            "responseId": "resp-1",
            **extra,
        }
    )


def text_stream(pieces: list[str], *, prompt: int = 9, finish: str = "STOP") -> list[bytes]:
    out = [chunk([{"text": p}], usageMetadata=usage(prompt, i + 1)) for i, p in enumerate(pieces)]
    out.append(chunk([{"text": ""}], finish=finish, usageMetadata=usage(prompt, len(pieces) + 2)))
    return out


def function_call(
    name: str, args: dict[str, Any], *, call_id: str | None = None, signed: bool = False
) -> dict[str, Any]:
    call: dict[str, Any] = {"name": name, "args": args}
    if call_id:
        call["id"] = call_id
    part: dict[str, Any] = {"functionCall": call}
    if signed:
        part["thoughtSignature"] = base64.b64encode(SIGNATURE).decode()
    return part


def sse_reply(chunks: list[Chunk]) -> Reply:
    return Reply(chunks=chunks, content_type="text/event-stream")


def error(status: int, state: str, message: str, **extra: Any) -> Reply:
    return json_reply(
        status, {"error": {"code": status, "message": message, "status": state}}, extra
    )


def body_of(request: Recorded) -> dict[str, Any]:
    body: dict[str, Any] = request.json()
    return body


def declarations(request: Recorded) -> list[dict[str, Any]]:
    """The function declarations as the API reads them.

    The API parses proto3 JSON, which accepts a field's proto name as well as its
    camelCase name; the SDK sends ``parameters_json_schema`` in the proto spelling.
    """
    out = []
    for decl in body_of(request)["tools"][0]["functionDeclarations"]:
        schema = decl.pop("parameters_json_schema", None)
        if schema is not None:
            decl["parametersJsonSchema"] = schema
        out.append(decl)
    return out


async def test_streams_text_with_usage(stub: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    stub.queue(sse_reply(list(text_stream(["The ", "answer ", "is 42."]))))
    p = provider(stub, temperature=0.5, max_tokens=256)
    with caplog.at_level(logging.DEBUG):
        events = await collect(p.stream(ask("question")))
    await p.aclose()
    # (other tests' SDK clients may be garbage-collected meanwhile: only ours count)
    ours = ("mesh", "google_genai", "httpx", "httpcore")
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(ours)
    ]

    assert deltas(events) == ["The ", "answer ", "is 42."]
    assert stop_of(events) == "end_turn"
    assert (usage_of(events).input_tokens, usage_of(events).output_tokens) == (9, 5)
    [req] = stub.requests
    assert (req.method, req.path, req.query) == ("POST", STREAM_PATH, {"alt": ["sse"]})
    assert req.headers["x-goog-api-key"] == KEY
    body = body_of(req)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "question"}]}]
    assert body["systemInstruction"]["parts"] == [{"text": "You are a helpful agent."}]
    assert body["generationConfig"]["maxOutputTokens"] == 256
    assert body["generationConfig"]["temperature"] == 0.5
    assert "tools" not in body


async def test_function_call_and_its_result_go_back_with_the_signature(stub: StubServer) -> None:
    stub.queue(
        sse_reply(
            [
                chunk([{"text": "Let me check."}], usageMetadata=usage(60, 3)),
                chunk(
                    [function_call("get_weather", {"city": "Paris"}, signed=True)],
                    finish="STOP",
                    usageMetadata=usage(60, 15, thoughts=55),
                ),
            ]
        ),
        sse_reply(list(text_stream(["It is 18°C in Paris."]))),
    )
    p = provider(stub)
    first = ask("weather in Paris?", tools=[WEATHER])
    events = await collect(p.stream(first))
    [call] = calls_of(events)
    assert (call.name, dict(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert text_of(events) == "Let me check."
    assert stop_of(events) == "tool_use"
    assert usage_of(events).output_tokens == 15 + 55  # thinking tokens are output too

    events = await collect(p.stream(with_tool_result(first, call, "18°C", text="Let me check.")))
    assert text_of(events) == "It is 18°C in Paris."

    assert len(body_of(stub.requests[0])["tools"]) == 1
    assert declarations(stub.requests[0]) == [
        {
            "name": "get_weather",
            "description": WEATHER.description,
            "parametersJsonSchema": dict(WEATHER.parameters),
        }
    ]
    contents = body_of(stub.requests[1])["contents"]
    # proto3 JSON takes bytes in either base64 alphabet; the SDK sends the URL-safe one.
    sent = contents[1]["parts"][1].pop("thoughtSignature")
    assert base64.urlsafe_b64decode(sent) == SIGNATURE
    assert contents[1] == {
        "role": "model",
        "parts": [
            {"text": "Let me check."},
            {
                # The API gave no id, so none goes back.
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
            },
        ],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "18°C"}}}],
    }


async def test_thought_summaries_are_not_shown(stub: StubServer) -> None:
    stub.queue(
        sse_reply(
            [
                chunk([{"text": "**Weighing the options** I should ...", "thought": True}]),
                chunk([{"text": "Take the train."}]),
                chunk([{"text": ""}], finish="STOP", usageMetadata=usage(12, 4, thoughts=30)),
            ]
        )
    )
    p = provider(stub, thinking_budget=512)
    events = await collect(p.stream(ask("train or plane?")))
    assert text_of(events) == "Take the train."
    assert usage_of(events).output_tokens == 34
    thinking = body_of(stub.requests[0])["generationConfig"]["thinkingConfig"]
    # proto3 JSON: the API reads a field by its proto name as well as its camelCase one
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 512


async def test_handoff_tool_call_keeps_the_api_call_id(stub: StubServer) -> None:
    stub.queue(
        sse_reply(
            [
                chunk(
                    [
                        function_call(
                            "transfer_to_billing",
                            {"reason": "refund request", "message": "I want a refund"},
                            call_id="fc-7",
                        )
                    ],
                    finish="STOP",
                    usageMetadata=usage(30, 12),
                )
            ]
        )
    )
    p = provider(stub)
    events = await collect(p.stream(ask("I want a refund", tools=[TRANSFER_BILLING, WEATHER])))
    [call] = calls_of(events)
    assert (call.id, call.name) == ("fc-7", "transfer_to_billing")
    assert dict(call.arguments) == {"reason": "refund request", "message": "I want a refund"}
    assert stop_of(events) == "tool_use"
    declared = declarations(stub.requests[0])
    assert [d["name"] for d in declared] == ["transfer_to_billing", "get_weather"]
    assert declared[0]["parametersJsonSchema"] == dict(TRANSFER_BILLING.parameters)


async def test_runtime_offers_handoffs_as_tools_and_hands_off(stub: StubServer) -> None:
    """The agent runtime over Gemini: its handoff tools reach the API, the call a handoff."""
    stub.queue(
        sse_reply(
            [
                chunk(
                    [function_call("transfer_to_billing", {"reason": "invoice question"})],
                    finish="STOP",
                    usageMetadata=usage(40, 8),
                )
            ]
        )
    )
    config = mesh_config(
        {
            "front": {
                "description": "front desk",
                "instructions": "Route people.",
                "handoffs": [{"target": "billing", "modes": ["transfer", "consult"]}],
            },
            "billing": {"description": "invoices and refunds"},
        }
    )
    runtime = AgentRuntime(config.agents["front"], config, provider(stub))
    events = [e async for e in runtime.run_turn(TurnInput("c1", "Where is my invoice?"))]
    [handoff] = [e for e in events if isinstance(e, HandoffRequested)]
    assert (handoff.target, handoff.mode, handoff.reason) == (
        "billing",
        "transfer",
        "invoice question",
    )
    assert isinstance(events[-1], Final) and events[-1].stop_reason == "handoff"
    body = body_of(stub.requests[0])
    names = [d["name"] for d in declarations(stub.requests[0])]
    assert names == ["transfer_to_billing", "ask_billing"]
    assert body["systemInstruction"]["parts"] == [{"text": "Route people."}]


async def test_429_is_retried_before_the_first_token(stub: StubServer) -> None:
    stub.queue(
        error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
        sse_reply(list(text_stream(["after retry"]))),
    )
    p = provider(stub)
    events = await collect(p.stream(ask("hi")))
    assert text_of(events) == "after retry"
    assert len(stub.requests) == 2


async def test_error_event_as_first_chunk_is_retried(stub: StubServer) -> None:
    overloaded = {
        "error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}
    }
    stub.queue(sse_reply([event(overloaded)]), sse_reply(list(text_stream(["fine now"]))))
    p = provider(stub)
    assert text_of(await collect(p.stream(ask("hi")))) == "fine now"
    assert len(stub.requests) == 2


async def test_429_exhausted_is_rate_limited(stub: StubServer) -> None:
    stub.queue(*[error(429, "RESOURCE_EXHAUSTED", "quota")] * 2)
    p = provider(stub, max_retries=1)
    with pytest.raises(ProviderRateLimited):
        await collect(p.stream(ask("hi")))
    assert len(stub.requests) == 2


async def test_error_after_the_first_token_is_not_retried(stub: StubServer) -> None:
    mid = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}
    stub.queue(
        sse_reply([chunk([{"text": "partial "}], usageMetadata=usage(5, 1)), event(mid)]),
        sse_reply(list(text_stream(["x"]))),
    )
    p = provider(stub)
    seen: list[ModelEvent] = []

    async def consume() -> None:
        async for e in p.stream(ask("hi")):
            seen.append(e)

    with pytest.raises(ProviderRateLimited):
        await consume()
    assert text_of(seen) == "partial "
    assert len(stub.requests) == 1


async def test_401_names_the_key_variable_and_is_not_retried(stub: StubServer) -> None:
    stub.queue(
        error(401, "UNAUTHENTICATED", f"Request had invalid authentication credentials: {KEY}"),
        sse_reply(list(text_stream(["x"]))),
    )
    p = provider(stub)
    with pytest.raises(ProviderAuthError) as info:
        await collect(p.stream(ask("hi")))
    message = str(info.value)
    assert "GEMINI_API_KEY" in message
    assert KEY not in message  # even when the server echoes it
    assert len(stub.requests) == 1


async def test_invalid_key_400_is_an_auth_error_naming_the_configured_variable(
    stub: StubServer,
) -> None:
    body = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        }
    }
    stub.queue(json_reply(400, body))
    p = provider(stub, env={"TEAM_GEMINI_KEY": KEY}, api_key_env="TEAM_GEMINI_KEY")
    with pytest.raises(ProviderAuthError, match="TEAM_GEMINI_KEY"):
        await collect(p.stream(ask("hi")))
    assert stub.requests[0].headers["x-goog-api-key"] == KEY


async def test_too_many_tokens_is_context_too_long(stub: StubServer) -> None:
    stub.queue(
        error(
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        )
    )
    p = provider(stub)
    with pytest.raises(ContextTooLong):
        await collect(p.stream(ask("hi")))


async def test_stream_without_finish_is_unavailable(stub: StubServer) -> None:
    stub.queue(sse_reply([chunk([{"text": "cut "}], usageMetadata=usage(5, 1))]))
    p = provider(stub)
    with pytest.raises(ProviderUnavailable):
        await collect(p.stream(ask("hi")))


async def test_malformed_function_call_is_an_error_not_an_empty_answer(stub: StubServer) -> None:
    stub.queue(sse_reply([chunk([], finish="MALFORMED_FUNCTION_CALL", usageMetadata=usage(9, 0))]))
    p = provider(stub)
    with pytest.raises(ProviderUnavailable, match="malformed function call"):
        await collect(p.stream(ask("weather?", tools=[WEATHER])))


async def test_silence_before_the_first_chunk_times_out(stub: StubServer) -> None:
    stub.queue(sse_reply([HOLD]))
    p = provider(stub, timeout_s=0.3, max_retries=0)
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await collect(p.stream(ask("hi")))
    await asyncio.wait_for(stub.disconnected.wait(), 5.0)


async def test_unreachable_api_is_retried_then_unavailable() -> None:
    with socket.socket() as sock:  # a port that was free and is closed again
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = gemini(
        {"base_url": f"http://127.0.0.1:{port}", "max_retries": 1, "retry_backoff_s": 0},
        {"GEMINI_API_KEY": KEY},
    )
    with pytest.raises(ProviderUnavailable, match="cannot reach the API"):
        await collect(p.stream(ask("hi")))


async def test_cancel_mid_stream_closes_the_connection(stub: StubServer) -> None:
    stub.queue(sse_reply([chunk([{"text": "first "}]), HOLD]))
    p = provider(stub)
    seen = await start_and_cancel(p, ask("long story"))
    assert text_of(seen) == "first "
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


async def test_aclose_mid_stream_closes_the_connection(stub: StubServer) -> None:
    stub.queue(sse_reply([chunk([{"text": "first "}]), HOLD]))
    p = provider(stub)
    events = p.stream(ask("long story"))
    assert text_of([await anext(events)]) == "first "
    await events.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(stub.disconnected.wait(), 1.0)


async def test_key_from_google_api_key_and_base_url_from_the_environment(
    stub: StubServer,
) -> None:
    stub.queue(sse_reply(list(text_stream(["ok"]))))
    env = {"GOOGLE_API_KEY": KEY, "GOOGLE_GEMINI_BASE_URL": stub.url}
    p = gemini({}, env)
    assert text_of(await collect(p.stream(ask("hi")))) == "ok"
    assert stub.requests[0].headers["x-goog-api-key"] == KEY


def test_missing_key_fails_at_start_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="GEMINI_API_KEY") as info:
        create_provider("gemini", MODEL, {}, ProviderContext(agent="a", environ={}))
    assert "GOOGLE_API_KEY" in str(info.value)
    with pytest.raises(ConfigError, match="MY_GEMINI_KEY"):
        create_provider(
            "gemini",
            MODEL,
            {"api_key_env": "MY_GEMINI_KEY"},
            ProviderContext(agent="a", environ={"GEMINI_API_KEY": KEY}),
        )


def test_options_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="temprature"):
        validate_options("gemini", {"temprature": 0.2})
