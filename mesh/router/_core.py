"""The routing core: which agent, and whether a handoff may happen. No gRPC in here.

Routing order for a turn: the agent (or sequence) the client names, then the
CONDITIONAL routes, then the conversation's last agent, then (with
``router.routing.strategy: best_match``) the routing model, then the default agent.

What a TRANSFER does next is its target's return strategy (``return:`` on the
handing agent's handoff target): ``bubble_up`` (the target keeps the turn and the
conversation; a sequence ends there), ``return_to_caller`` (control comes back to
the handing agent, which finishes the turn), ``continue_chain`` (the target's answer
feeds the sequence's next step), ``end_conversation``. Agents waiting for a
``return_to_caller`` form a stack like CONSULT's: handing the turn to one of them
again before it got control back is a cycle.
Every handoff is checked against the hop budget (``min(mesh max_hops, the source
agent's max_hops)``, counting the hops of an incoming path) and, for CONSULT, the
consult stack (A asks B asks A is a cycle) before anything is forwarded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from mesh._config_orch import ReturnStrategyName
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
        chosen = self.choose_by_rules(named, message, context, metadata, active)
        return chosen if chosen is not None else self.default()

    @property
    def model_routing(self) -> bool:
        """True when a routing model decides what no rule does (``best_match``)."""
        return self.config.router.routing.strategy == "best_match"

    def default(self) -> str:
        if self.config.router.default_agent:
            return self.config.router.default_agent
        raise AgentNotFound(
            "the turn names no agent, no route matched and no default agent is configured",
            field="turn.agent",
        )

    def candidates(self) -> list[str]:
        """What a routing model may pick from: every agent and sequence, sorted."""
        return sorted({*self.config.agents, *self.config.router.sequences, *self._discovered()})

    def choose_by_rules(
        self,
        named: str,
        message: str,
        context: Mapping[str, str],
        metadata: Mapping[str, str],
        active: str,
    ) -> str | None:
        """The agent or sequence the rules pick; None when only the default is left."""
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
        return None

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

    def return_strategy(self, source: str, target: str) -> ReturnStrategyName:
        """What a TRANSFER from ``source`` to ``target`` does once ``target`` answered."""
        agent = self.config.agents.get(source)
        if agent is not None:
            for handoff in agent.handoffs:
                if handoff.target == target:
                    return handoff.return_strategy
        return "bubble_up"

    def check_return_cycle(self, waiting: list[str], caller: str, target: str) -> None:
        """Refuse a TRANSFER to an agent still waiting for a ``return_to_caller``."""
        if target in waiting:
            cycle = " > ".join([*waiting, caller, target])
            raise HandoffCycle(
                f"return cycle refused: {cycle} ({target} is waiting for control to come back)",
                metadata={"path": format_hop_path([*waiting, caller, target])},
            )

    def next_active(self, plan: Plan, agent: str, strategy: str, ended: bool) -> str:
        """The conversation's active agent after a turn that ended at ``agent``.

        ``strategy`` is how control last moved ("" when no TRANSFER finished the turn).
        An ended conversation starts over at the routing rules.
        """
        if ended:
            return ""
        if plan.sequence and strategy != "bubble_up":
            return plan.target
        return agent
