"""The provider protocol: messages and tools in, normalized events out.

Every backend (offline, Anthropic, OpenAI, Ollama, the Claude Code CLI, llama.cpp)
implements :class:`Provider`. The agent runtime knows only these types; it never
sees an SDK object. Handoff targets reach the model as ordinary tools named
``transfer_to_<agent>`` and ``ask_<agent>``, so every backend handles them the
same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel

Role = Literal["system", "user", "assistant", "tool"]
_OVERHEAD = 64
"""Bytes a message costs beyond its texts (framing, role, ids) in ``ChatMessage.size``."""


@dataclass(frozen=True)
class ToolCallRequest:
    """A tool call made by the model, with its arguments complete."""

    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class ChatMessage:
    """One message sent to a model."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCallRequest, ...] = ()
    """For assistant messages: the calls it made."""
    tool_call_id: str = ""
    """For tool messages: the call this result answers."""
    name: str = ""
    """For tool messages: the tool's name."""
    is_error: bool = False
    """For tool messages: the tool failed and ``content`` says why."""
    agent: str = ""
    """For assistant messages: the agent that wrote it."""
    wire: Any = field(default=None, init=False, repr=False, compare=False)
    """The message's protobuf form, made once (``mesh.convert.message_to_pb``): a
    conversation's history is sent to an agent again on every turn."""

    @cached_property
    def size(self) -> int:
        """About the bytes the message takes on the wire (its texts, tool-call arguments
        and a fixed overhead): history windows and kept histories are bounded by it.
        Computed once per message (it is immutable)."""
        total = len(self.content.encode()) + len(self.agent) + len(self.name) + _OVERHEAD
        for call in self.tool_calls:
            total += len(call.id) + len(call.name) + len(str(call.arguments)) + _OVERHEAD
        return total + len(self.tool_call_id)


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    """JSON schema of the arguments object."""


@dataclass(frozen=True)
class ModelRequest:
    """Everything a provider needs for one model call."""

    system: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = ()
    conversation_id: str = ""
    agent: str = ""
    max_tokens: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call (providers assemble streamed argument fragments)."""

    call: ToolCallRequest


@dataclass(frozen=True)
class UsageReport:
    input_tokens: int = 0
    output_tokens: int = 0


StopReason = Literal["end_turn", "tool_use", "max_tokens", "stop_sequence", "error"]


@dataclass(frozen=True)
class Stop:
    reason: StopReason = "end_turn"


ModelEvent = TextDelta | ToolCall | UsageReport | Stop


@runtime_checkable
class Provider(Protocol):
    """A model backend. ``stream`` must stop its upstream work when closed or cancelled."""

    kind: str
    model: str

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """Stream normalized events for one model call.

        Raises a :class:`mesh.errors.ProviderError` subclass on failure. Closing the
        iterator (``aclose``) or cancelling the consuming task must close the
        upstream HTTP stream or kill the subprocess at once.
        """
        ...

    async def aclose(self) -> None:
        """Release clients, connections and subprocesses."""
        ...


@dataclass(frozen=True)
class ProviderSpec:
    """How the registry builds one kind of provider from its config.

    ``options`` validates the provider's settings from ``mesh.yaml`` (every key of
    the agent's ``provider:`` block but ``kind`` and ``model``) when the file is
    loaded; ``factory`` builds the provider when the agent starts and fails there
    with a message naming any missing environment variable.
    """

    kind: str
    options: type[BaseModel]
    factory: Callable[[str, BaseModel, ProviderContext], Provider]


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may know about the agent it serves."""

    agent: str
    instructions: str = ""
    environ: Mapping[str, str] = field(default_factory=dict)
    """The environment to read keys and endpoints from (``os.environ`` by default)."""
