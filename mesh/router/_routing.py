"""Model-chosen routing (``router.routing.strategy: best_match``). No gRPC in here.

When no CONDITIONAL route matches (and the turn names no agent and the conversation
has none yet), a routing model reads the agents' Info (description, skills) and the
user's message and names the agent for the turn. The decision has its own deadline;
an unusable answer (unknown agent, no answer, an error, too slow) sends the turn to
the default agent, and the decision says why.

The model is asked for one JSON object ``{"agent": "<name>", "reason": "..."}``; a
reply that is not JSON but starts with a known agent's name is accepted too, so
small local models can drive it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mesh.config import MeshConfig, RoutingConfig
from mesh.providers.base import ChatMessage, ModelRequest, Provider, TextDelta, UsageReport
from mesh.providers.registry import create_provider
from mesh.v1 import types_pb2

log = logging.getLogger("mesh.router")

MAX_REPLY_CHARS = 4096
"""A routing reply longer than this is cut (the answer is one short JSON object)."""

SYSTEM = (
    "You are the router of a mesh of AI agents. Pick the one agent best suited to "
    "answer the user's message. Reply with one JSON object and nothing else: "
    '{"agent": "<agent name>", "reason": "<one short sentence>"}.'
)


@dataclass(frozen=True)
class Decision:
    """Where a turn goes, and why."""

    agent: str
    reason: str
    fallback: bool = False
    input_tokens: int = 0
    output_tokens: int = 0

    def to_pb(self) -> types_pb2.RoutingDecision:
        return types_pb2.RoutingDecision(
            agent=self.agent, reason=self.reason, fallback=self.fallback, strategy="best_match"
        )


def describe_agents(
    candidates: Sequence[str],
    infos: Mapping[str, types_pb2.AgentInfo],
    descriptions: Mapping[str, str],
) -> str:
    """The agents as the routing model reads them (one block per agent)."""
    lines: list[str] = []
    for name in candidates:
        info = infos.get(name)
        description = (info.description if info is not None else "") or descriptions.get(name, "")
        lines.append(f"- {name}: {description}".rstrip(": "))
        if info is not None:
            for skill in info.skills:
                lines.append(f"    skill {skill.name}: {skill.description}".rstrip(": "))
    return "\n".join(lines)


def parse_choice(reply: str, candidates: Sequence[str]) -> tuple[str, str] | None:
    """(agent, reason) from the model's reply; None when it names no candidate."""
    text = reply.strip()[:MAX_REPLY_CHARS]
    match = re.search(r"\{.*\}", text, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
        except ValueError:
            data = None
        if isinstance(data, dict):
            agent = str(data.get("agent", "")).strip()
            if agent in candidates:
                return agent, str(data.get("reason", "")).strip()
            return None
    first = re.match(r"[A-Za-z0-9_-]+", text)
    if first and first.group(0) in candidates:
        return first.group(0), text[first.end() :].strip(" :-\n")
    return None


class BestMatch:
    """Asks the routing model which agent a turn goes to."""

    def __init__(
        self,
        config: RoutingConfig,
        infos: Callable[[], Mapping[str, types_pb2.AgentInfo]],
        descriptions: Mapping[str, str],
        provider: Provider | None = None,
    ) -> None:
        self.config = config
        self._infos = infos
        self._descriptions = dict(descriptions)
        self.provider = provider or create_provider(
            config.provider.kind, config.provider.model, config.provider.options, agent="router"
        )

    @classmethod
    def for_config(
        cls, config: MeshConfig, infos: Callable[[], Mapping[str, types_pb2.AgentInfo]]
    ) -> BestMatch:
        """The routing model of ``router.routing``, over the agents the router knows."""
        descriptions = {name: agent.description for name, agent in config.agents.items()}
        for name, sequence in config.router.sequences.items():
            descriptions[name] = sequence.description
        return cls(config.router.routing, infos, descriptions)

    async def _ask(self, message: str, candidates: Sequence[str]) -> tuple[str, int, int]:
        agents = describe_agents(candidates, self._infos(), self._descriptions)
        request = ModelRequest(
            system=f"{SYSTEM}\n\nThe agents:\n{agents}",
            messages=(ChatMessage("user", message),),
            tools=(),
            agent="router",
        )
        reply = ""
        usage_in = usage_out = 0
        stream = self.provider.stream(request)
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    reply += event.text
                    if len(reply) > MAX_REPLY_CHARS:
                        break
                elif isinstance(event, UsageReport):
                    usage_in += event.input_tokens
                    usage_out += event.output_tokens
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return reply, usage_in, usage_out

    async def decide(
        self, message: str, candidates: Sequence[str], default: str, timeout: float
    ) -> Decision:
        """The routing model's choice; the default agent when it has none in time."""
        limit = min(self.config.timeout_s, timeout)
        try:
            async with asyncio.timeout(limit):
                reply, usage_in, usage_out = await self._ask(message, candidates)
        except TimeoutError:
            return Decision(default, f"routing model gave no answer within {limit:.3g}s", True)
        except Exception as err:  # noqa: BLE001 - any model failure falls back to the default
            log.info("routing model failed (%s); turn goes to %s", type(err).__name__, default)
            return Decision(default, f"routing model failed: {type(err).__name__}", True)
        choice = parse_choice(reply, candidates)
        if choice is None:
            shown = " ".join(reply.split())[:80]
            return Decision(
                default,
                f"routing model named no known agent ({shown!r})",
                True,
                usage_in,
                usage_out,
            )
        agent, reason = choice
        return Decision(agent, reason or "chosen by the routing model", False, usage_in, usage_out)
