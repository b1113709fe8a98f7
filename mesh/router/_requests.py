"""The requests the router sends an agent: a turn, or a handoff, each with the turn's
per-hop context (hop path, request id, trace context, remaining time, hop budget)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh import kept
from mesh.providers.base import ChatMessage
from mesh.v1 import types_pb2

if TYPE_CHECKING:
    from mesh.router._turn import TurnState


def hop_context(state: TurnState, hops_remaining: int) -> types_pb2.HopContext:
    remaining_ms = int(state.remaining() * 1000)
    return types_pb2.HopContext(
        hop_path=state.path,
        request_id=state.request_id,
        trace_context=state.trace_context,
        timeout_ms=max(1, remaining_ms),
        hops_remaining=hops_remaining,
    )


def chat_turn(state: TurnState, hops_remaining: int) -> types_pb2.ChatRequest:
    """The turn as its first agent gets it, without its history: the agent stream it
    goes on fills that in (``state.history``, as the router windowed it), sending only
    what the agent does not keep for the conversation on that stream (``mesh.kept``)."""
    return types_pb2.ChatRequest(
        turn=types_pb2.Turn(
            conversation_id=state.conversation_id,
            message=state.message,
            context=state.context,
            turn_id=state.turn_id,
            hop=hop_context(state, hops_remaining),
        )
    )


def handoff_turn(
    state: TurnState,
    source: str,
    mode: types_pb2.HandoffMode.ValueType,
    reason: str,
    message: str,
    context: dict[str, str],
    hops_remaining: int,
) -> types_pb2.ChatRequest:
    """The turn as a handoff target gets it, on a pooled Chat stream, without its
    history: the stream fills that in, as for :func:`chat_turn`."""
    return types_pb2.ChatRequest(
        handoff=types_pb2.HandoffTurn(
            conversation_id=state.conversation_id,
            source_agent=source,
            mode=mode,
            reason=reason,
            message=message,
            context=context,
            hop_path=list(state.path),
            turn_id=state.turn_id,
            hops_remaining=hops_remaining,
            hop=hop_context(state, hops_remaining),
        )
    )


def window_history(history: list[ChatMessage], max_bytes: int) -> tuple[list[ChatMessage], int]:
    """The newest messages that fit in ``max_bytes`` (``ChatMessage.size``), and how many
    were left out."""
    if kept.size(history) <= max_bytes:  # the common case, summed in C
        return history, 0
    total = 0
    keep = 0
    for message in reversed(history):
        size = message.size
        if total + size > max_bytes:
            break
        total += size
        keep += 1
    return history[len(history) - keep :], len(history) - keep
