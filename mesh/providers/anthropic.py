"""Anthropic Messages API, streamed, with tool use (official ``anthropic`` SDK).

Tool calls arrive as ``tool_use`` content blocks whose JSON input streams in
``input_json_delta`` fragments; a :class:`ToolCall` is emitted once its block
stops. Tool results go back as ``tool_result`` blocks in a user message.
Example::

    provider:
      kind: anthropic
      model: claude-sonnet-4-5
      api_key_env: ANTHROPIC_API_KEY   # the default
      max_tokens: 2048
      timeout_s: 60
      max_retries: 2
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import anthropic
from anthropic.types import (
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    ToolParam,
)
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import (
    ContextTooLong,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers._common import (
    normalize_stop,
    optional_env,
    parse_arguments,
    require_env,
    short,
)
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
    ToolSpec,
    UsageReport,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"


class AnthropicOptions(BaseModel):
    """Settings of the ``anthropic`` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_env: str = "ANTHROPIC_API_KEY"
    """Environment variable holding the API key (required at start)."""
    base_url: str | None = None
    """API endpoint; overrides ``base_url_env``. Default ``https://api.anthropic.com``."""
    base_url_env: str | None = "ANTHROPIC_BASE_URL"
    """Environment variable that may hold the API endpoint (used when set)."""
    max_tokens: int = Field(default=1024, ge=1)
    """Most tokens to generate per call (a request's own limit wins)."""
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    """Sampling temperature; the model's default when unset."""
    stop_sequences: list[str] = Field(default_factory=list)
    """Extra sequences that end generation (stop reason ``stop_sequence``)."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Timeout of each HTTP read, including the wait for the first token and between tokens."""
    connect_timeout_s: float = Field(default=10.0, gt=0.0)
    """Timeout to open the connection."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries (with the SDK's backoff) on 408/409/429/5xx and connection errors,
    only before the response starts streaming."""


@dataclass
class _ToolBlock:
    id: str
    name: str
    initial: dict[str, Any]
    parts: list[str] = field(default_factory=list)


def map_error(err: anthropic.APIError) -> ProviderError:
    """Map an SDK error to the mesh's provider errors (the message never holds a key)."""
    if isinstance(err, anthropic.APITimeoutError):
        return ProviderUnavailable("anthropic: request timed out")
    if isinstance(err, anthropic.APIConnectionError):
        return ProviderUnavailable("anthropic: cannot reach the API")
    if not isinstance(err, anthropic.APIStatusError):
        return ProviderUnavailable(f"anthropic: {short(err.message)}")
    status = err.status_code
    etype = str(err.type or "")
    message = short(err.api_message or err.message)
    meta = {"provider": "anthropic", "http_status": str(status)}
    if status in (401, 403) or etype in ("authentication_error", "permission_error"):
        return ProviderAuthError(f"anthropic: authentication failed: {message}", metadata=meta)
    if status == 429 or etype == "rate_limit_error":
        return ProviderRateLimited(f"anthropic: rate limited: {message}", metadata=meta)
    lowered = message.lower()
    if status == 413 or etype == "request_too_large" or "prompt is too long" in lowered:
        return ContextTooLong(f"anthropic: context too long: {message}", metadata=meta)
    if status >= 500 or etype in ("overloaded_error", "api_error"):
        return ProviderUnavailable(f"anthropic: unavailable: {message}", metadata=meta)
    return ProviderError(f"anthropic: request failed ({status}): {message}", metadata=meta)


