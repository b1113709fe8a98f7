"""Conversions between the wire types (``mesh.v1``) and the runtime's own types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from mesh.providers.base import ChatMessage, Role, ToolCallRequest
from mesh.turns import (
    ApprovalAsked,
    Delta,
    ErrorInfo,
    Final,
    HandoffRequested,
    Mode,
    Reflected,
    RuntimeEvent,
    ToolCalled,
    ToolReturned,
)
from mesh.v1 import types_pb2

_ROLE_TO_PB: dict[Role, types_pb2.Message.Role.ValueType] = {
    "system": types_pb2.Message.ROLE_SYSTEM,
    "user": types_pb2.Message.ROLE_USER,
    "assistant": types_pb2.Message.ROLE_ASSISTANT,
    "tool": types_pb2.Message.ROLE_TOOL,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}

MODE_TO_PB: dict[Mode, types_pb2.HandoffMode.ValueType] = {
    "transfer": types_pb2.HANDOFF_MODE_TRANSFER,
    "consult": types_pb2.HANDOFF_MODE_CONSULT,
    "end_conversation": types_pb2.HANDOFF_MODE_END_CONVERSATION,
}
MODE_FROM_PB: dict[int, Mode] = {int(v): k for k, v in MODE_TO_PB.items()}

STOP_TO_PB: dict[str, types_pb2.StopReason.ValueType] = {
    "end_turn": types_pb2.STOP_REASON_END_TURN,
    "tool_rounds_exhausted": types_pb2.STOP_REASON_TOOL_ROUNDS_EXHAUSTED,
    "handoff": types_pb2.STOP_REASON_HANDOFF,
    "end_conversation": types_pb2.STOP_REASON_END_CONVERSATION,
    "cancelled": types_pb2.STOP_REASON_CANCELLED,
}


def error_code(name: str) -> types_pb2.ErrorCode.ValueType:
    """The ErrorCode of a gRPC status code name (UNKNOWN for a name gRPC lacks)."""
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return types_pb2.ErrorCode.ValueType(code.value[0])


def stop_name(value: int) -> str:
    """A StopReason as the runtime names it (end_turn, cancelled, ...)."""
    for name, pb in STOP_TO_PB.items():
        if pb == value:
            return name
    return "unspecified"


def error_code_name(code: int) -> str:
    """The gRPC status code name of an ErrorCode ("UNKNOWN" when it is none)."""
    for status in grpc.StatusCode:
        if status.value[0] == code and code:
            return status.name
    return "UNKNOWN"


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    json_format.ParseDict(dict(data), out)
    return out


def from_struct(data: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(data)


def message_from_pb(msg: types_pb2.Message) -> ChatMessage:
    calls = msg.tool_calls
    return ChatMessage(
        _ROLE_FROM_PB.get(msg.role, "user"),
        msg.content,
        # Most messages carry no tool call: no conversion (this runs for a turn's whole
        # history on every turn).
        tuple(ToolCallRequest(c.id, c.name, from_struct(c.arguments)) for c in calls)
        if calls
        else (),
        tool_call_id=msg.tool_call_id,
        name=msg.name,
        agent=msg.agent,
    )


def message_to_pb(msg: ChatMessage) -> types_pb2.Message:
    """The wire form of a message, made once per message (it is immutable) and kept on
    it: callers copy it into their request (protobuf copies a message it is given)."""
    out: types_pb2.Message | None = msg.wire
    if out is None:
        out = types_pb2.Message(
            role=_ROLE_TO_PB[msg.role],
            content=msg.content,
            agent=msg.agent,
            tool_calls=[
                types_pb2.ToolCall(id=c.id, name=c.name, arguments=to_struct(c.arguments))
                for c in msg.tool_calls
            ],
            tool_call_id=msg.tool_call_id,
            name=msg.name,
        )
        object.__setattr__(msg, "wire", out)  # frozen: the one field written after init
    return out


def history_from_pb(history: Iterable[types_pb2.Message]) -> tuple[ChatMessage, ...]:
    return tuple([message_from_pb(m) for m in history if m.role])  # ROLE_UNSPECIFIED is 0


def event_to_pb(event: RuntimeEvent) -> types_pb2.ChatEvent:
    """The wire event for a runtime event (agent, seq and ids are set by the caller)."""
    out = types_pb2.ChatEvent()
    if isinstance(event, Delta):
        out.delta.text = event.text
    elif isinstance(event, ToolCalled):
        out.tool_call.CopyFrom(
            types_pb2.ToolCall(
                id=event.call.id, name=event.call.name, arguments=to_struct(event.call.arguments)
            )
        )
    elif isinstance(event, ToolReturned):
        out.tool_result.CopyFrom(
            types_pb2.ToolResult(
                call_id=event.call_id,
                name=event.name,
                content=event.content,
                is_error=event.is_error,
            )
        )
    elif isinstance(event, HandoffRequested):
        out.handoff.CopyFrom(
            types_pb2.HandoffEvent(
                call_id=event.call_id,
                target=event.target,
                mode=MODE_TO_PB[event.mode],
                reason=event.reason,
                message=event.message,
                context=dict(event.context),
            )
        )
    elif isinstance(event, Final):
        out.final.CopyFrom(
            types_pb2.FinalMessage(
                content=event.content,
                usage=types_pb2.Usage(
                    input_tokens=event.input_tokens, output_tokens=event.output_tokens
                ),
                stop_reason=STOP_TO_PB.get(event.stop_reason, types_pb2.STOP_REASON_UNSPECIFIED),
            )
        )
    elif isinstance(event, ApprovalAsked | Reflected):
        _orchestration_to_pb(event, out)
    elif isinstance(event, ErrorInfo):
        out.error.CopyFrom(
            types_pb2.ErrorEvent(
                code=error_code(event.code), message=event.message, reason=event.reason
            )
        )
    return out


def _orchestration_to_pb(event: ApprovalAsked | Reflected, out: types_pb2.ChatEvent) -> None:
    if isinstance(event, ApprovalAsked):
        out.approval_request.CopyFrom(
            types_pb2.ApprovalRequest(
                approval_id=event.approval_id,
                call=types_pb2.ToolCall(
                    id=event.call.id,
                    name=event.call.name,
                    arguments=to_struct(event.call.arguments),
                ),
                requested_by=event.requested_by,
                hop_path=list(event.hop_path),
                timeout_ms=int(event.timeout_s * 1000),
            )
        )
    else:
        out.reflection.CopyFrom(
            types_pb2.ReflectionStep(
                iteration=event.iteration,
                score=event.score,
                feedback=event.feedback,
                draft=event.draft,
                accepted=event.accepted,
            )
        )
