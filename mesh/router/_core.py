"""The routing core: which agent, and whether a handoff may happen. No gRPC in here.

Routing order for a turn: the agent (or sequence) the client names, then the
CONDITIONAL routes, then the conversation's last agent, then the default agent.
Every handoff is checked against the hop budget (``min(mesh max_hops, the source
agent's max_hops)``, counting the hops of an incoming path) and, for CONSULT, the
consult stack (A asks B asks A is a cycle) before anything is forwarded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from mesh.config import MeshConfig
from mesh.context import format_hop_path
from mesh.errors import AgentNotFound, HandoffCycle, HandoffNotAllowed, HopBudgetExceeded


@dataclass
class HopBudget:
    """The hops one turn has taken and the path it took."""

    path: list[str] = field(default_factory=list)
    """Agents that worked on this turn, in order (an incoming path first)."""
    hops: int = 0
    """Handoffs taken so far, counting the hops of an incoming path."""

    @classmethod
    def incoming(cls, path: Collection[str]) -> HopBudget:
        return cls(list(path), len(path))


@dataclass(frozen=True)
class Plan:
    """The steps a turn starts with: one agent, or a sequence's chain."""

    target: str
    """What the turn was routed to (an agent or a sequence name)."""
    steps: tuple[str, ...]
    sequence: bool = False


class RoutingCore:
    """Routing rules and the hop budget, over the mesh config and the known agents."""

    def __init__(self, config: MeshConfig, discovered: Callable[[], Collection[str]]) -> None:
        self.config = config
        self._discovered = discovered

    def known(self, name: str) -> bool:
        return (
            name in self.config.agents
            or name in self.config.router.sequences
            or name in self._discovered()
        )

    def is_agent(self, name: str) -> bool:
        return name in self.config.agents or name in self._discovered()

    def choose(
        self,
        named: str,
        message: str,
        context: Mapping[str, str],
        metadata: Mapping[str, str],
        active: str,
    ) -> str:
        """The agent or sequence a turn goes to."""
        if named:
            if not self.known(named):
                known = sorted(
                    {*self.config.agents, *self.config.router.sequences, *self._discovered()}
                )
                raise AgentNotFound(
                    f"no agent or sequence named {named!r} (known: {', '.join(known)})",
                    field="turn.agent",
                )
            return named
        for route in self.config.router.routes:
            if route.applies(message, context, metadata):
                return route.agent
        if active and self.known(active):
            return active
        if self.config.router.default_agent:
            return self.config.router.default_agent
        raise AgentNotFound(
            "the turn names no agent, no route matched and no default agent is configured",
            field="turn.agent",
        )

    def plan(self, target: str) -> Plan:
        sequence = self.config.router.sequences.get(target)
        if sequence is None:
            return Plan(target, (target,))
        return Plan(target, tuple(sequence.steps), sequence=True)

    def limit(self, source: str) -> int:
        return self.config.max_hops_for(source)

    def hops_remaining(self, source: str, budget: HopBudget) -> int:
        """Handoffs still allowed after the hop into the next agent, by ``source``'s limit."""
        return max(0, self.limit(source) - budget.hops)

    def check_handoff(
        self, budget: HopBudget, source: str, target: str, stack: list[str] | None
    ) -> None:
        """Refuse a handoff the budget, the consult stack or the mesh does not allow."""
        limit = self.limit(source)
        if budget.hops + 1 > limit:
            route = " > ".join([*budget.path, target])
            raise HopBudgetExceeded(
                f"hop budget of {limit} spent; refused handoff from {source} to {target}; "
                f"path: {route}",
                metadata={"path": format_hop_path([*budget.path, target]), "max_hops": str(limit)},
            )
        if stack is not None and target in stack:
            cycle = " > ".join([*stack, target])
            raise HandoffCycle(
                f"consult cycle refused: {cycle} ({target} is already waiting on a consult)",
                metadata={"path": format_hop_path([*stack, target])},
            )
        if not self.is_agent(target):
            raise HandoffNotAllowed(f"{source} handed off to unknown agent {target!r}")

    def take_handoff(
        self, budget: HopBudget, source: str, target: str, stack: list[str] | None
    ) -> None:
        """Check, then record the hop into ``target``."""
        self.check_handoff(budget, source, target, stack)
        budget.hops += 1
        budget.path.append(target)
