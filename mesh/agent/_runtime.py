"""One agent's turn loop, with no knowledge of gRPC.

A turn: the model streams text and tool calls; ordinary tools run (concurrently)
and their results go back to the model; ``ask_<agent>`` calls become CONSULT
handoff requests whose answers arrive through the :class:`ConsultBroker`;
``transfer_to_<agent>`` ends the turn with a TRANSFER request; the turn ends with
a :class:`Final`. Cancelling the task that iterates :meth:`AgentRuntime.run_turn`
closes the model stream and cancels running tools at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Literal

from mesh.agent._approval import ApprovalAsked, ApprovalGate
from mesh.agent._reflection import Reflected, reflect
from mesh.config import AgentConfig, MeshConfig
from mesh.errors import MeshError
from mesh.providers.base import (
    ChatMessage,
    ModelRequest,
    Provider,
    Stop,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
    UsageReport,
)
from mesh.tools import Tool, ToolExecutor

log = logging.getLogger("mesh.agent")

TRANSFER_PREFIX = "transfer_to_"
CONSULT_PREFIX = "ask_"
END_TOOL = "end_conversation"
Mode = Literal["transfer", "consult", "end_conversation"]


@dataclass(frozen=True)
class TurnInput:
    """What a turn starts from (from a Chat turn or a Handoff)."""

    conversation_id: str
    message: str
    history: Sequence[ChatMessage] = ()
    context: Mapping[str, str] = field(default_factory=dict)
    turn_id: str = ""
    hop_path: tuple[str, ...] = ()
    source_agent: str = ""
    """The agent that handed over (empty for a Chat turn)."""
    mode: Mode | None = None
    """How it was handed over (None for a Chat turn)."""
    reason: str = ""
    hops_remaining: int | None = None
    """Handoffs the router still allows this turn (informational)."""
    request_id: str = ""
    """The turn's request id (from the router's per-turn hop context)."""
    trace_context: Mapping[str, str] = field(default_factory=dict)
    """W3C trace context of the turn (traceparent, tracestate, baggage)."""
    timeout_s: float | None = None
    """Time the turn may still take, as the router said (None: the agent's own limit)."""


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class ToolCalled:
    call: ToolCallRequest


@dataclass(frozen=True)
class ToolReturned:
    call_id: str
    name: str
    content: str
    is_error: bool


@dataclass(frozen=True)
class HandoffRequested:
    call_id: str
    target: str
    mode: Mode
    reason: str
    message: str
    context: Mapping[str, str]


@dataclass(frozen=True)
class Final:
    content: str
    input_tokens: int
    output_tokens: int
    stop_reason: str


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str
    reason: str


_Events = Delta | ToolCalled | ToolReturned | HandoffRequested | Final | ErrorInfo
RuntimeEvent = _Events | ApprovalAsked | Reflected

#: Runs before a turn: None keeps the turn, a TurnInput replaces it, a Final answers
#: without the model (its content is streamed as one delta). May be sync or async.
BeforeTurn = Callable[[TurnInput], TurnInput | Final | Awaitable[TurnInput | Final | None] | None]
#: Runs on the turn's Final: None keeps it, a Final replaces it. May be sync or async.
AfterTurn = Callable[[TurnInput, Final], Final | Awaitable[Final | None] | None]


@dataclass
class TurnHooks:
    """Custom behaviour around every turn of an agent (the Python API sets these)."""

    before: list[BeforeTurn] = field(default_factory=list)
    after: list[AfterTurn] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.before or self.after)


