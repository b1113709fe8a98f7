"""OpenAI Chat Completions, streamed, with tools (official ``openai`` SDK).

Three kinds share this module:

``openai`` — api.openai.com (or any ``base_url``), key from ``api_key_env``::

    provider:
      kind: openai
      model: gpt-4o-mini
      api_key_env: OPENAI_API_KEY   # the default
      temperature: 0.2

``azure_openai`` — ``AsyncAzureOpenAI``: endpoint and key from the environment,
a deployment (defaults to the model name) and an API version::

    provider:
      kind: azure_openai
      model: gpt-4o
      deployment: gpt-4o-prod
      api_version: "2024-10-21"
      endpoint_env: AZURE_OPENAI_ENDPOINT   # the default
      api_key_env: AZURE_OPENAI_API_KEY     # the default

``openai_compatible`` — any server speaking the API (vLLM, LM Studio, llama.cpp
server, ``llama_cpp.server``); the key is optional::

    provider:
      kind: openai_compatible
      model: smollm2
      base_url: http://127.0.0.1:8000/v1
      # api_key_env: VLLM_API_KEY

Usage comes from the stream's last chunk (``stream_options.include_usage``). For servers
that stream none (``llama_cpp.server`` 0.3.x), ``openai_compatible`` (``usage_fallback:
request``) asks once more, unstreamed with ``max_tokens: 1``, for the prompt's count and
counts the streamed chunks for the output (docs/local-model.md says how exact that is).

Tool-call arguments stream as string fragments per ``index``; a
:class:`ToolCall` is emitted once the choice finishes. Tool results go back as
``role: tool`` messages carrying the ``tool_call_id``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import (
    ConfigError,
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

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_AZURE_API_VERSION = "2024-10-21"


class _ChatOptions(BaseModel):
    """Settings every Chat Completions kind shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=1024, ge=1)
    """Most tokens to generate per call (a request's own limit wins); unset: the server's."""
    max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    """The request field that carries ``max_tokens`` (older servers know only ``max_tokens``)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; the server's default when unset."""
    stop: list[str] = Field(default_factory=list)
    """Sequences that end generation."""
    parallel_tool_calls: bool | None = None
    """Allow several tool calls in one turn; the server's default when unset."""
    stream_usage: bool = True
    """Ask for token usage at the end of the stream (``stream_options.include_usage``)."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Timeout of each HTTP read, including the wait for the first token and between tokens."""
    connect_timeout_s: float = Field(default=10.0, gt=0.0)
    """Timeout to open the connection."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries (with the SDK's backoff) on 408/409/429/5xx and connection errors,
    only before the response starts streaming."""


class OpenAIOptions(_ChatOptions):
    """Settings of the ``openai`` provider."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (required at start)."""
    base_url: str | None = None
    """API endpoint; overrides ``base_url_env``. Default ``https://api.openai.com/v1``."""
    base_url_env: str | None = "OPENAI_BASE_URL"
    """Environment variable that may hold the API endpoint (used when set)."""
    organization_env: str | None = "OPENAI_ORG_ID"
    """Environment variable that may hold the organization id (sent when set)."""


class AzureOpenAIOptions(_ChatOptions):
    """Settings of the ``azure_openai`` provider."""

    endpoint: str | None = None
    """Resource endpoint, e.g. ``https://myres.openai.azure.com``; overrides ``endpoint_env``."""
    endpoint_env: str = "AZURE_OPENAI_ENDPOINT"
    """Environment variable holding the resource endpoint (required unless ``endpoint``)."""
    api_key_env: str = "AZURE_OPENAI_API_KEY"
    """Environment variable holding the API key (required at start)."""
    deployment: str | None = None
    """Deployment name; defaults to the agent's ``model``."""
    api_version: str = DEFAULT_AZURE_API_VERSION
    """The ``api-version`` query parameter."""


class OpenAICompatibleOptions(_ChatOptions):
    """Settings of the ``openai_compatible`` provider (vLLM, LM Studio, llama.cpp server...)."""

    base_url: str | None = None
    """Server endpoint including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``."""
    base_url_env: str | None = None
    """Environment variable holding the endpoint (used when ``base_url`` is unset)."""
    api_key_env: str | None = None
    """Environment variable holding the key; unset: no ``Authorization`` header is sent."""
    max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_tokens"
    """The request field that carries ``max_tokens`` (most servers know ``max_tokens``)."""
    usage_fallback: Literal["request", "none"] = "request"
    """When the server streams no usage: ``request`` counts the prompt with one more,
    non-streamed ``max_tokens: 1`` call and the output as the streamed text chunks;
    ``none`` reports 0 and 0."""


