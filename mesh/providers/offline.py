"""The offline model: deterministic, no network, no key.

It follows rules from the agent's config so that tests and the demo can drive
every path of the runtime: canned replies, keyword-triggered tool calls,
TRANSFER and CONSULT handoffs (several consults at once), END_CONVERSATION. It
streams its answer in chunks, optionally with a pause per chunk to act as a slow
model. Example::

    provider:
      kind: offline
      model: offline-1
      rules:
        - contains: [refund, invoice]
          handoff: billing
        - contains: weather
          tool: get_weather
          arguments: {city: Paris}
        - contains: [hello, hi]
          reply: "Hello! How can I help?"
      default_reply: "{agent} heard: {message}"
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh.matching import TextCondition
from mesh.providers.base import (
    ChatMessage,
    ModelEvent,
    ModelRequest,
    Provider,
    ProviderContext,
    ProviderSpec,
    Stop,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    UsageReport,
)


class OfflineRule(TextCondition):
    """When the user's message contains any of ``contains`` or matches ``matches``, do
    one thing."""

    reply: str | None = None
    """Answer with this text (``{agent}`` and ``{message}`` are filled in)."""
    tool: str | None = None
    """Call this tool with ``arguments``."""
    arguments: dict[str, Any] = Field(default_factory=dict)
    handoff: str | None = None
    """Hand the conversation to this agent (``mode`` says how)."""
    mode: Literal["transfer", "consult"] = "transfer"
    consult: list[str] = Field(default_factory=list)
    """Consult all of these agents at once and consolidate their answers."""
    end_conversation: bool = False
    """End the conversation (the router closes it)."""
    reason: str = ""
    """The reason given with a handoff."""

    @model_validator(mode="after")
    def _one_action(self) -> OfflineRule:
        actions = [
            self.reply is not None,
            self.tool is not None,
            self.handoff is not None,
            bool(self.consult),
            self.end_conversation,
        ]
        if sum(actions) != 1:
            raise ValueError(
                "a rule needs exactly one of reply, tool, handoff, consult, end_conversation"
            )
        if not self.contains and self.matches is None:
            raise ValueError("a rule needs `contains` or `matches`")
        return self

    def hit(self, text: str) -> bool:
        return self.contains_any(text) or self.matches_pattern(text)


class OfflineOptions(BaseModel):
    """Settings of the offline model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[OfflineRule] = Field(default_factory=list)
    """Checked in order against the latest user message; the first hit acts."""
    default_reply: str = "{agent} heard: {message}"
    """The answer when no rule hits (``{turns}``: user messages so far, this one included)."""
    after_tools: str = "{agent} found: {results}"
    """The answer once tool or consult results are back (``{results}``)."""
    chunk_chars: int = Field(default=12, ge=1, le=4096)
    """Characters per streamed delta (split on word boundaries where possible)."""
    delay_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)
    """Pause before each delta, to act as a slow model."""


class _SafeFormat(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def chunk_text(text: str, size: int) -> list[str]:
    """Split text into deltas of about ``size`` characters on word boundaries."""
    chunks: list[str] = []
    current = ""
    for word in re.split(r"(?<=\s)", text):
        if current and len(current) + len(word) > size:
            chunks.append(current)
            current = ""
        current += word
        while len(current) > size:
            chunks.append(current[:size])
            current = current[size:]
    if current:
        chunks.append(current)
    return chunks


def _last_user(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""


def _pending_results(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Tool results after the last assistant message, if the conversation ends on them."""
    results: list[ChatMessage] = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        results.append(message)
    return list(reversed(results))


class OfflineProvider:
    """A deterministic rule-following model (see the module docstring)."""

    kind = "offline"

    def __init__(self, model: str, options: OfflineOptions, context: ProviderContext) -> None:
        self.model = model
        self.options = options
        self.agent = context.agent
        self._calls = 0

    def _words(self, messages: list[ChatMessage]) -> int:
        return sum(len(m.content.split()) for m in messages)

    def _plan(self, request: ModelRequest) -> tuple[str, list[ToolCallRequest]]:
        messages = list(request.messages)
        tools = {tool.name for tool in request.tools}
        fmt = _SafeFormat(agent=request.agent or self.agent, model=self.model)
        pending = _pending_results(messages)
        if pending:
            fmt["results"] = "; ".join(
                f"{m.name}: {m.content}" if m.name else m.content for m in pending
            )
            return self.options.after_tools.format_map(fmt), []
        text = _last_user(messages)
        fmt["message"] = text
        fmt["turns"] = str(sum(1 for m in messages if m.role == "user"))
        self._calls += 1
        for rule in self.options.rules:
            if not rule.hit(text):
                continue
            call_id = f"call_{self._calls}"
            if rule.reply is not None:
                return rule.reply.format_map(fmt), []
            if rule.tool is not None and rule.tool in tools:
                return "", [ToolCallRequest(call_id, rule.tool, dict(rule.arguments))]
            if rule.handoff is not None:
                prefix = "transfer_to_" if rule.mode == "transfer" else "ask_"
                name = prefix + rule.handoff
                if name in tools:
                    args = {
                        "reason": rule.reason or f"matched rule for {rule.handoff}",
                        "message": text,
                    }
                    return "", [ToolCallRequest(call_id, name, args)]
            if rule.consult:
                calls = [
                    ToolCallRequest(
                        f"{call_id}_{i}",
                        f"ask_{target}",
                        {"reason": rule.reason or "consult", "message": text},
                    )
                    for i, target in enumerate(rule.consult)
                    if f"ask_{target}" in tools
                ]
                if calls:
                    return "", calls
            if rule.end_conversation and "end_conversation" in tools:
                args = {"reason": rule.reason or "conversation ended"}
                return "", [ToolCallRequest(call_id, "end_conversation", args)]
        return self.options.default_reply.format_map(fmt), []

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        text, calls = self._plan(request)
        delay = self.options.delay_ms / 1000.0
        for chunk in chunk_text(text, self.options.chunk_chars):
            await asyncio.sleep(delay)
            yield TextDelta(chunk)
        for call in calls:
            await asyncio.sleep(delay)
            yield ToolCall(call)
        yield UsageReport(
            input_tokens=self._words(list(request.messages)) + len(request.system.split()),
            output_tokens=len(text.split()) + len(calls),
        )
        yield Stop("tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


def _factory(model: str, options: Any, context: ProviderContext) -> Provider:
    assert isinstance(options, OfflineOptions)
    return OfflineProvider(model, options, context)


SPECS = [ProviderSpec(kind="offline", options=OfflineOptions, factory=_factory)]


def describe(options: Mapping[str, Any]) -> str:
    """One line on what an offline config does (for `mesh info`)."""
    parsed = OfflineOptions.model_validate(dict(options))
    return f"offline model with {len(parsed.rules)} rules"
