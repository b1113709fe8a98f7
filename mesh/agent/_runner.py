"""Turns run in-process over agents defined in Python, following their handoffs.

The agents' runtimes are the ones the mesh builds (:meth:`mesh.agent.api.Agent.build`);
this module only plays the router's part for TRANSFER and CONSULT, with the same hop
budget and cycle rule, so a test needs no server.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.agent._runtime import (
    AgentRuntime,
    ConsultAnswer,
    ConsultBroker,
    Final,
    HandoffRequested,
    RuntimeEvent,
    ToolCalled,
    ToolReturned,
    TurnInput,
)
from mesh.config import MeshConfig
from mesh.errors import AgentNotFound, ConfigError, HandoffCycle, HopBudgetExceeded
from mesh.providers.base import ChatMessage

if TYPE_CHECKING:
    from mesh.agent.api import Agent


@dataclass(frozen=True)
class AgentEvent:
    """One event of a run, with the agent that produced it."""

    agent: str
    event: RuntimeEvent


@dataclass
class RunResult:
    """What one in-process turn produced."""

    agent: str
    """The agent that gave the final answer."""
    final: Final
    events: list[AgentEvent] = field(default_factory=list)
    history: list[ChatMessage] = field(default_factory=list)
    """The conversation after this turn: pass it as ``history`` to continue."""
    path: list[str] = field(default_factory=list)
    """The agents the turn went through, in order (as the router's hop path)."""

    @property
    def text(self) -> str:
        return self.final.content

    @property
    def tool_calls(self) -> list[ToolCalled]:
        return [e.event for e in self.events if isinstance(e.event, ToolCalled)]

    @property
    def tool_results(self) -> list[ToolReturned]:
        return [e.event for e in self.events if isinstance(e.event, ToolReturned)]

    @property
    def handoffs(self) -> list[HandoffRequested]:
        return [e.event for e in self.events if isinstance(e.event, HandoffRequested)]


@dataclass
class _Run:
    conversation_id: str
    turn_id: str
    max_hops: int
    hops: int = 0
    path: list[str] = field(default_factory=list)
    events: list[AgentEvent] = field(default_factory=list)

    def hop(self, target: str, stack: Sequence[str]) -> None:
        """Count a handoff, or refuse it as the router would."""
        if target in stack:
            chain = " -> ".join([*stack, target])
            raise HandoffCycle(f"handoff cycle: {chain}")
        if self.hops >= self.max_hops:
            chain = " -> ".join([*self.path, target])
            raise HopBudgetExceeded(f"hop budget of {self.max_hops} spent: {chain}")
        self.hops += 1
        self.path.append(target)


class Runner:
    """Runs turns in-process over agents defined in Python (the seeds' Runner).

    The first agent takes turns unless ``run(agent=...)`` names another. A
    TRANSFER moves the turn to its target, a CONSULT runs the target and hands its
    answer back; both count against ``max_hops`` and a CONSULT may not ask an
    agent already asking. Each agent runs on its own runtime, built once.
    """

    def __init__(self, *agents: Agent, config: MeshConfig | None = None, **mesh: Any) -> None:
        if not agents:
            raise ConfigError("a Runner needs at least one agent")
        self.agents = {agent.name: agent for agent in agents}
        first, *peers = agents
        self.config = config or first.mesh_config(*peers, **mesh)
        self._runtimes: dict[str, AgentRuntime] = {}

    def runtime(self, name: str) -> AgentRuntime:
        runtime = self._runtimes.get(name)
        if runtime is None:
            agent = self.agents.get(name)
            if agent is None:
                known = ", ".join(sorted(self.agents))
                raise AgentNotFound(
                    f"agent {name!r} is not in this runner (it has {known}); "
                    "serve the agents in a mesh to reach others"
                )
            runtime = self._runtimes[name] = agent.build(self.config)
        return runtime

    async def run(
        self,
        message: str,
        *,
        agent: str | None = None,
        history: Sequence[ChatMessage] = (),
        context: Mapping[str, str] | None = None,
        conversation_id: str = "",
    ) -> RunResult:
        """Run one user turn to its final answer."""
        current = agent or next(iter(self.agents))
        self.runtime(current)  # an unknown agent fails before anything runs
        run = _Run(
            conversation_id or uuid.uuid4().hex,
            uuid.uuid4().hex,
            self.config.max_hops_for(current),
            path=[current],
        )
        user = ChatMessage("user", message)
        turn = TurnInput(
            run.conversation_id,
            message,
            tuple(history),
            dict(context or {}),
            turn_id=run.turn_id,
            hop_path=(current,),
            hops_remaining=run.max_hops,
        )
        while True:
            final, transfer = await self._turn(current, turn, run, [current])
            if transfer is None:
                break
            run.hop(transfer.target, [])
            moved = [*history, user]
            if final.content:
                moved.append(ChatMessage("assistant", final.content, agent=current))
            turn = TurnInput(
                run.conversation_id,
                transfer.message or message,
                tuple(moved),
                transfer.context,
                turn_id=run.turn_id,
                hop_path=tuple(run.path),
                source_agent=current,
                mode="transfer",
                reason=transfer.reason,
                hops_remaining=run.max_hops - run.hops,
            )
            current = transfer.target
        answer = ChatMessage("assistant", final.content, agent=current)
        return RunResult(current, final, run.events, [*history, user, answer], list(run.path))

    async def _turn(
        self, name: str, turn: TurnInput, run: _Run, stack: list[str]
    ) -> tuple[Final, HandoffRequested | None]:
        runtime = self.runtime(name)
        broker = ConsultBroker()
        final: Final | None = None
        transfer: HandoffRequested | None = None
        stream = runtime.run_turn(turn, broker)
        try:
            async for event in stream:
                run.events.append(AgentEvent(name, event))
                if isinstance(event, Final):
                    final = event
                elif isinstance(event, HandoffRequested):
                    if event.mode == "consult":
                        answer = await self._consult(name, turn, event, run, stack)
                        broker.resolve(event.call_id, answer)
                    elif event.mode == "transfer":
                        transfer = event
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        assert final is not None, "a turn ends with a Final"
        return final, transfer

    async def _consult(
        self, source: str, turn: TurnInput, ask: HandoffRequested, run: _Run, stack: list[str]
    ) -> ConsultAnswer:
        run.hop(ask.target, stack)
        self.runtime(ask.target)
        consulted = TurnInput(
            run.conversation_id,
            ask.message,
            (*turn.history, ChatMessage("user", turn.message)),
            ask.context,
            turn_id=run.turn_id,
            hop_path=tuple(run.path),
            source_agent=source,
            mode="consult",
            reason=ask.reason,
            hops_remaining=run.max_hops - run.hops,
        )
        final, _transfer = await self._turn(ask.target, consulted, run, [*stack, ask.target])
        return ConsultAnswer(final.content, agent=ask.target)

    async def aclose(self) -> None:
        for runtime in self._runtimes.values():
            await runtime.provider.aclose()
        self._runtimes.clear()
