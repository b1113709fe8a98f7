"""What a turn is made of, with no knowledge of gRPC or models (public: the agent
runtime, the wire conversion and the router all speak it): its input, the events it
yields, the hooks around it, and the broker that hands CONSULT answers to it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.providers.base import ChatMessage, ToolCallRequest

HandoffModeName = Literal["transfer", "consult"]
"""How an agent may hand over to a target (the mesh file's ``modes:``)."""
Mode = HandoffModeName | Literal["end_conversation"]
"""The one handoff-mode type of the mesh (config, runtime, conversion); the wire form is
``types_pb2.HandoffMode``, mapped in :mod:`mesh.convert` only."""


@dataclass(frozen=True)
class TurnInput:
    """What a turn starts from (from a Chat turn or a Handoff)."""

    conversation_id: str
    message: str
    history: Sequence[ChatMessage] = ()
    context: Mapping[str, str] = field(default_factory=dict)
    turn_id: str = ""
    hop_path: tuple[str, ...] = ()
    source_agent: str = ""
    """The agent that handed over (empty for a Chat turn)."""
    mode: Mode | None = None
    """How it was handed over (None for a Chat turn)."""
    reason: str = ""
    hops_remaining: int | None = None
    """Handoffs the router still allows this turn (informational)."""
    request_id: str = ""
    """The turn's request id (from the router's per-turn hop context)."""
    trace_context: Mapping[str, str] = field(default_factory=dict)
    """W3C trace context of the turn (traceparent, tracestate, baggage)."""
    timeout_s: float | None = None
    """Time the turn may still take, as the router said (None: the agent's own limit)."""


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class ToolCalled:
    call: ToolCallRequest


@dataclass(frozen=True)
class ToolReturned:
    call_id: str
    name: str
    content: str
    is_error: bool


@dataclass(frozen=True)
class HandoffRequested:
    call_id: str
    target: str
    mode: Mode
    reason: str
    message: str
    context: Mapping[str, str]


STOP_REASONS = ("end_turn", "tool_rounds_exhausted", "handoff", "end_conversation", "cancelled")
"""The stop reasons the wire knows (``mesh.v1.StopReason``)."""


@dataclass(frozen=True)
class Final:
    content: str
    input_tokens: int
    output_tokens: int
    stop_reason: str
    """One of :data:`STOP_REASONS`."""

    def __post_init__(self) -> None:
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(
                f"Final.stop_reason {self.stop_reason!r} is not one of {', '.join(STOP_REASONS)}"
            )


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str
    reason: str


_Events = Delta | ToolCalled | ToolReturned | HandoffRequested | Final | ErrorInfo


@dataclass(frozen=True)
class ApprovalAsked:
    """A tool call waits for the person's approval."""

    approval_id: str
    call: ToolCallRequest
    requested_by: str
    hop_path: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Reflected:
    """A reflection agent scored one draft (an event of the turn)."""

    iteration: int
    score: float
    feedback: str
    draft: str
    accepted: bool


RuntimeEvent = _Events | ApprovalAsked | Reflected
"""Everything a turn yields (approval requests and reflection scores included)."""

#: Runs before a turn: None keeps the turn, a TurnInput replaces it, a Final answers
#: without the model (its content is streamed as one delta). May be sync or async.
BeforeTurn = Callable[[TurnInput], TurnInput | Final | Awaitable[TurnInput | Final | None] | None]
#: Runs on the turn's Final: None keeps it, a Final replaces it. May be sync or async.
AfterTurn = Callable[[TurnInput, Final], Final | Awaitable[Final | None] | None]


@dataclass
class TurnHooks:
    """Custom behaviour around every turn of an agent (the Python API sets these)."""

    before: list[BeforeTurn] = field(default_factory=list)
    after: list[AfterTurn] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.before or self.after)


async def settle(value: Any) -> Any:
    """``value``, awaited when a hook returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


@dataclass(frozen=True)
class ConsultAnswer:
    content: str
    is_error: bool = False
    agent: str = ""


class ConsultBroker:
    """Matches CONSULT answers arriving on the request stream to waiting turns."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[ConsultAnswer]] = {}

    def expect(self, call_id: str) -> asyncio.Future[ConsultAnswer]:
        future: asyncio.Future[ConsultAnswer] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        return future

    def resolve(self, call_id: str, answer: ConsultAnswer) -> bool:
        """Deliver an answer; False when nobody waits for ``call_id``."""
        future = self._waiting.pop(call_id, None)
        if future is None or future.done():
            return False
        future.set_result(answer)
        return True

    def forget(self, call_id: str) -> None:
        self._waiting.pop(call_id, None)
