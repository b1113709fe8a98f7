"""Orchestration settings of the mesh file: return strategies, tool approval and
reflection agents (re-exported by :mod:`mesh.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ReturnStrategyName = Literal["bubble_up", "return_to_caller", "continue_chain", "end_conversation"]
"""Where control goes after a TRANSFER (``return:`` on a handoff target)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolPolicy(_Frozen):
    """How the agent may use one tool (function or MCP, by the name the model sees)."""

    approval: Literal["never", "required"] = "never"
    """``required``: the turn pauses and the person at the client approves or denies
    each call (``limits.approval_timeout_s``; no answer is a denial)."""


class ReflectionConfig(_Frozen):
    """Draft, self-evaluate, revise (agents of ``kind: reflection``)."""

    criteria: str = "The answer is correct, complete and directly answers the request."
    """What a good answer meets; the evaluation prompt scores drafts against it."""
    evaluator: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """A Python evaluation function ``module:function(answer, request, criteria)``
    returning a score in [0, 1] or ``(score, feedback)``; None: the model evaluates."""
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    """A draft scoring at least this is the answer."""
    max_iterations: int = Field(default=3, ge=1, le=20)
    """Drafts at most (the last one is the answer when none reaches the threshold)."""
