"""Asking the person at the terminal to approve a tool call (``mesh chat``).

An agent's tool marked ``approval: required`` pauses the turn and sends an
``approval_request`` event; the chat client answers on the same stream with a
``ChatRequest.approval``. The chat renderer calls :func:`ask_approval` for each
such event and sends what it returns::

    elif kind == "approval_request":
        answer = await ask_approval(event)
        await stream.send(types_pb2.ChatRequest(approval=answer))

The question goes to stderr (stdout stays the conversation); the answer is read
from stdin. ``y``/``yes`` approves; anything else, the end of input, or no answer
before the agent's own timeout denies.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import TextIO

from google.protobuf import json_format

from mesh.v1 import types_pb2

_YES = {"y", "yes"}


def describe_request(event: types_pb2.ChatEvent) -> str:
    """The question shown to the person: who asks to run which tool with what."""
    asked = event.approval_request
    arguments = json.dumps(
        json_format.MessageToDict(asked.call.arguments), sort_keys=True, ensure_ascii=False
    )
    who = asked.requested_by or event.agent
    path = " > ".join(asked.hop_path)
    via = f" (path {path})" if path else ""
    seconds = asked.timeout_ms / 1000
    return (
        f"\n  ?? {who}{via} wants to run {asked.call.name}({arguments})\n"
        f"     approve? [y/N] (denied after {seconds:g}s) "
    )


async def ask_approval(
    event: types_pb2.ChatEvent,
    *,
    readline: Callable[[], str] | None = None,
    out: TextIO | None = None,
) -> types_pb2.ApprovalAnswer:
    """Ask at the terminal; the answer to send back for ``event``'s approval request."""
    asked = event.approval_request
    stream = out if out is not None else sys.stderr
    stream.write(describe_request(event))
    stream.flush()
    read = readline if readline is not None else sys.stdin.readline
    timeout = asked.timeout_ms / 1000 if asked.timeout_ms else None
    try:
        async with asyncio.timeout(timeout):
            line = await asyncio.to_thread(read)
    except TimeoutError:
        line = ""
        reason = "no answer at the terminal in time"
    else:
        reason = "" if line.strip().lower() in _YES else "denied at the terminal"
    approved = line.strip().lower() in _YES
    stream.write("approved\n" if approved else "denied\n")
    stream.flush()
    return types_pb2.ApprovalAnswer(approval_id=asked.approval_id, approved=approved, reason=reason)
