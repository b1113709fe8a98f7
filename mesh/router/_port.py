"""The agent-stream port: what the engine asks of "a stream to agent X" (implemented
over gRPC by ``mesh.router._agents.StreamPool`` and over A2A by ``mesh.a2a``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh.providers.base import ChatMessage
from mesh.v1 import types_pb2


@dataclass(frozen=True)
class HopCall:
    """What the call to the next agent carries besides its request."""

    token: str | None
    """The bearer for this agent (exchanged for its audience), None with auth off."""
    request_id: str
    traceparent: str = ""
    timeout: float | None = None
    """Seconds the turn may still take (a new stream's own deadline is not set from it:
    a pooled stream outlives turns; the engine enforces the turn's deadline)."""
    history: Sequence[ChatMessage] | None = None
    """The turn's (or handoff's) history: the stream it goes on fills it into the
    request (only what the agent does not keep there); None: the request carries its own."""


def history_body(request: types_pb2.ChatRequest) -> types_pb2.Turn | types_pb2.HandoffTurn:
    """The part of a request to an agent that carries a conversation's history."""
    return request.handoff if request.HasField("handoff") else request.turn


class AgentCall(Protocol):
    """One agent stream carrying the current turn."""

    agent: str
    address: str

    async def send(self, request: types_pb2.ChatRequest) -> None: ...

    async def read(self) -> bytes | None:
        """The next serialized event; None at the end of the stream (status OK).

        Raises the mapped MeshError when the stream ended with another status.
        """
        ...

    def finish(self, reusable: bool) -> None:
        """The turn is over: give the stream back to the pool, or close it."""
        ...


class AgentStreams(Protocol):
    """The port the engine calls agents through."""

    async def open(
        self, agent: str, request: types_pb2.ChatRequest, hop: HopCall
    ) -> tuple[AgentCall, bytes]: ...
