"""Tool approval by a person, at the agent. No gRPC in here.

A tool marked ``approval: required`` (``tool_policies`` in the agent's config; a
function or an MCP tool, by the name the model sees) does not run when the model
calls it: the turn emits an :class:`ApprovalAsked` event, which travels through the
router to the client, and waits for the person's answer on the same stream
(``ChatRequest.approval``). Approved: the tool runs. Denied, or no answer within
``limits.approval_timeout_s``: the tool does not run and the model sees the denial
as the tool's result.

Answers arrive through the turn's :class:`~mesh.turns.ConsultBroker` under
a key of their own (:func:`approval_key`), so approvals and CONSULT answers share
one matching mechanism and one request stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.providers.base import ToolCallRequest
from mesh.turns import ApprovalAsked

if TYPE_CHECKING:
    from mesh.config import AgentConfig
    from mesh.turns import ConsultAnswer, ConsultBroker, ToolReturned, TurnInput

_PREFIX = "approval:"


def approval_key(approval_id: str) -> str:
    """The broker key an approval answer is delivered under (never a consult call id)."""
    return _PREFIX + approval_id


def new_approval_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reason: str


async def await_verdicts(
    waits: Sequence[tuple[ApprovalAsked, asyncio.Future[ConsultAnswer]]],
    broker: ConsultBroker,
    timeout: float,
) -> dict[str, Verdict]:
    """Each waiting call's verdict by call id; no answer within ``timeout`` is a denial."""
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(f for _a, f in waits), return_exceptions=True)
    finally:
        for asked, future in waits:
            broker.forget(approval_key(asked.approval_id))
            if not future.done():
                future.cancel()
    verdicts: dict[str, Verdict] = {}
    for asked, future in waits:
        if future.cancelled() or not future.done():
            verdicts[asked.call.id] = Verdict(False, f"no answer within {timeout:g}s")
        else:
            answer = future.result()
            verdicts[asked.call.id] = Verdict(not answer.is_error, answer.content)
    return verdicts


def denial(tool: str, verdict: Verdict) -> str:
    """What the model sees as the result of a denied call."""
    why = f": {verdict.reason}" if verdict.reason else ""
    return f"the user did not approve running {tool}{why}; it did not run"


class ApprovalGate:
    """One tool round's approvals: ask for the gated calls, then settle the verdicts."""

    def __init__(self, config: AgentConfig, turn: TurnInput, broker: ConsultBroker) -> None:
        self.config = config
        self.broker = broker
        path = turn.hop_path
        self.path = path if path and path[-1] == config.name else (*path, config.name)
        self.timeout = config.limits.approval_timeout_s
        self.asks: list[tuple[ApprovalAsked, asyncio.Future[ConsultAnswer]]] = []

    def needs_approval(self, tool: str) -> bool:
        policy = self.config.tool_policies.get(tool)
        return policy is not None and policy.approval == "required"

    def ask(self, calls: Sequence[ToolCallRequest]) -> list[ApprovalAsked]:
        """The approval requests to send, one per call that needs one."""
        for call in calls:
            if self.needs_approval(call.name):
                asked = ApprovalAsked(
                    new_approval_id(), call, self.config.name, self.path, self.timeout
                )
                self.asks.append((asked, self.broker.expect(approval_key(asked.approval_id))))
        return [asked for asked, _future in self.asks]

    async def denials(self, calls: list[ToolCallRequest]) -> list[ToolReturned]:
        """Wait for the verdicts; drop denied calls from ``calls``, return their results."""
        from mesh.turns import ToolReturned

        if not self.asks:
            return []
        verdicts = await await_verdicts(self.asks, self.broker, self.timeout)
        denied: list[ToolReturned] = []
        for call in list(calls):
            verdict = verdicts.get(call.id)
            if verdict is not None and not verdict.approved:
                calls.remove(call)
                denied.append(ToolReturned(call.id, call.name, denial(call.name, verdict), True))
        return denied
