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
    TurnHooks,
    TurnInput,
)
from mesh.agent.api import Agent, AgentEvent, Handoff, Runner, RunResult

__all__ = [
    "Agent",
    "AgentEvent",
    "AgentRuntime",
    "ConsultBroker",
    "Delta",
    "ErrorInfo",
    "Final",
    "Handoff",
    "HandoffRequested",
    "RunResult",
    "Runner",
    "RuntimeEvent",
    "ToolCalled",
    "ToolReturned",
    "TurnHooks",
    "TurnInput",
]