def to_messages(messages: Sequence[ChatMessage]) -> tuple[str, list[MessageParam]]:
    """Mesh messages as Messages API messages, plus system text found among them.

    Consecutive messages of one role merge (the API wants user/assistant turns to
    alternate); tool results become ``tool_result`` blocks of a user turn.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for message in messages:
        if message.role == "system":
            if message.content:
                system.append(message.content)
        elif message.role == "user":
            add("user", [{"type": "text", "text": message.content}] if message.content else [])
        elif message.role == "assistant":
            blocks: list[dict[str, Any]] = []
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            blocks.extend(
                {"type": "tool_use", "id": c.id, "name": c.name, "input": dict(c.arguments)}
                for c in message.tool_calls
            )
            add("assistant", blocks)
        else:
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": message.tool_call_id,
                        "content": message.content,
                        "is_error": message.is_error,
                    }
                ],
            )
    return "\n\n".join(system), cast(list[MessageParam], out)


def to_tools(tools: Sequence[ToolSpec]) -> list[ToolParam]:
    return [
        cast(
            ToolParam,
            {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)},
        )
        for t in tools
    ]


class _StreamState:
    """What one Messages stream has said so far; :meth:`handle` turns each raw event
    into the normalized events it yields."""

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.stopped = False
        self.calls = 0
        self.tools: dict[int, _ToolBlock] = {}

    def handle(self, event: Any) -> list[ModelEvent]:
        if isinstance(event, RawMessageStartEvent):
            usage = event.message.usage
            self.input_tokens = (
                usage.input_tokens
                + (usage.cache_creation_input_tokens or 0)
                + (usage.cache_read_input_tokens or 0)
            )
            self.output_tokens = usage.output_tokens
        elif isinstance(event, RawContentBlockStartEvent):
            block = event.content_block
            if block.type == "tool_use":
                initial = dict(cast(dict[str, Any], block.input) or {})
                self.tools[event.index] = _ToolBlock(block.id, block.name, initial)
            elif block.type == "text" and block.text:
                return [TextDelta(block.text)]
        elif isinstance(event, RawContentBlockDeltaEvent):
            delta = event.delta
            if delta.type == "text_delta" and delta.text:
                return [TextDelta(delta.text)]
            if delta.type == "input_json_delta" and event.index in self.tools:
                self.tools[event.index].parts.append(delta.partial_json)
        elif isinstance(event, RawContentBlockStopEvent):
            return self._tool_done(event.index)
        elif isinstance(event, RawMessageDeltaEvent):
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            self.output_tokens = event.usage.output_tokens
            if event.usage.input_tokens is not None:
                self.input_tokens = max(self.input_tokens, event.usage.input_tokens)
        elif isinstance(event, RawMessageStopEvent):
            self.stopped = True
        return []

    def _tool_done(self, index: int) -> list[ModelEvent]:
        tool = self.tools.pop(index, None)
        if tool is None:
            return []
        raw = "".join(tool.parts)
        args = parse_arguments(raw, tool=tool.name) if raw else tool.initial
        self.calls += 1
        return [ToolCall(ToolCallRequest(tool.id, tool.name, args))]


class AnthropicProvider:
    """Streams the Messages API; see the module docstring."""

    kind = "anthropic"

    def __init__(self, model: str, options: AnthropicOptions, context: ProviderContext) -> None:
        self.model = model
        self.options = options
        api_key = require_env(context.environ, options.api_key_env, "anthropic provider")
        base_url = (
            options.base_url
            or optional_env(context.environ, options.base_url_env)
            or DEFAULT_BASE_URL
        )
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=anthropic.Timeout(options.timeout_s, connect=options.connect_timeout_s),
            max_retries=options.max_retries,
        )

    def __repr__(self) -> str:
        return f"AnthropicProvider(model={self.model!r})"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        extra_system, messages = to_messages(request.messages)
        system = "\n\n".join(s for s in (request.system, extra_system) if s)
        extra_body: dict[str, Any] = {}
        if self.options.temperature is not None:
            extra_body["temperature"] = self.options.temperature
        try:
            upstream = await self._client.messages.create(
                model=self.model,
                max_tokens=request.max_tokens or self.options.max_tokens,
                messages=messages,
                system=system if system else anthropic.omit,
                tools=to_tools(request.tools) if request.tools else anthropic.omit,
                stop_sequences=self.options.stop_sequences or anthropic.omit,
                extra_body=extra_body or None,
                stream=True,
            )
        except anthropic.APIError as err:
            raise map_error(err) from err
        # ``async with`` closes the HTTP response however this generator ends:
        # exhausted, failed, cancelled or closed by the consumer.
        async with upstream:
            state = _StreamState()
            try:
                async for event in upstream:
                    for out in state.handle(event):
                        yield out
                    if state.stopped:
                        break
            except anthropic.APIError as err:
                raise map_error(err) from err
            except json.JSONDecodeError as err:
                raise ProviderUnavailable(f"anthropic: malformed stream event: {err.msg}") from err
            if not state.stopped:
                raise ProviderUnavailable("anthropic: the stream ended before message_stop")
            yield UsageReport(input_tokens=state.input_tokens, output_tokens=state.output_tokens)
            yield Stop(normalize_stop(state.stop_reason, has_tool_calls=state.calls > 0))

    async def aclose(self) -> None:
        await self._client.close()


def _factory(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, AnthropicOptions)
    return AnthropicProvider(model, options, context)


SPECS = [ProviderSpec(kind="anthropic", options=AnthropicOptions, factory=_factory)]
