"""The agent runtime (transport-neutral) and its gRPC servicer."""

from mesh.agent._runtime import (
    AgentRuntime,
    ConsultBroker,
    Delta,
    ErrorInfo,
    Final,
    HandoffRequested,
    RuntimeEvent,
    ToolCalled,
    ToolReturned,
    TurnInput,
)

__all__ = [
    "AgentRuntime",
    "ConsultBroker",
    "Delta",
    "ErrorInfo",
    "Final",
    "HandoffRequested",
    "RuntimeEvent",
    "ToolCalled",
    "ToolReturned",
    "TurnInput",
]
