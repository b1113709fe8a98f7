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


async def _stdin_line() -> str:
    """The next line of stdin, waiting on the event loop (no thread is left blocked on
    stdin after a timeout, to swallow the next line typed at the chat prompt)."""
    loop = asyncio.get_running_loop()
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return await asyncio.to_thread(sys.stdin.readline)
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return sys.stdin.readline()


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
    timeout = asked.timeout_ms / 1000 if asked.timeout_ms else None
    try:
        async with asyncio.timeout(timeout):
            line = await (_stdin_line() if readline is None else asyncio.to_thread(readline))
    except TimeoutError:
        line = ""
        reason = "no answer at the terminal in time"
    else:
        reason = "" if line.strip().lower() in _YES else "denied at the terminal"
    approved = line.strip().lower() in _YES
    stream.write("approved\n" if approved else "denied\n")
    stream.flush()
    return types_pb2.ApprovalAnswer(approval_id=asked.approval_id, approved=approved, reason=reason)
