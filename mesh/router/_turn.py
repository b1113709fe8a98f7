"""A turn's state as it moves through the mesh, and what one agent's part of it gave.

Shared by the engine and the return strategies (which need only the two hop
operations of :class:`Hops`, not the engine itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.providers.base import ChatMessage
from mesh.router._core import HopBudget, RoutingCore
from mesh.router._port import AgentCall
from mesh.v1 import types_pb2

Emit = Callable[[types_pb2.ChatEvent | bytes], None]


@dataclass
class TurnState:
    """One turn as it moves through the mesh."""

    conversation_id: str
    turn_id: str
    message: str
    context: dict[str, str]
    history: list[ChatMessage]
    emit: Emit
    deadline: float
    """Loop time by which the whole turn must be done."""
    budget: HopBudget = field(default_factory=HopBudget)
    request_id: str = ""
    trace_context: dict[str, str] = field(default_factory=dict)
    subject_token: str | None = None
    """The caller's validated bearer (None with auth off); exchanged per hop."""
    history_dropped: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    """The bearer each agent of this turn got (the next hop's ``previous``)."""
    input_tokens: int = 0
    output_tokens: int = 0
    started: float = 0.0
    """``time.perf_counter()`` when the turn started (for its metrics)."""
    first_delta: bool = False
    approvals: dict[str, AgentCall] = field(default_factory=dict)
    """Open approval requests of this turn -> the agent stream that asked."""
    answerable: bool = True
    """False once the client half-closed: an approval request is denied at once."""
    store_key: str = ""
    """The conversation's key in the store (scoped to its user with auth; see
    :func:`mesh.router._owners.conversation_key`)."""

    @property
    def path(self) -> list[str]:
        return self.budget.path

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


@dataclass
class Outcome:
    agent: str
    final: types_pb2.FinalMessage | None = None
    transfer: types_pb2.HandoffEvent | None = None
    ended: bool = False
    strategy: str = ""
    """How control last reached this agent's answer: the return strategy of the
    TRANSFER that led here ("" when the agent started its step itself)."""


class Hops(Protocol):
    """What a return strategy may do: follow a TRANSFER, or hand the turn to an agent."""

    core: RoutingCore

    async def transfer(self, state: TurnState, outcome: Outcome, user: ChatMessage) -> Outcome:
        """Run the target of ``outcome``'s TRANSFER; its outcome."""
        ...

    async def hand_over(
        self,
        state: TurnState,
        source: str,
        target: str,
        reason: str,
        message: str,
        history: list[ChatMessage],
    ) -> Outcome:
        """A TRANSFER the router makes itself (``source`` hands ``target`` the turn)."""
        ...
