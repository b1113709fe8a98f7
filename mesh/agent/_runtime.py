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
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Mapping,
)
from typing import Any

from mesh import telemetry
from mesh.agent._approval import ApprovalGate
from mesh.agent._reflection import reflect
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
from mesh.turns import (
    AfterTurn,
    BeforeTurn,
    ConsultAnswer,
    ConsultBroker,
    Delta,
    ErrorInfo,
    Final,
    HandoffRequested,
    Mode,
    RuntimeEvent,
    ToolCalled,
    ToolReturned,
    TurnHooks,
    TurnInput,
    settle,
)

log = logging.getLogger("mesh.agent")

TRANSFER_PREFIX = "transfer_to_"
CONSULT_PREFIX = "ask_"
END_TOOL = "end_conversation"


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
            changed = await settle(before(turn))
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
                        event = await settle(after(turn, event)) or event
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
        usage = [0, 0]
        text = ""
        for _round in range(self.config.limits.max_tool_rounds):
            calls: list[ToolCallRequest] = []
            request = ModelRequest(
                system=self._system(turn),
                messages=tuple(messages),
                tools=tuple(specs),
                conversation_id=turn.conversation_id,
                agent=self.name,
            )
            parts: list[str] = []
            async for delta in self._model_call(request, calls, usage):
                parts.append(delta.text)
                yield delta
            text = "".join(parts)
            if not calls:
                yield Final(text, usage[0], usage[1], "end_turn")
                return
            messages.append(
                ChatMessage("assistant", text, tool_calls=tuple(calls), agent=self.name)
            )
            ending = self._ending_call(calls, offered)
            if ending is not None:
                yield self._handoff_event(ending, turn)
                reason = (
                    "handoff"
                    if self._handoff_specs[ending.name][1] == "transfer"
                    else ("end_conversation")
                )
                yield Final(text, usage[0], usage[1], reason)
                return
            async for event in self._tool_round(calls, offered, turn, broker, messages):
                yield event
        yield Final(text, usage[0], usage[1], "tool_rounds_exhausted")

    async def _model_call(
        self, request: ModelRequest, calls: list[ToolCallRequest], usage: list[int]
    ) -> AsyncGenerator[Delta, None]:
        """One model call: yields its text, collects its tool calls and adds its usage."""
        stream = self.provider.stream(request)
        model_call = telemetry.ModelCall(self.name, self.provider, request.conversation_id)
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if event.text:
                        yield Delta(event.text)
                elif isinstance(event, ToolCall):
                    calls.append(event.call)
                elif isinstance(event, UsageReport):
                    usage[0] += event.input_tokens
                    usage[1] += event.output_tokens
                    model_call.usage(event.input_tokens, event.output_tokens)
                elif isinstance(event, Stop):
                    break
        finally:
            model_call.end()  # fails the span with the exception in flight, if any
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _ending_call(
        self, calls: list[ToolCallRequest], offered: set[str]
    ) -> ToolCallRequest | None:
        """The TRANSFER (else END_CONVERSATION) call that ends this agent's turn, if any."""
        handoffs = [c for c in calls if c.name in self._handoff_specs and c.name in offered]
        for mode in ("transfer", "end_conversation"):
            chosen = next((c for c in handoffs if self._handoff_specs[c.name][1] == mode), None)
            if chosen is not None:
                return chosen
        return None

    async def _tool_round(
        self,
        calls: list[ToolCallRequest],
        offered: set[str],
        turn: TurnInput,
        broker: ConsultBroker,
        messages: list[ChatMessage],
    ) -> AsyncGenerator[RuntimeEvent, None]:
        """Run a round's tools and CONSULTs; their results go to ``messages``."""
        handoffs = [c for c in calls if c.name in self._handoff_specs and c.name in offered]
        plain = [c for c in calls if c.name in self.tools]
        results = [
            ToolReturned(c.id, c.name, f"unknown tool {c.name!r}", True)
            for c in calls
            if c.name not in offered
        ]
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
                telemetry.traced_tool(
                    executor,
                    self.tools[c.name],
                    c,
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


__all__ = [
    "AfterTurn",
    "AgentRuntime",
    "BeforeTurn",
    "ConsultAnswer",
    "ConsultBroker",
    "Delta",
    "ErrorInfo",
    "Final",
    "HandoffRequested",
    "Mode",
    "RuntimeEvent",
    "ToolCalled",
    "ToolReturned",
    "TurnHooks",
    "TurnInput",
]
