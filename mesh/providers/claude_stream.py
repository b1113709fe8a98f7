"""The Claude Code CLI's ``stream-json`` output, parsed; no process handling here.

``claude -p --output-format stream-json --verbose`` writes one JSON object per
line:

- ``{"type": "system", "subtype": "init", "session_id": ...}`` first (tools, model...);
- with ``--include-partial-messages``, ``{"type": "stream_event", "event": {...}}``
  carrying raw Messages API events: ``message_start`` (the message id),
  ``content_block_delta`` with ``text_delta`` (the tokens), ``message_delta``
  (the stop reason);
- ``{"type": "assistant", "message": {...}}`` with each whole message; its text is
  used only when the message was not already streamed as deltas;
- ``{"type": "user", ...}`` for the CLI's own tool results (ignored);
- ``{"type": "result", "subtype": "success" | "error_max_turns" | ..., "is_error",
  "result", "usage", "session_id"}`` last.

Lines that are not JSON objects are skipped (the CLI may print other things).
The mesh's tools are a text protocol (``<tool_call>`` blocks, see
:mod:`mesh.providers._common`): the parser splits them out of the streamed text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mesh.errors import (
    ContextTooLong,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers._common import ToolCallExtractor, normalize_stop, short
from mesh.providers.base import ModelEvent, Stop, StopReason, TextDelta, ToolCall, UsageReport

#: Text of a CLI asked to ``--resume`` a session it no longer has.
RESUME_LOST = "no conversation found"


def classify_error(text: str) -> ProviderError:
    """Map the CLI's error text to the mesh's provider errors."""
    message = short(text) or "the CLI failed"
    lowered = message.lower()
    meta = {"provider": "claude_cli"}
    if any(s in lowered for s in ("api key", "/login", "authentication", "not logged in", "401")):
        return ProviderAuthError(f"claude_cli: authentication failed: {message}", metadata=meta)
    if any(s in lowered for s in ("rate limit", "rate_limit", "usage limit", "429")):
        return ProviderRateLimited(f"claude_cli: rate limited: {message}", metadata=meta)
    if "prompt is too long" in lowered or "context window" in lowered:
        return ContextTooLong(f"claude_cli: context too long: {message}", metadata=meta)
    return ProviderUnavailable(f"claude_cli: {message}", metadata=meta)


@dataclass(frozen=True)
class CliResult:
    """The final ``result`` line."""

    subtype: str
    is_error: bool
    text: str
    """The ``result`` field: the answer, or what went wrong."""
    usage: UsageReport

    @property
    def message(self) -> str:
        """What to say about a failed call."""
        return self.text or self.subtype or "error"

    @property
    def max_turns(self) -> bool:
        """The CLI stopped at ``--max-turns``: not a failure, the answer is cut short."""
        return self.subtype == "error_max_turns"

    @property
    def failed(self) -> bool:
        return self.is_error and not self.max_turns

    @property
    def resume_lost(self) -> bool:
        return self.is_error and RESUME_LOST in self.message.lower()


def _usage(raw: Any) -> UsageReport:
    usage = raw if isinstance(raw, dict) else {}
    return UsageReport(
        input_tokens=int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
    )


class StreamJsonParser:
    """Turns stream-json lines into model events, one line at a time.

    :meth:`feed` returns the text and tool calls a line completes; once the
    ``result`` line arrived (:attr:`result`), :meth:`finish` returns the rest: any
    held-back text, a last tool call, the usage and the stop.
    """

    def __init__(self, id_prefix: str = "cli_call") -> None:
        self.session_id = ""
        """The CLI session id (from any line that carries one)."""
        self.result: CliResult | None = None
        self.emitted = False
        """Some text or tool call left the parser (a retry would repeat it)."""
        self._extractor = ToolCallExtractor(id_prefix)
        self._streamed: set[str] = set()
        self._stop_reason: str | None = None
        self._seen_text = False
        self._streaming = ""
        """Id of the message whose deltas are streaming."""
        self._last_message: str | None = None
        """Id of the message that gave the latest text (None: no text yet)."""

    def feed(self, line: bytes | str) -> list[ModelEvent]:
        """One line of output; the :class:`TextDelta` and :class:`ToolCall` events it completes."""
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []  # not protocol output
        if not isinstance(obj, dict) or self.result is not None:
            return []
        session = obj.get("session_id")
        if isinstance(session, str) and session:
            self.session_id = session
        kind = obj.get("type")
        if kind == "stream_event":
            return self._text(self._stream_event(obj.get("event")), self._streaming)
        if kind == "assistant":
            message = obj.get("message")
            mid = str(message.get("id", "")) if isinstance(message, dict) else ""
            return self._text(self._assistant(message), mid)
        if kind == "result":
            self.result = CliResult(
                subtype=str(obj.get("subtype") or ""),
                is_error=bool(obj.get("is_error")),
                text=str(obj.get("result") or ""),
                usage=_usage(obj.get("usage")),
            )
            if not self._seen_text and not self.result.is_error and self.result.text:
                return self._text([self.result.text], None)  # no message came before it
        return []

    def finish(self) -> list[ModelEvent]:
        """After a ``result`` that is not a failure: the last events of the call."""
        result = self.result
        assert result is not None and not result.failed, "finish() needs a successful result"
        events: list[ModelEvent] = []
        rest, calls = self._extractor.finish()
        if rest:
            events.append(TextDelta(rest))
        events.extend(ToolCall(call) for call in calls)
        events.append(result.usage)
        called = bool(self._extractor.calls)
        reason: StopReason = normalize_stop(self._stop_reason, has_tool_calls=called)
        if result.max_turns and not called:
            reason = "max_tokens"
        events.append(Stop(reason))
        return events

    def _stream_event(self, event: Any) -> list[str]:
        if not isinstance(event, dict):
            return []
        etype = event.get("type")
        if etype == "message_start":
            message = event.get("message")
            self._streaming = str(message.get("id", "")) if isinstance(message, dict) else ""
            self._streamed.add(self._streaming)
        elif etype == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and delta.get("text"):
                return [str(delta["text"])]
        elif etype == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                self._stop_reason = delta.get("stop_reason") or self._stop_reason
        return []

    def _assistant(self, message: Any) -> list[str]:
        if not isinstance(message, dict):
            return []
        self._stop_reason = message.get("stop_reason") or self._stop_reason
        if str(message.get("id", "")) in self._streamed:
            return []  # its text already arrived as deltas
        return [
            str(block.get("text", ""))
            for block in message.get("content") or ()
            if isinstance(block, dict) and block.get("type") == "text"
        ]

    def _text(self, texts: list[str], message_id: str | None) -> list[ModelEvent]:
        """Text of one message; a later message's text starts a new paragraph (the CLI's
        own tool loop answers in several messages)."""
        events: list[ModelEvent] = []
        for text in texts:
            self._seen_text = True
            if not text:
                continue
            if self._last_message is not None and message_id != self._last_message:
                text = "\n\n" + text
            self._last_message = message_id or ""
            shown, calls = self._extractor.feed(text)
            if shown:
                events.append(TextDelta(shown))
            events.extend(ToolCall(call) for call in calls)
        if events:
            self.emitted = True
        return events
