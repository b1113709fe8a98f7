"""Helpers shared by the SDK-backed providers.

- reading keys and endpoints from environment variables named in the config
  (never printed: only the variable's *name* appears in messages);
- normalizing stop reasons and tool-call arguments;
- a first-token retry loop for SDKs without their own (Ollama);
- the text protocol for backends that only speak text (the Claude Code CLI and
  in-process llama.cpp): tools are described in the system prompt in the Hermes
  format that SmolLM2 and most open instruct models were trained on, calls come
  back as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and tool
  results go back as ``<tool_response>`` blocks.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mesh.errors import ConfigError, ProviderUnavailable
from mesh.providers.base import ChatMessage, StopReason, ToolCallRequest, ToolSpec

#: Characters of a remote error body kept in a message (bodies can be large).
MAX_ERROR_CHARS = 300


def require_env(environ: Mapping[str, str], var: str, what: str) -> str:
    """The value of ``var`` or a :class:`ConfigError` naming the variable (never the value)."""
    value = environ.get(var, "")
    if not value:
        raise ConfigError(f"{what}: environment variable {var} is not set")
    return value


def optional_env(environ: Mapping[str, str], var: str | None) -> str | None:
    """The value of ``var`` when it is named and set, else ``None``."""
    if not var:
        return None
    return environ.get(var) or None


def short(text: object) -> str:
    """A remote error message, trimmed for a status message."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 1] + "…"


_STOP_REASONS: dict[str, StopReason] = {
    # Anthropic
    "end_turn": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "pause_turn": "end_turn",
    "refusal": "end_turn",
    "model_context_window_exceeded": "max_tokens",
    # OpenAI / llama.cpp
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "end_turn",
    # Ollama
    "load": "end_turn",
    "unload": "end_turn",
}


def normalize_stop(raw: str | None, *, has_tool_calls: bool) -> StopReason:
    """Map a backend's stop/finish/done reason to the mesh's normalized one.

    A turn that produced tool calls always stops with ``tool_use`` (some servers
    report ``stop`` even then).
    """
    if has_tool_calls:
        return "tool_use"
    if raw is None:
        return "end_turn"
    return _STOP_REASONS.get(raw, "end_turn")


def parse_arguments(raw: str | Mapping[str, Any] | None, *, tool: str) -> dict[str, Any]:
    """Tool-call arguments as a dict, from a complete JSON string or an object."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ProviderUnavailable(
            f"model returned invalid JSON arguments for tool {tool!r}: {err.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ProviderUnavailable(f"model returned non-object arguments for tool {tool!r}")
    return value


def backoff_delay(attempt: int, base_s: float, cap_s: float = 8.0) -> float:
    """Exponential backoff with up to 25% jitter (attempt counts from 0)."""
    delay: float = min(base_s * (2.0**attempt), cap_s)
    return delay * (1.0 - 0.25 * random.random())  # noqa: S311 - jitter, not crypto


async def sleep_backoff(attempt: int, base_s: float) -> None:
    await asyncio.sleep(backoff_delay(attempt, base_s))


# --------------------------------------------------------------------------- text protocol

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_TOOLS_PROMPT = """\
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
After your tool calls, stop and wait: the results come back in <tool_response> tags."""


def tools_prompt(tools: Sequence[ToolSpec]) -> str:
    """The tool section of the system prompt (Hermes format)."""
    lines = [
        json.dumps(
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": dict(tool.parameters),
                },
            },
            separators=(",", ":"),
        )
        for tool in tools
    ]
    return _TOOLS_PROMPT.format(tools="\n".join(lines))


def system_with_tools(system: str, tools: Sequence[ToolSpec]) -> str:
    """The system prompt, followed by the tool section when there are tools."""
    if not tools:
        return system
    return f"{system}\n\n{tools_prompt(tools)}" if system else tools_prompt(tools)


def render_tool_call(call: ToolCallRequest) -> str:
    body = json.dumps({"name": call.name, "arguments": dict(call.arguments)})
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def render_tool_result(message: ChatMessage) -> str:
    body = json.dumps(
        {
            "name": message.name,
            "tool_call_id": message.tool_call_id,
            "is_error": message.is_error,
            "content": message.content,
        }
    )
    return f"<tool_response>\n{body}\n</tool_response>"


def render_assistant(message: ChatMessage) -> str:
    parts = [message.content] if message.content else []
    parts.extend(render_tool_call(call) for call in message.tool_calls)
    return "\n".join(parts)


def text_messages(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """Messages as (role, text) pairs for a text-only chat template.

    Roles are ``system``, ``user`` and ``assistant``: tool results become a user
    turn of ``<tool_response>`` blocks (consecutive results share one turn).
    """
    out: list[tuple[str, str]] = []
    for message in messages:
        if message.role == "tool":
            text = render_tool_result(message)
            if out and out[-1][0] == "user" and out[-1][1].startswith("<tool_response>"):
                out[-1] = ("user", out[-1][1] + "\n" + text)
            else:
                out.append(("user", text))
        elif message.role == "assistant":
            out.append(("assistant", render_assistant(message)))
        else:
            out.append((message.role, message.content))
    return out


def render_transcript(messages: Sequence[ChatMessage]) -> str:
    """A conversation as one prompt (for a backend that takes a single text input)."""
    pairs = text_messages(messages)
    if len(pairs) == 1 and pairs[0][0] == "user":
        return pairs[0][1]
    blocks = [f"<{role}>\n{text}\n</{role}>" for role, text in pairs]
    return "The conversation so far:\n\n" + "\n\n".join(blocks)


class ToolCallExtractor:
    """Splits streamed model text into plain text and ``<tool_call>`` blocks.

    Text that could be the start of a ``<tool_call>`` tag is held back until it
    is known not to be one, so no fragment of a call ever reaches the user.
    """

    _PATTERN = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)

    def __init__(self, id_prefix: str = "call") -> None:
        self._buffer = ""
        self._count = 0
        self._prefix = id_prefix
        self.calls: list[ToolCallRequest] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallRequest]]:
        """Add streamed text; return the text that is safe to show and any completed calls."""
        self._buffer += text
        shown: list[str] = []
        calls: list[ToolCallRequest] = []
        while True:
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _partial_tag_suffix(self._buffer)
                shown.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            shown.append(self._buffer[:start])
            end = self._buffer.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                self._buffer = self._buffer[start:]
                break
            body = self._buffer[start + len(TOOL_CALL_OPEN) : end]
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
            calls.append(self._call(body))
        self.calls.extend(calls)
        return "".join(shown), calls

    def finish(self) -> tuple[str, list[ToolCallRequest]]:
        """End of output: an unterminated call still counts if its JSON is complete."""
        rest, self._buffer = self._buffer, ""
        if rest.startswith(TOOL_CALL_OPEN):
            body = rest[len(TOOL_CALL_OPEN) :]
            try:
                call = self._call(body)
            except ProviderUnavailable:
                return rest, []
            self.calls.append(call)
            return "", [call]
        return rest, []

    def _call(self, body: str) -> ToolCallRequest:
        try:
            data = json.loads(body.strip())
        except json.JSONDecodeError as err:
            raise ProviderUnavailable(f"model wrote an invalid tool call: {err.msg}") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ProviderUnavailable("model wrote a tool call without a function name")
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = parse_arguments(arguments, tool=data["name"])
        if not isinstance(arguments, dict):
            raise ProviderUnavailable(f"model wrote non-object arguments for {data['name']!r}")
        self._count += 1
        return ToolCallRequest(f"{self._prefix}_{self._count}", data["name"], arguments)


def _partial_tag_suffix(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of the open tag."""
    for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
