"""The reflection agent kind (``kind: reflection``): draft, self-evaluate, revise.

Every turn: the model drafts an answer (tools, approvals and CONSULTs work as in
any turn); the draft is scored against the agent's criteria, by the model with an
evaluation prompt or by a Python evaluation function (``reflection.evaluator``);
below ``reflection.threshold`` the model revises with the evaluation's feedback,
up to ``reflection.max_iterations`` drafts. Each scored draft is a
:class:`Reflected` event; only the answer (the accepted draft,
or the last one) streams as text and ends the turn as its Final. Usage counts every
model call, the evaluations included. Cancelling the turn closes whichever model
stream is open, between or during iterations. A draft that hands the turn over
(TRANSFER, END_CONVERSATION) ends the turn there, as in a plain agent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from mesh.errors import ConfigError
from mesh.providers.base import ChatMessage, ModelRequest, TextDelta, UsageReport
from mesh.turns import Reflected

if TYPE_CHECKING:
    from mesh.agent._runtime import AgentRuntime
    from mesh.turns import ConsultBroker, RuntimeEvent, TurnInput

EVALUATE_SYSTEM = (
    "You evaluate a draft answer against criteria. Reply with a first line "
    "`score: <number from 0 to 1>` and then one short paragraph of feedback saying "
    "what to improve.\n\nCriteria: {criteria}"
)
REVISE = (
    "Revise your previous answer. An evaluation against the criteria scored it "
    "{score:.2f}. Feedback: {feedback}\nReply with the improved answer only."
)
_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)(\s*/\s*(\d+))?", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


Evaluator = Callable[[str, str, str], Any]
_evaluators: dict[str, Evaluator] = {}


def load_evaluator(ref: str, base_dir: str) -> Evaluator:
    """Import ``module:function`` (the config's folder first), once per process."""
    found = _evaluators.get(ref)
    if found is not None:
        return found
    module_name, _, attr = ref.partition(":")
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reflection.evaluator {ref!r}: {err}") from None
    if not callable(func):
        raise ConfigError(f"reflection.evaluator {ref!r} is not a function")
    _evaluators[ref] = func
    return func  # type: ignore[no-any-return]  # checked callable above


def parse_score(text: str) -> float | None:
    """A score in [0, 1] from an evaluation reply (``score: 0.7``, ``8/10``, ``70``)."""
    match = _SCORE.search(text)
    if match is not None:
        value = float(match.group(1))
        if match.group(3):
            return _clamp(value / max(1.0, float(match.group(3))))
    else:
        number = _NUMBER.search(text)
        if number is None:
            return None
        value = float(number.group(0))
    if value > 1:
        value = value / 10 if value <= 10 else value / 100
    return _clamp(value)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def _feedback(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if not _SCORE.match(line.strip())]
    return " ".join(" ".join(lines).split())


class _Usage:
    def __init__(self) -> None:
        self.input = 0
        self.output = 0


async def _model_evaluation(
    runtime: AgentRuntime, turn: TurnInput, draft: str, usage: _Usage
) -> tuple[float, str]:
    criteria = runtime.config.reflection.criteria
    request = ModelRequest(
        system=EVALUATE_SYSTEM.format(criteria=criteria),
        messages=(ChatMessage("user", f"Request: {turn.message}\n\nAnswer: {draft}"),),
        tools=(),
        conversation_id=turn.conversation_id,
        agent=runtime.name,
    )
    reply = ""
    stream = runtime.provider.stream(request)
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                reply += event.text
            elif isinstance(event, UsageReport):
                usage.input += event.input_tokens
                usage.output += event.output_tokens
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    score = parse_score(reply)
    if score is None:
        return 0.0, f"the evaluation gave no score ({' '.join(reply.split())[:120]!r})"
    return score, _feedback(reply)


async def _function_evaluation(
    runtime: AgentRuntime, turn: TurnInput, draft: str
) -> tuple[float, str]:
    config = runtime.config.reflection
    assert config.evaluator is not None
    func = load_evaluator(config.evaluator, str(runtime.mesh.base_dir))
    try:
        result = func(draft, turn.message, config.criteria)
        if inspect.isawaitable(result):
            result = await result
    except Exception as err:  # noqa: BLE001 - a failing evaluator scores the draft 0
        return 0.0, f"the evaluation function failed: {type(err).__name__}: {err}"
    if isinstance(result, tuple):
        score, feedback = result[0], str(result[1]) if len(result) > 1 else ""
    else:
        score, feedback = result, ""
    try:
        return _clamp(float(score)), feedback
    except (TypeError, ValueError):
        return 0.0, f"the evaluation function returned {score!r}, not a number"


async def reflect(
    runtime: AgentRuntime, turn: TurnInput, consults: ConsultBroker | None
) -> AsyncGenerator[RuntimeEvent, None]:
    """One turn of a reflection agent (see the module docstring)."""
    from mesh.turns import Delta, Final

    config = runtime.config.reflection
    usage = _Usage()
    current = turn
    draft = ""
    for iteration in range(1, config.max_iterations + 1):
        final: Final | None = None
        async with contextlib.aclosing(runtime._model_turn(current, consults)) as drafting:
            async for event in drafting:
                if isinstance(event, Final):
                    final = event
                    break
                if not isinstance(event, Delta):  # drafts are not the answer: not streamed
                    yield event
        assert final is not None
        usage.input += final.input_tokens
        usage.output += final.output_tokens
        draft = final.content
        if final.stop_reason in ("handoff", "end_conversation", "tool_rounds_exhausted"):
            if draft:
                yield Delta(draft)
            yield Final(draft, usage.input, usage.output, final.stop_reason)
            return
        if config.evaluator:
            score, feedback = await _function_evaluation(runtime, turn, draft)
        else:
            score, feedback = await _model_evaluation(runtime, turn, draft, usage)
        accepted = score >= config.threshold
        yield Reflected(iteration, score, feedback, draft, accepted)
        if accepted:
            break
        current = dataclasses.replace(
            current,
            history=(
                *current.history,
                ChatMessage("user", current.message),
                ChatMessage("assistant", draft, agent=runtime.name),
            ),
            message=REVISE.format(score=score, feedback=feedback or "(none)"),
        )
    if draft:
        yield Delta(draft)
    yield Final(draft, usage.input, usage.output, "end_turn")