@dataclass
class _Seen:
    """What the stream carried, for counting tokens when it carried no usage."""

    chunks: int = 0
    usage: bool = False


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)


def map_error(err: openai.APIError, provider: str) -> ProviderError:
    """Map an SDK error to the mesh's provider errors (the message never holds a key)."""
    if isinstance(err, openai.APITimeoutError):
        return ProviderUnavailable(f"{provider}: request timed out")
    if isinstance(err, openai.APIConnectionError):
        return ProviderUnavailable(f"{provider}: cannot reach the API")
    status = err.status_code if isinstance(err, openai.APIStatusError) else 0
    code = str(err.code or "")
    etype = str(err.type or "")
    message = short(err.message)
    meta = {"provider": provider, "http_status": str(status)}
    if status in (401, 403) or code == "invalid_api_key" or etype == "authentication_error":
        return ProviderAuthError(f"{provider}: authentication failed: {message}", metadata=meta)
    if status == 429 or code in ("rate_limit_exceeded", "insufficient_quota"):
        return ProviderRateLimited(f"{provider}: rate limited: {message}", metadata=meta)
    lowered = message.lower()
    if (
        status == 413
        or code == "context_length_exceeded"
        or "context length" in lowered
        or "context window" in lowered
    ):
        return ContextTooLong(f"{provider}: context too long: {message}", metadata=meta)
    if status >= 500 or status == 0:
        return ProviderUnavailable(f"{provider}: unavailable: {message}", metadata=meta)
    return ProviderError(f"{provider}: request failed ({status}): {message}", metadata=meta)


