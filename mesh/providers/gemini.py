"""Google Gemini API, streamed, with function calling (official ``google-genai`` SDK).

Each call is ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``; the
answer streams as server-sent events, each a ``GenerateContentResponse`` whose
first candidate carries text parts and ``functionCall`` parts (arguments whole,
as an object). Tools go out as ``functionDeclarations`` with their JSON schema
(``parametersJsonSchema``); tool results go back as ``functionResponse`` parts of
a user turn (``{"output": ...}`` or ``{"error": ...}``). Thinking models sign
their function calls: the signature is kept per call id and sent back with the
call, as the API requires within a turn.

The SDK's own retries are off: 408/429/5xx and connection errors are retried
here with backoff, and only until the first chunk arrives. Example::

    provider:
      kind: gemini
      model: gemini-2.5-flash
      # api_key_env: GEMINI_API_KEY   # default: GOOGLE_API_KEY, then GEMINI_API_KEY
      temperature: 0.2
      max_tokens: 2048
"""

from __future__ import annotations

import contextvars
import itertools
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import (
    ConfigError,
    ContextTooLong,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from mesh.providers._common import optional_env, require_env, short, sleep_backoff
from mesh.providers.base import (
    ChatMessage,
    ModelEvent,
    ModelRequest,
    Provider,
    ProviderContext,
    ProviderSpec,
    Stop,
    StopReason,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
    UsageReport,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
#: Where the key is looked up when ``api_key_env`` is not set (the SDK's own order).
DEFAULT_KEY_ENVS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_SIGNATURES = 4096
#: Call ids made up here (the API gave none); they never go back on the wire.
_LOCAL_ID_PREFIX = "gemini_call_"

_FINISH: dict[str, StopReason] = {
    "STOP": "end_turn",
    "MAX_TOKENS": "max_tokens",
}


class GeminiOptions(BaseModel):
    """Settings of the ``gemini`` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_env: str | None = None
    """Environment variable holding the API key; unset: ``GOOGLE_API_KEY``, then
    ``GEMINI_API_KEY`` (required at start)."""
    base_url: str | None = None
    """API endpoint; overrides ``base_url_env``. Default
    ``https://generativelanguage.googleapis.com/``."""
    base_url_env: str | None = "GOOGLE_GEMINI_BASE_URL"
    """Environment variable that may hold the API endpoint (used when set)."""
    api_version: str = "v1beta"
    """The path's API version."""
    max_tokens: int | None = Field(default=1024, ge=1)
    """Most tokens to generate per call (``maxOutputTokens``); a request's own limit wins."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; the model's default when unset."""
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Nucleus sampling; the model's default when unset."""
    stop_sequences: list[str] = Field(default_factory=list)
    """Sequences that end generation."""
    thinking_budget: int | None = Field(default=None, ge=-1)
    """Thinking tokens per call for thinking models (0: off, -1: dynamic); model default
    when unset. Thought text is never shown; its tokens count as output."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Timeout of connecting and of each HTTP read, including the wait for the first token
    and between tokens."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries on 408/429/5xx and connection errors, only before the first chunk."""
    retry_backoff_s: float = Field(default=0.5, ge=0.0, le=60.0)
    """First retry delay; doubled per retry (with jitter), capped at 8 seconds."""


#: The HTTP responses opened by the model call running in this context (see ``_track``).
_OPENED: contextvars.ContextVar[list[httpx.Response] | None] = contextvars.ContextVar(
    "gemini_opened", default=None
)


async def _track(response: httpx.Response) -> None:
    """httpx response hook: remember the response so the call can close it itself.

    The SDK wraps the HTTP stream in several generators; closing the outermost one
    leaves the inner ones (and the connection) to the garbage collector. Closing the
    response directly stops the upstream at once.
    """
    opened = _OPENED.get()
    if opened is not None:
        opened.append(response)


def map_error(err: Exception, key_env: str, key: str) -> ProviderError:
    """Map an SDK/transport error to the mesh's provider errors (never holding the key)."""
    if isinstance(err, httpx.TimeoutException):
        return ProviderUnavailable("gemini: request timed out")
    if isinstance(err, httpx.TransportError):
        return ProviderUnavailable("gemini: cannot reach the API")
    if not isinstance(err, genai_errors.APIError):
        return ProviderUnavailable(_scrub(f"gemini: {short(err)}", key))
    status = int(err.code or 0)
    state = str(err.status or "")
    message = _scrub(short(err.message or state or "error"), key)
    meta = {"provider": "gemini", "http_status": str(status)}
    details = str(err.details)
    if (
        status in (401, 403)
        or state in ("UNAUTHENTICATED", "PERMISSION_DENIED")
        or "API_KEY_INVALID" in details
    ):
        return ProviderAuthError(
            f"gemini: authentication failed (check the key in {key_env}): {message}",
            metadata=meta,
        )
    if status == 429 or state == "RESOURCE_EXHAUSTED":
        return ProviderRateLimited(f"gemini: rate limited: {message}", metadata=meta)
    lowered = message.lower()
    if status == 413 or "exceeds the maximum number of tokens" in lowered:
        return ContextTooLong(f"gemini: context too long: {message}", metadata=meta)
    if status >= 500 or status == 0:
        return ProviderUnavailable(f"gemini: unavailable: {message}", metadata=meta)
    return ProviderError(f"gemini: request failed ({status}): {message}", metadata=meta)


def _scrub(text: str, key: str) -> str:
    """``text`` without the key, should a server or proxy echo it."""
    return text.replace(key, "***") if key else text


def _retryable(err: Exception) -> bool:
    if isinstance(err, genai_errors.APIError):
        return int(err.code or 0) in _RETRYABLE_STATUS
    return isinstance(err, httpx.TransportError)


def _result_payload(message: ChatMessage) -> dict[str, Any]:
    return {"error": message.content} if message.is_error else {"output": message.content}


def to_contents(
    messages: Sequence[ChatMessage], signatures: Mapping[str, bytes] | None = None
) -> tuple[str, list[types.Content]]:
    """Mesh messages as Gemini contents, plus system text found among them.

    Consecutive messages of one role merge into one content; tool results become
    ``functionResponse`` parts of a user turn; a function call the model signed
    goes back with its signature.
    """
    system: list[str] = []
    out: list[types.Content] = []
    signed = signatures or {}

    def add(role: str, parts: list[types.Part]) -> None:
        if not parts:
            return
        if out and out[-1].role == role and out[-1].parts is not None:
            out[-1].parts.extend(parts)
        else:
            out.append(types.Content(role=role, parts=parts))

    for message in messages:
        if message.role == "system":
            if message.content:
                system.append(message.content)
        elif message.role == "user":
            add("user", [types.Part(text=message.content)] if message.content else [])
        elif message.role == "assistant":
            parts = [types.Part(text=message.content)] if message.content else []
            parts.extend(
                types.Part(
                    function_call=types.FunctionCall(
                        id=_wire_id(call.id), name=call.name, args=dict(call.arguments)
                    ),
                    thought_signature=signed.get(call.id),
                )
                for call in message.tool_calls
            )
            add("model", parts)
        else:
            response = types.FunctionResponse(
                id=_wire_id(message.tool_call_id),
                name=message.name,
                response=_result_payload(message),
            )
            add("user", [types.Part(function_response=response)])
    return "\n\n".join(system), out


def _wire_id(call_id: str) -> str | None:
    return None if not call_id or call_id.startswith(_LOCAL_ID_PREFIX) else call_id


def to_tools(tools: Sequence[ToolSpec]) -> list[types.Tool]:
    declarations = [
        types.FunctionDeclaration(
            name=t.name, description=t.description, parameters_json_schema=dict(t.parameters)
        )
        for t in tools
    ]
    return [types.Tool(function_declarations=declarations)]


def normalize_finish(raw: str | None, *, has_tool_calls: bool) -> StopReason:
    """Gemini's ``finishReason`` as the mesh's stop reason."""
    if has_tool_calls:
        return "tool_use"
    return _FINISH.get(raw or "STOP", "end_turn")


def _key_and_env(options: GeminiOptions, environ: Mapping[str, str]) -> tuple[str, str]:
    """The API key and the name of the variable it came from (the name only is ever shown)."""
    if options.api_key_env:
        return require_env(environ, options.api_key_env, "gemini provider"), options.api_key_env
    for var in DEFAULT_KEY_ENVS:
        if environ.get(var):
            return environ[var], var
    raise ConfigError(
        "gemini provider: environment variable GEMINI_API_KEY (or GOOGLE_API_KEY) is not set"
    )


@dataclass
class _StreamState:
    calls: int = 0
    finish: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


class GeminiProvider:
    """Streams the Gemini API; see the module docstring."""

    kind = "gemini"

    def __init__(self, model: str, options: GeminiOptions, context: ProviderContext) -> None:
        self.model = model
        self.options = options
        env = context.environ
        self._key, self.key_env = _key_and_env(options, env)
        base_url = options.base_url or optional_env(env, options.base_url_env) or DEFAULT_BASE_URL
        timeout = httpx.Timeout(options.timeout_s)
        self._http = httpx.AsyncClient(timeout=timeout, event_hooks={"response": [_track]})
        self._client = genai.Client(
            vertexai=False,
            api_key=self._key,
            http_options=types.HttpOptions(
                base_url=base_url,
                api_version=options.api_version,
                timeout=int(options.timeout_s * 1000),
                httpx_async_client=self._http,
            ),
        )
        self._signatures: OrderedDict[str, bytes] = OrderedDict()
        self._ids = itertools.count(1)
        self._id_prefix = f"{_LOCAL_ID_PREFIX}{secrets.token_hex(4)}_"

    def __repr__(self) -> str:
        return f"GeminiProvider(model={self.model!r})"

    def _config(self, request: ModelRequest, system: str) -> types.GenerateContentConfig:
        opts = self.options
        thinking = (
            types.ThinkingConfig(thinking_budget=opts.thinking_budget)
            if opts.thinking_budget is not None
            else None
        )
        return types.GenerateContentConfig(
            system_instruction=system or None,
            tools=list(to_tools(request.tools)) if request.tools else None,
            max_output_tokens=request.max_tokens or opts.max_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            stop_sequences=list(opts.stop_sequences) or None,
            thinking_config=thinking,
            # The runtime runs the tools; the SDK must never call anything itself.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )

    async def _open(
        self, contents: list[types.Content], config: types.GenerateContentConfig
    ) -> tuple[AsyncIterator[types.GenerateContentResponse], types.GenerateContentResponse | None]:
        """Start the stream and read its first chunk, retrying only until that chunk."""
        attempt = 0
        while True:
            upstream = await self._client.aio.models.generate_content_stream(
                model=self.model, contents=contents, config=config
            )
            try:
                first = await anext(upstream, None)
            except (genai_errors.APIError, httpx.HTTPError) as err:
                await _close(upstream)
                if attempt >= self.options.max_retries or not _retryable(err):
                    raise map_error(err, self.key_env, self._key) from None
                await sleep_backoff(attempt, self.options.retry_backoff_s)
                attempt += 1
                continue
            except ValueError as err:  # the SDK could not parse a chunk
                await _close(upstream)
                raise ProviderUnavailable("gemini: malformed stream chunk") from err
            except BaseException:
                await _close(upstream)
                raise
            return upstream, first

    def _call(self, call: types.FunctionCall, signature: bytes | None) -> ToolCallRequest:
        if not call.name:
            raise ProviderUnavailable("gemini: the model sent a function call without a name")
        call_id = call.id or f"{self._id_prefix}{next(self._ids)}"
        if signature:
            self._signatures[call_id] = signature
            while len(self._signatures) > _MAX_SIGNATURES:
                self._signatures.popitem(last=False)
        return ToolCallRequest(call_id, call.name, dict(call.args or {}))

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        extra_system, contents = to_contents(request.messages, self._signatures)
        system = "\n\n".join(s for s in (request.system, extra_system) if s)
        config = self._config(request, system)
        opened: list[httpx.Response] = []
        upstream: AsyncIterator[types.GenerateContentResponse] | None = None
        try:
            # The request (and every retry) is sent inside ``_open``, in this task.
            _OPENED.set(opened)
            try:
                upstream, chunk = await self._open(contents, config)
            finally:
                _OPENED.set(None)
            state = _StreamState()
            while chunk is not None:
                for event in self._events(chunk, state):
                    yield event
                try:
                    chunk = await anext(upstream, None)
                except (genai_errors.APIError, httpx.HTTPError) as err:
                    raise map_error(err, self.key_env, self._key) from None
                except ValueError as err:
                    raise ProviderUnavailable("gemini: malformed stream chunk") from err
            if state.finish is None:
                raise ProviderUnavailable("gemini: the stream ended without a finish reason")
            if state.finish == "MALFORMED_FUNCTION_CALL" and not state.calls:
                raise ProviderUnavailable("gemini: the model wrote a malformed function call")
            yield UsageReport(state.input_tokens, state.output_tokens)
            yield Stop(normalize_finish(state.finish, has_tool_calls=state.calls > 0))
        finally:
            if upstream is not None:
                await _close(upstream)
            for response in opened:
                await response.aclose()

    def _events(
        self, chunk: types.GenerateContentResponse, state: _StreamState
    ) -> list[ModelEvent]:
        """The text and calls of one streamed chunk; usage and finish go into ``state``."""
        feedback = chunk.prompt_feedback
        if feedback is not None and feedback.block_reason:
            raise ProviderError(
                f"gemini: the prompt was blocked ({feedback.block_reason})",
                metadata={"provider": "gemini"},
            )
        usage = chunk.usage_metadata
        if usage is not None:  # cumulative: the last one counts
            state.input_tokens = usage.prompt_token_count or state.input_tokens
            thoughts = usage.thoughts_token_count or 0  # thinking is output too
            state.output_tokens = (usage.candidates_token_count or 0) + thoughts or (
                state.output_tokens
            )
        candidate = chunk.candidates[0] if chunk.candidates else None
        if candidate is None:
            return []
        events: list[ModelEvent] = []
        content = candidate.content
        for part in (content.parts if content is not None else None) or ():
            if part.function_call is not None:
                state.calls += 1
                events.append(ToolCall(self._call(part.function_call, part.thought_signature)))
            elif part.text and not part.thought:  # thought summaries are never shown
                events.append(TextDelta(part.text))
        if candidate.finish_reason is not None:
            state.finish = str(getattr(candidate.finish_reason, "value", candidate.finish_reason))
        return events

    async def aclose(self) -> None:
        await self._http.aclose()
        self._client.close()


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _factory(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, GeminiOptions)
    return GeminiProvider(model, options, context)


SPECS = [ProviderSpec(kind="gemini", options=GeminiOptions, factory=_factory)]