async def _settle(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass(frozen=True)
class ConsultAnswer:
    content: str
    is_error: bool = False
    agent: str = ""


class ConsultBroker:
    """Matches CONSULT answers arriving on the request stream to waiting turns."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[ConsultAnswer]] = {}

    def expect(self, call_id: str) -> asyncio.Future[ConsultAnswer]:
        future: asyncio.Future[ConsultAnswer] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        return future

    def resolve(self, call_id: str, answer: ConsultAnswer) -> bool:
        """Deliver an answer; False when nobody waits for ``call_id``."""
        future = self._waiting.pop(call_id, None)
        if future is None or future.done():
            return False
        future.set_result(answer)
        return True

    def forget(self, call_id: str) -> None:
        self._waiting.pop(call_id, None)


def _handoff_params(required_message: bool) -> dict[str, Any]:
    props = {
        "reason": {"type": "string", "description": "Why this agent should take part."},
        "message": {
            "type": "string",
            "description": "What to ask or hand over, in full (the other agent sees only this "
            "and the conversation history).",
        },
    }
    return {
        "type": "object",
        "properties": props,
        "required": ["reason", "message"] if required_message else ["reason"],
        "additionalProperties": False,
    }


class AgentRuntime:
    """Runs turns for one configured agent."""

    def __init__(
        self,
        config: AgentConfig,
        mesh: MeshConfig,
        provider: Provider,
        tools: Mapping[str, Tool] | None = None,
        *,
        version: str = "",
    ) -> None:
        self.config = config
        self.mesh = mesh
        self.provider = provider
        self.tools = dict(tools or {})
        self.version = version
        self._handoff_specs: dict[str, tuple[str, Mode, ToolSpec]] = {}
        for handoff in config.handoffs:
            about = handoff.description or (
                mesh.agents[handoff.target].description if handoff.target in mesh.agents else ""
            )
            if "transfer" in handoff.modes:
                name = TRANSFER_PREFIX + handoff.target
                spec = ToolSpec(
                    name,
                    f"Transfer the conversation to {handoff.target}: {about}".strip(),
                    _handoff_params(False),
                )
                self._handoff_specs[name] = (handoff.target, "transfer", spec)
            if "consult" in handoff.modes:
                name = CONSULT_PREFIX + handoff.target
                spec = ToolSpec(
                    name,
                    f"Ask {handoff.target} and get its answer back: {about}".strip(),
                    _handoff_params(True),
                )
                self._handoff_specs[name] = (handoff.target, "consult", spec)
        if config.can_end_conversation:
            spec = ToolSpec(
                END_TOOL,
                "End the conversation when the user is done.",
                {
                    "type": "object",
                    "properties": {"reason": {"type": "string"}},
                    "additionalProperties": False,
                },
            )
            self._handoff_specs[END_TOOL] = ("", "end_conversation", spec)
        clash = set(self.tools) & set(self._handoff_specs)
        if clash:
            raise MeshError(f"tool names clash with handoff tools: {sorted(clash)}")
        self._pass_context = {h.target: set(h.pass_context) for h in config.handoffs}
        self.hooks = TurnHooks()

    @property
    def name(self) -> str:
        return self.config.name

    def tool_specs(self, turn: TurnInput) -> list[ToolSpec]:
        specs = [tool.spec for tool in self.tools.values()]
        # Every handoff tool is offered; the router enforces the hop budget and refuses
        # cycles with a status that names the path, whatever the model tries.
        specs.extend(spec for _target, _mode, spec in self._handoff_specs.values())
        return specs

    def _system(self, turn: TurnInput) -> str:
        system = self.config.instructions
        if turn.source_agent and turn.mode == "consult":
            system += (
                f"\n\n{turn.source_agent} is consulting you ({turn.reason}). "
                "Answer its question directly."
            )
        elif turn.source_agent:
            system += (
                f"\n\n{turn.source_agent} transferred this conversation to you ({turn.reason})."
            )
        return system.strip()

    def run_turn(
        self, turn: TurnInput, consults: ConsultBroker | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        """Run one turn, yielding events; ends with a Final (or raises a MeshError).

        With :attr:`hooks`, the before-hooks see the turn first and the after-hooks
        its Final; without, the model turn runs as it is (no extra layer per event).
        """
        if not self.hooks and self.config.kind == "model":
            return self._model_turn(turn, consults)
        return self._hooked_turn(turn, consults)

    async def _hooked_turn(
        self, turn: TurnInput, consults: ConsultBroker | None
    ) -> AsyncIterator[RuntimeEvent]:
        for before in self.hooks.before:
            changed = await _settle(before(turn))
            if isinstance(changed, Final):
                if changed.content:
                    yield Delta(changed.content)
                yield changed
                return
            if changed is not None:
                turn = changed
        body = reflect if self.config.kind == "reflection" else AgentRuntime._model_turn
        stream = body(self, turn, consults)
        try:
            async for event in stream:
                if isinstance(event, Final):
                    for after in self.hooks.after:
                        event = await _settle(after(turn, event)) or event
                yield event
        finally:
            await stream.aclose()

    async def _model_turn(
        self, turn: TurnInput, consults: ConsultBroker | None = None
    ) -> AsyncGenerator[RuntimeEvent, None]:
        broker = consults or ConsultBroker()
        messages: list[ChatMessage] = [*turn.history, ChatMessage("user", turn.message)]
        specs = self.tool_specs(turn)
        offered = {spec.name for spec in specs}
        usage_in = usage_out = 0
        text = ""
        limits = self.config.limits
        for _round in range(limits.max_tool_rounds):
            text = ""
            calls: list[ToolCallRequest] = []
            request = ModelRequest(
                system=self._system(turn),
                messages=tuple(messages),
                tools=tuple(specs),
                conversation_id=turn.conversation_id,
                agent=self.name,
            )
            stream = self.provider.stream(request)
            try:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        if event.text:
                            text += event.text
                            yield Delta(event.text)
                    elif isinstance(event, ToolCall):
                        calls.append(event.call)
                    elif isinstance(event, UsageReport):
                        usage_in += event.input_tokens
                        usage_out += event.output_tokens
                    elif isinstance(event, Stop):
                        break
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not calls:
                yield Final(text, usage_in, usage_out, "end_turn")
                return
            messages.append(
                ChatMessage("assistant", text, tool_calls=tuple(calls), agent=self.name)
            )

            unknown = [c for c in calls if c.name not in offered]
            handoffs = [c for c in calls if c.name in self._handoff_specs and c.name in offered]
            plain = [c for c in calls if c.name in self.tools]
            transfer = next(
                (c for c in handoffs if self._handoff_specs[c.name][1] == "transfer"), None
            )
            ending = next(
                (c for c in handoffs if self._handoff_specs[c.name][1] == "end_conversation"), None
            )
            if transfer is not None or ending is not None:
                chosen = transfer if transfer is not None else ending
                assert chosen is not None
                yield self._handoff_event(chosen, turn)
                reason = "handoff" if transfer is not None else "end_conversation"
                yield Final(text, usage_in, usage_out, reason)
                return
            results: list[ToolReturned] = []
            for call in unknown:
                results.append(
                    ToolReturned(call.id, call.name, f"unknown tool {call.name!r}", True)
                )
            consult_calls = [c for c in handoffs if self._handoff_specs[c.name][1] == "consult"]
            for call in plain:
                yield ToolCalled(call)
            for asked in (gate := ApprovalGate(self.config, turn, broker)).ask(plain):
                yield asked
            results.extend(await gate.denials(plain))
            waits: list[tuple[ToolCallRequest, asyncio.Future[ConsultAnswer]]] = []
            for call in consult_calls:
                waits.append((call, broker.expect(call.id)))
                yield self._handoff_event(call, turn)
            results.extend(await self._run_tools(plain))
            results.extend(await self._await_consults(waits, broker))
            for result in results:
                yield result
                messages.append(
                    ChatMessage(
                        "tool",
                        result.content,
                        tool_call_id=result.call_id,
                        name=result.name,
                        is_error=result.is_error,
                    )
                )
        yield Final(text, usage_in, usage_out, "tool_rounds_exhausted")

    def _handoff_event(self, call: ToolCallRequest, turn: TurnInput) -> HandoffRequested:
        target, mode, _spec = self._handoff_specs[call.name]
        args = call.arguments
        passed = {k: v for k, v in turn.context.items() if k in self._pass_context.get(target, ())}
        return HandoffRequested(
            call_id=call.id,
            target=target,
            mode=mode,
            reason=str(args.get("reason", "")),
            message=str(args.get("message") or turn.message),
            context=passed,
        )

    @property
    def tool_executor(self) -> ToolExecutor:
        """This agent's own bounded executor for sync tools (made on first use)."""
        executor: ToolExecutor | None = getattr(self, "_tool_executor", None)
        if executor is None:
            executor = ToolExecutor(self.config.limits.tool_workers, label=f" of {self.name}")
            self._tool_executor = executor
        return executor

    async def _run_tools(self, calls: list[ToolCallRequest]) -> list[ToolReturned]:
        """Run ordinary tools concurrently; whatever a tool raises is an error result."""
        if not calls:
            return []
        limits = self.config.limits
        executor = self.tool_executor
        outcomes = await asyncio.gather(
            *(
                executor.run(
                    self.tools[c.name],
                    c.arguments,
                    limits.tool_timeouts_s.get(c.name, limits.tool_timeout_s),
                )
                for c in calls
            )
        )
        return [
            ToolReturned(c.id, c.name, o.content, o.is_error)
            for c, o in zip(calls, outcomes, strict=True)
        ]

    async def _await_consults(
        self,
        waits: list[tuple[ToolCallRequest, asyncio.Future[ConsultAnswer]]],
        broker: ConsultBroker,
    ) -> list[ToolReturned]:
        results: list[ToolReturned] = []
        if not waits:
            return results
        timeout = self.config.limits.consult_timeout_s
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(f for _c, f in waits), return_exceptions=True)
        finally:
            for call, future in waits:
                broker.forget(call.id)
                if not future.done():
                    future.cancel()
        for call, future in waits:
            target = self._handoff_specs[call.name][0]
            if future.cancelled() or not future.done():
                results.append(
                    ToolReturned(call.id, call.name, f"{target} did not answer in time", True)
                )
            else:
                answer = future.result()
                results.append(ToolReturned(call.id, call.name, answer.content, answer.is_error))
        return results
