"""Unit tests of the shared provider helpers and message conversions."""

from __future__ import annotations

import json

import pytest

from mesh.errors import ConfigError, ProviderUnavailable
from mesh.providers import anthropic as anthropic_provider
from mesh.providers._common import (
    ToolCallExtractor,
    normalize_stop,
    parse_arguments,
    render_transcript,
    require_env,
    system_with_tools,
    text_messages,
)
from mesh.providers.base import ChatMessage, ToolCallRequest
from mesh.providers.registry import validate_options

from .helpers import TRANSFER_BILLING, WEATHER


def test_require_env_names_the_variable_never_the_value() -> None:
    assert require_env({"K": "secret"}, "K", "x") == "secret"
    with pytest.raises(ConfigError, match="MY_KEY") as info:
        require_env({"OTHER": "secret"}, "MY_KEY", "anthropic provider")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "calls", "expected"),
    [
        ("end_turn", False, "end_turn"),
        ("stop", False, "end_turn"),
        ("length", False, "max_tokens"),
        ("max_tokens", False, "max_tokens"),
        ("stop_sequence", False, "stop_sequence"),
        ("tool_calls", True, "tool_use"),
        ("stop", True, "tool_use"),
        ("model_context_window_exceeded", False, "max_tokens"),
        (None, False, "end_turn"),
        ("something_new", False, "end_turn"),
    ],
)
def test_normalize_stop(raw: str | None, calls: bool, expected: str) -> None:
    assert normalize_stop(raw, has_tool_calls=calls) == expected


def test_parse_arguments() -> None:
    assert parse_arguments("", tool="t") == {}
    assert parse_arguments('{"a": 1}', tool="t") == {"a": 1}
    assert parse_arguments({"a": 1}, tool="t") == {"a": 1}
    with pytest.raises(ProviderUnavailable, match="'t'"):
        parse_arguments('{"a": ', tool="t")
    with pytest.raises(ProviderUnavailable):
        parse_arguments("[1]", tool="t")


def test_extractor_holds_back_split_tags() -> None:
    body = json.dumps({"name": "transfer_to_billing", "arguments": {"reason": "refund"}})
    text = f"Moving you.<tool_call>\n{body}\n</tool_call> Bye <tool"
    extractor = ToolCallExtractor("x")
    shown: list[str] = []
    calls: list[ToolCallRequest] = []
    for i in range(0, len(text), 3):  # every split point of the tags is exercised
        out, found = extractor.feed(text[i : i + 3])
        shown.append(out)
        calls.extend(found)
    rest, more = extractor.finish()
    assert "".join(shown) + rest == "Moving you. Bye <tool"
    assert more == []
    assert calls == [ToolCallRequest("x_1", "transfer_to_billing", {"reason": "refund"})]


def test_extractor_accepts_an_unterminated_final_call() -> None:
    extractor = ToolCallExtractor()
    shown, calls = extractor.feed(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    )
    assert (shown, calls) == ("", [])
    rest, calls = extractor.finish()
    assert rest == ""
    assert [c.name for c in calls] == ["get_weather"]


def test_system_prompt_lists_tools_in_hermes_format() -> None:
    system = system_with_tools("Be brief.", [WEATHER, TRANSFER_BILLING])
    assert system.startswith("Be brief.")
    start = system.index("<tools>\n") + len("<tools>\n")
    listed = [json.loads(line) for line in system[start : system.index("\n</tools>")].splitlines()]
    assert [t["function"]["name"] for t in listed] == ["get_weather", "transfer_to_billing"]
    assert system_with_tools("Be brief.", []) == "Be brief."


def test_text_messages_and_transcript() -> None:
    call = ToolCallRequest("c1", "get_weather", {"city": "Oslo"})
    messages = [
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "cold", tool_call_id="c1", name="get_weather"),
        ChatMessage("tool", "windy", tool_call_id="c2", name="get_wind", is_error=True),
    ]
    pairs = text_messages(messages)
    assert [role for role, _ in pairs] == ["user", "assistant", "user"]
    assert "<tool_call>" in pairs[1][1]
    assert pairs[2][1].count("<tool_response>") == 2
    assert '"is_error": true' in pairs[2][1]
    transcript = render_transcript(messages)
    assert transcript.startswith("The conversation so far:")
    assert render_transcript([ChatMessage("user", "just this")]) == "just this"


def test_anthropic_messages_merge_roles_and_lift_system() -> None:
    call = ToolCallRequest("toolu_1", "get_weather", {"city": "Oslo"})
    system, messages = anthropic_provider.to_messages(
        [
            ChatMessage("system", "Extra rule."),
            ChatMessage("user", "weather?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "cold", tool_call_id="toolu_1", name="get_weather", is_error=False),
            ChatMessage("user", "and tomorrow?"),
        ]
    )
    assert system == "Extra rule."
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    last = list(messages[2]["content"])
    assert last[0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "cold",
        "is_error": False,
    }
    assert last[1] == {"type": "text", "text": "and tomorrow?"}


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("anthropic", {"max_tokens": 0}),
        ("openai", {"timeout_s": -1}),
        ("azure_openai", {"deployments": "x"}),
        ("openai_compatible", {"max_tokens_param": "tokens"}),
        ("ollama", {"hots": "x"}),
        ("claude_cli", {"input": "pipe"}),
        ("llama_cpp", {"n_ctx": 1}),
    ],
)
def test_bad_options_are_rejected_at_load(kind: str, options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        validate_options(kind, options)
