"""Ollama ``/api/chat``, streamed as NDJSON, with tools (official ``ollama`` SDK).

Ollama sends each tool call whole (arguments as an object) and gives calls no
id, so ids are made up here; tool results go back as ``role: tool`` messages
with the ``tool_name``. The SDK has no retries: 429/5xx and connection errors
are retried here with backoff, and only until the first chunk arrives.
Example::

    provider:
      kind: ollama
      model: llama3.2
      host: http://127.0.0.1:11434   # or host_env (OLLAMA_HOST by default)
      temperature: 0.2
      num_ctx: 8192
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import ollama
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
    require_env,
    short,
    sleep_backoff,
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

DEFAULT_HOST = "http://127.0.0.1:11434"
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OllamaOptions(BaseModel):
    """Settings of the ``ollama`` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = None
    """Server URL; overrides ``host_env``. Default ``http://127.0.0.1:11434``."""
    host_env: str | None = "OLLAMA_HOST"
    """Environment variable that may hold the server URL (used when set)."""
    api_key_env: str | None = None
    """Environment variable holding a bearer key (ollama.com or a proxy); required when named."""
    max_tokens: int | None = Field(default=1024, ge=1)
    """Most tokens to generate per call (``num_predict``); a request's own limit wins."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; the model's default when unset."""
    num_ctx: int | None = Field(default=None, ge=256)
    """Context window size in tokens; the model's default when unset."""
    stop: list[str] = Field(default_factory=list)
    """Sequences that end generation."""
    keep_alive: str | None = None
    """How long the server keeps the model loaded after the call, e.g. ``"5m"``."""
    timeout_s: float = Field(default=120.0, gt=0.0)
    """Timeout of each HTTP read, including the wait for the first token and between tokens."""
    connect_timeout_s: float = Field(default=10.0, gt=0.0)
    """Timeout to open the connection."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries on 408/409/429/5xx and connection errors, only before the first chunk."""
    retry_backoff_s: float = Field(default=0.5, ge=0.0, le=60.0)
    """First retry delay; doubled per retry (with jitter), capped at 8 seconds."""


def map_error(err: Exception) -> ProviderError:
    """Map an SDK/transport error to the mesh's provider errors."""
    if isinstance(err, ollama.ResponseError):
        status = err.status_code
        message = short(err.error)
        meta = {"provider": "ollama", "http_status": str(status)}
        lowered = message.lower()
        if status in (401, 403):
            return ProviderAuthError(f"ollama: authentication failed: {message}", metadata=meta)
        if status == 429:
            return ProviderRateLimited(f"ollama: rate limited: {message}", metadata=meta)
        if status == 413 or "context length" in lowered or "context window" in lowered:
            return ContextTooLong(f"ollama: context too long: {message}", metadata=meta)
        if status >= 500 or status < 0:
            return ProviderUnavailable(f"ollama: unavailable: {message}", metadata=meta)
        return ProviderError(f"ollama: request failed ({status}): {message}", metadata=meta)
    if isinstance(err, httpx.TimeoutException):
        return ProviderUnavailable("ollama: request timed out")
    return ProviderUnavailable("ollama: cannot reach the server")


def _retryable(err: Exception) -> bool:
    if isinstance(err, ollama.ResponseError):
        return err.status_code in _RETRYABLE_STATUS
    return isinstance(err, ConnectionError | httpx.TransportError)


def to_messages(system: str, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Mesh messages as Ollama chat messages (tool results as ``role: tool``)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in messages:
        if message.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": message.content}
            if message.tool_calls:
                item["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": dict(c.arguments)}}
                    for c in message.tool_calls
                ]
            out.append(item)
        elif message.role == "tool":
            content = message.content
            if message.is_error and not content.lower().startswith("error"):
                content = f"Error: {content}"
            out.append({"role": "tool", "content": content, "tool_name": message.name})
        else:
            out.append({"role": message.role, "content": message.content})
    return out


def to_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in tools
    ]


class OllamaProvider:
    """Streams Ollama's chat API; see the module docstring."""

    kind = "ollama"

    def __init__(self, model: str, options: OllamaOptions, context: ProviderContext) -> None:
        self.model = model
        self.options = options
        env = context.environ
        host = options.host or optional_env(env, options.host_env) or DEFAULT_HOST
        headers: dict[str, str] = {}
        if options.api_key_env:
            key = require_env(env, options.api_key_env, "ollama provider")
            headers["Authorization"] = f"Bearer {key}"
        self._client = ollama.AsyncClient(
            host=host,
            headers=headers,
            timeout=httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s),
        )
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"OllamaProvider(model={self.model!r})"

    def _model_options(self, request: ModelRequest) -> dict[str, Any]:
        opts = self.options
        out: dict[str, Any] = {}
        max_tokens = request.max_tokens or opts.max_tokens
        if max_tokens:
            out["num_predict"] = max_tokens
        if opts.temperature is not None:
            out["temperature"] = opts.temperature
        if opts.num_ctx is not None:
            out["num_ctx"] = opts.num_ctx
        if opts.stop:
            out["stop"] = list(opts.stop)
        return out

    async def _open(
        self, request: ModelRequest
    ) -> tuple[AsyncIterator[ollama.ChatResponse], ollama.ChatResponse | None]:
        """Start the stream and read its first chunk, retrying only until that chunk."""
        messages = to_messages(request.system, request.messages)
        tools = to_tools(request.tools) if request.tools else None
        options = self._model_options(request)
        attempt = 0
        while True:
            upstream = await self._client.chat(
                model=self.model,
                messages=messages,
                tools=tools,
                stream=True,
                options=options or None,
                keep_alive=self.options.keep_alive,
            )
            try:
                first = await anext(upstream, None)
            except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as err:
                await _close(upstream)
                if attempt >= self.options.max_retries or not _retryable(err):
                    raise map_error(err) from err
                await sleep_backoff(attempt, self.options.retry_backoff_s)
                attempt += 1
                continue
            except BaseException:
                await _close(upstream)
                raise
            return upstream, first

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        upstream, chunk = await self._open(request)
        # Closing the SDK's generator closes its ``httpx`` response (and connection).
        try:
            calls = 0
            done_reason: str | None = None
            input_tokens = output_tokens = 0
            done = False
            while chunk is not None:
                message = chunk.message
                if message.content:
                    yield TextDelta(message.content)
                for call in message.tool_calls or ():
                    calls += 1
                    call_id = f"ollama_call_{next(self._ids)}"
                    args = dict(call.function.arguments or {})
                    yield ToolCall(ToolCallRequest(call_id, call.function.name, args))
                if chunk.done:
                    done = True
                    done_reason = chunk.done_reason
                    input_tokens = chunk.prompt_eval_count or 0
                    output_tokens = chunk.eval_count or 0
                    break
                try:
                    chunk = await anext(upstream, None)
                except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as err:
                    raise map_error(err) from err
                except ValueError as err:  # a line that is not JSON
                    raise ProviderUnavailable("ollama: malformed stream line") from err
            if not done:
                raise ProviderUnavailable("ollama: the stream ended before done")
            yield UsageReport(input_tokens=input_tokens, output_tokens=output_tokens)
            yield Stop(normalize_stop(done_reason, has_tool_calls=calls > 0))
        finally:
            await _close(upstream)

    async def aclose(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _factory(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, OllamaOptions)
    return OllamaProvider(model, options, context)


SPECS = [ProviderSpec(kind="ollama", options=OllamaOptions, factory=_factory)]
