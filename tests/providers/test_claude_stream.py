"""The Claude Code CLI's stream-json parser over recorded output (no process).

The recordings in ``claude_stream/`` follow what ``claude -p --output-format
stream-json --verbose [--include-partial-messages]`` (Claude Code 2.0) writes: a
``system``/``init`` line, raw Messages API ``stream_event`` lines, whole
``assistant`` messages, ``user`` lines for the CLI's own tool results, and a
final ``result`` with usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from mesh.errors import (
    ContextTooLong,
    ProviderAuthError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers.base import ModelEvent, Stop, TextDelta, ToolCall, UsageReport
from mesh.providers.claude_stream import StreamJsonParser, classify_error

RECORDED = Path(__file__).parent / "claude_stream"
SESSION = "8c4f1a2e-63b7-4d0c-9a51-2f6e0d7b9c13"
#: input_tokens + cache_creation_input_tokens + cache_read_input_tokens of the recordings
PROMPT_TOKENS = 3 + 5012 + 12087


def replay(name: str) -> tuple[StreamJsonParser, list[ModelEvent], list[ModelEvent]]:
    """Feed a recording line by line, as bytes like the process gives them.

    Returns the parser, the events streamed while feeding, and those of ``finish``
    (empty when the call failed).
    """
    parser = StreamJsonParser()
    streamed: list[ModelEvent] = []
    for line in (RECORDED / name).read_bytes().splitlines(keepends=True):
        streamed.extend(parser.feed(line))
    assert parser.result is not None, "every recording ends with a result"
    final = [] if parser.result.failed else parser.finish()
    return parser, streamed, final


def texts(events: Sequence[ModelEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextDelta)]


def test_partial_messages_stream_each_delta_once() -> None:
    parser, streamed, final = replay("text_partial.jsonl")
    # The whole assistant message repeats the deltas; it must not be shown twice.
    assert texts(streamed) == ["Hello", "! How can I", " help you with", " your order today?"]
    assert parser.session_id == SESSION
    assert parser.emitted
    assert final == [UsageReport(PROMPT_TOKENS, 14), Stop("end_turn")]


def test_whole_messages_without_partial_streaming() -> None:
    _parser, streamed, final = replay("text_whole.jsonl")
    assert texts(streamed) == ["Your order A-17 shipped with DHL yesterday."]
    assert final == [UsageReport(PROMPT_TOKENS, 12), Stop("end_turn")]


def test_the_clis_own_tool_loop_shows_only_text_as_paragraphs() -> None:
    _parser, streamed, final = replay("builtin_tool_then_answer.jsonl")
    # tool_use blocks and the user/tool_result line are the CLI's business
    assert "".join(texts(streamed)) == (
        "I'll read the invoice file.\n\nInvoice INV-1001 (42.00 EUR) was paid on 2 November."
    )
    assert not [e for e in streamed if isinstance(e, ToolCall)]
    assert final[-1] == Stop("end_turn")
    assert final[-2] == UsageReport(PROMPT_TOKENS, 95)


def test_a_mesh_tool_call_split_across_deltas_never_reaches_the_text() -> None:
    _parser, streamed, final = replay("mesh_tool_call_partial.jsonl")
    shown = "".join(texts(streamed + final))
    assert shown == "Let me transfer you.\n"
    assert "<tool" not in shown
    [call] = [e.call for e in streamed + final if isinstance(e, ToolCall)]
    assert call.name == "transfer_to_billing"
    assert dict(call.arguments) == {"reason": "refund", "message": "refund INV-1001"}
    assert call.id == "cli_call_1"
    assert final[-1] == Stop("tool_use")


def test_max_turns_is_a_cut_short_answer_not_a_failure() -> None:
    parser, streamed, final = replay("max_turns.jsonl")
    assert parser.result is not None
    assert parser.result.max_turns and not parser.result.failed
    assert texts(streamed) == ["Searching the notes"]
    assert final[-1] == Stop("max_tokens")


def test_auth_failure_is_a_failed_result_classified_as_auth() -> None:
    parser, _streamed, final = replay("auth_error.jsonl")
    assert parser.result is not None and parser.result.failed
    assert not parser.result.resume_lost
    assert final == []
    error = classify_error(parser.result.message)
    assert isinstance(error, ProviderAuthError)
    assert "Invalid API key" in error.message


def test_lost_session_is_recognised() -> None:
    parser, streamed, _final = replay("resume_lost.jsonl")
    assert parser.result is not None
    assert parser.result.failed and parser.result.resume_lost
    assert streamed == [] and not parser.emitted


def test_noise_is_skipped_and_nothing_after_the_result_counts() -> None:
    parser, streamed, final = replay("noisy.jsonl")
    assert texts(streamed) == ["Plain ", "answer."]
    assert final == [UsageReport(PROMPT_TOKENS, 6), Stop("end_turn")]
    assert parser.session_id == SESSION


def test_a_result_without_messages_gives_its_text() -> None:
    parser = StreamJsonParser()
    events = parser.feed(
        b'{"type":"result","subtype":"success","is_error":false,"result":"Just this.",'
        b'"session_id":"s-1","usage":{"input_tokens":4,"output_tokens":3}}\n'
    )
    assert texts(events) == ["Just this."]
    assert parser.session_id == "s-1"
    assert parser.finish() == [UsageReport(4, 3), Stop("end_turn")]


def test_stop_reason_from_message_delta() -> None:
    parser = StreamJsonParser()
    lines = [
        '{"type":"stream_event","event":{"type":"message_start","message":{"id":"m1"}}}',
        '{"type":"stream_event","event":{"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"cut"}}}',
        '{"type":"stream_event","event":{"type":"message_delta",'
        '"delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":1}}}',
        '{"type":"result","subtype":"success","is_error":false,"result":"cut","usage":{}}',
    ]
    events = [e for line in lines for e in parser.feed(line)]
    assert texts(events) == ["cut"]
    assert parser.finish()[-1] == Stop("max_tokens")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Invalid API key · Please run /login", ProviderAuthError),
        ("Claude AI usage limit reached|1767225600", ProviderRateLimited),
        ("API Error: 429 rate_limit_error", ProviderRateLimited),
        ("Prompt is too long", ContextTooLong),
        ("spawn ENOENT", ProviderUnavailable),
    ],
)
def test_classify_error(text: str, kind: type[Exception]) -> None:
    assert isinstance(classify_error(text), kind)