def to_messages(system: str, messages: Sequence[ChatMessage]) -> list[ChatCompletionMessageParam]:
    """Mesh messages as Chat Completions messages (tool results as ``role: tool``)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in messages:
        if message.role in ("system", "user"):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": message.content or None}
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                    }
                    for call in message.tool_calls
                ]
            out.append(item)
        else:
            content = message.content
            if message.is_error and not content.lower().startswith("error"):
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": content})
    return cast(list[ChatCompletionMessageParam], out)


def to_tools(tools: Sequence[ToolSpec]) -> list[ChatCompletionToolParam]:
    return [
        cast(
            ChatCompletionToolParam,
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": dict(t.parameters),
                },
            },
        )
        for t in tools
    ]


class OpenAIChatProvider:
    """Streams Chat Completions from OpenAI, Azure OpenAI or a compatible server."""

    def __init__(
        self,
        kind: str,
        model: str,
        options: _ChatOptions,
        client: openai.AsyncOpenAI,
        *,
        omit_authorization: bool = False,
        count_usage: bool = False,
    ) -> None:
        self.kind = kind
        self.model = model
        self.options = options
        self._client = client
        self._count_usage = count_usage
        self._extra_headers: Mapping[str, Any] | None = (
            {"Authorization": openai.omit} if omit_authorization else None
        )

    def __repr__(self) -> str:
        return f"OpenAIChatProvider(kind={self.kind!r}, model={self.model!r})"

    def _body_options(self, request: ModelRequest) -> dict[str, Any]:
        opts = self.options
        body: dict[str, Any] = {}
        max_tokens = request.max_tokens or opts.max_tokens
        if max_tokens:
            body[opts.max_tokens_param] = max_tokens
        if opts.temperature is not None:
            body["temperature"] = opts.temperature
        if opts.stop:
            body["stop"] = list(opts.stop)
        if opts.parallel_tool_calls is not None and request.tools:
            body["parallel_tool_calls"] = opts.parallel_tool_calls
        if opts.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        try:
            upstream = await self._client.chat.completions.create(
                model=self.model,
                messages=to_messages(request.system, request.messages),
                tools=to_tools(request.tools) if request.tools else openai.omit,
                stream=True,
                extra_headers=self._extra_headers,
                extra_body=self._body_options(request),
            )
        except openai.APIError as err:
            raise map_error(err, self.kind) from err
        # ``async with`` closes the HTTP response however this generator ends.
        async with upstream:
            pending: dict[int, _PendingCall] = {}
            finish: str | None = None
            input_tokens = output_tokens = 0
            calls = 0
            seen = _Seen()
            try:
                async for chunk in upstream:
                    if chunk.usage is not None:
                        seen.usage = True
                        input_tokens = chunk.usage.prompt_tokens or 0
                        output_tokens = chunk.usage.completion_tokens or 0
                    for choice in chunk.choices:
                        if choice.index != 0:
                            continue
                        delta = choice.delta
                        if delta.content or delta.tool_calls:
                            seen.chunks += 1
                        if delta.content:
                            yield TextDelta(delta.content)
                        for fragment in delta.tool_calls or ():
                            slot = pending.setdefault(fragment.index, _PendingCall())
                            if fragment.id:
                                slot.id = fragment.id
                            if fragment.function is not None:
                                if fragment.function.name and not slot.name:
                                    slot.name = fragment.function.name
                                if fragment.function.arguments:
                                    slot.parts.append(fragment.function.arguments)
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
                            for event in self._flush(pending):
                                calls += 1
                                yield event
            except openai.APIError as err:
                raise map_error(err, self.kind) from err
            for event in self._flush(pending):
                calls += 1
                yield event
            if not seen.usage and self._count_usage:
                input_tokens = await self._prompt_tokens(request)
                output_tokens = seen.chunks
            yield UsageReport(input_tokens=input_tokens, output_tokens=output_tokens)
            yield Stop(normalize_stop(finish, has_tool_calls=calls > 0))

    async def _prompt_tokens(self, request: ModelRequest) -> int:
        """The prompt's tokens by the server's own count: a non-streamed call of one
        output token (for servers that stream no usage); 0 if it reports none either."""
        body = self._body_options(request)
        body.pop("stream_options", None)
        body[self.options.max_tokens_param] = 1
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=to_messages(request.system, request.messages),
                tools=to_tools(request.tools) if request.tools else openai.omit,
                stream=False,
                extra_headers=self._extra_headers,
                extra_body=body,
            )
        except openai.APIError:
            return 0
        usage = response.usage
        return usage.prompt_tokens if usage is not None and usage.prompt_tokens else 0

    @staticmethod
    def _flush(pending: dict[int, _PendingCall]) -> list[ToolCall]:
        events: list[ToolCall] = []
        for index in sorted(pending):
            slot = pending[index]
            if not slot.name:
                raise ProviderUnavailable("model streamed a tool call without a function name")
            args = parse_arguments("".join(slot.parts), tool=slot.name)
            events.append(ToolCall(ToolCallRequest(slot.id or f"call_{index}", slot.name, args)))
        pending.clear()
        return events

    async def aclose(self) -> None:
        await self._client.close()


def _timeout(options: _ChatOptions) -> openai.Timeout:
    return openai.Timeout(options.timeout_s, connect=options.connect_timeout_s)


def _openai(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, OpenAIOptions)
    env = context.environ
    client = openai.AsyncOpenAI(
        api_key=require_env(env, options.api_key_env, "openai provider"),
        organization=optional_env(env, options.organization_env),
        base_url=options.base_url or optional_env(env, options.base_url_env) or DEFAULT_BASE_URL,
        timeout=_timeout(options),
        max_retries=options.max_retries,
    )
    return OpenAIChatProvider("openai", model, options, client)


def _azure(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, AzureOpenAIOptions)
    env = context.environ
    endpoint = options.endpoint or require_env(env, options.endpoint_env, "azure_openai provider")
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint,
        azure_deployment=options.deployment or model,
        api_version=options.api_version,
        api_key=require_env(env, options.api_key_env, "azure_openai provider"),
        timeout=_timeout(options),
        max_retries=options.max_retries,
    )
    return OpenAIChatProvider("azure_openai", model, options, client)


def _compatible(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, OpenAICompatibleOptions)
    env = context.environ
    base_url = options.base_url
    if not base_url and options.base_url_env:
        base_url = require_env(env, options.base_url_env, "openai_compatible provider")
    if not base_url:
        raise ConfigError("openai_compatible provider: set `base_url` or `base_url_env`")
    key = (
        require_env(env, options.api_key_env, "openai_compatible provider")
        if options.api_key_env
        else None
    )
    client = openai.AsyncOpenAI(
        # The SDK insists on a key; without one the header is omitted per request.
        api_key=key or "no-key",
        base_url=base_url,
        timeout=_timeout(options),
        max_retries=options.max_retries,
    )
    return OpenAIChatProvider(
        "openai_compatible",
        model,
        options,
        client,
        omit_authorization=key is None,
        count_usage=options.usage_fallback == "request",
    )


SPECS = [
    ProviderSpec(kind="openai", options=OpenAIOptions, factory=_openai),
    ProviderSpec(kind="azure_openai", options=AzureOpenAIOptions, factory=_azure),
    ProviderSpec(kind="openai_compatible", options=OpenAICompatibleOptions, factory=_compatible),
]
