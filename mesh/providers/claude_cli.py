"""The Claude Code CLI in headless mode, as a subprocess.

Each model call runs ``claude -p --output-format stream-json --verbose`` with the
prompt on stdin (or as an argument) and reads its newline-delimited JSON:
``system``/``init`` (the session id), ``stream_event`` (raw Messages API events,
with ``--include-partial-messages``: token deltas), ``assistant`` messages and a
final ``result`` with usage (parsed in :mod:`mesh.providers.claude_stream`; this
module only runs the process). The CLI keeps the conversation in a session: the
session id it reports is remembered per mesh conversation id, and the next call
of that conversation passes ``--resume <session_id>`` and sends only the new
messages. A conversation this process has not seen (another replica served it,
or a restart) is sent whole as a transcript and starts a new session.

The CLI runs its own tool loop for its built-in tools; the mesh's tools
(handoffs included) are described in the system prompt and the model answers
with ``<tool_call>`` blocks, turned into :class:`ToolCall` events here. Their
results go back as ``<tool_response>`` blocks in the next prompt.

Every call has a deadline (``timeout_s``); on timeout, cancel or ``aclose`` the
CLI's process group gets SIGTERM, then SIGKILL after ``kill_grace_s``, and is
reaped. Example::

    provider:
      kind: claude_cli
      model: sonnet                 # passed as --model; "default": the CLI's own
      executable: claude            # a name on PATH or a path
      timeout_s: 300
      disallowed_tools: [Bash, Write, Edit]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import ConfigError, ProviderUnavailable
from mesh.providers._common import render_transcript, system_with_tools, text_messages
from mesh.providers.base import (
    ChatMessage,
    ModelEvent,
    ModelRequest,
    Provider,
    ProviderContext,
    ProviderSpec,
)
from mesh.providers.claude_stream import RESUME_LOST, StreamJsonParser, classify_error

_STDOUT_LIMIT = 16 * 1024 * 1024
_STDERR_KEEP = 4000


class ClaudeCliOptions(BaseModel):
    """Settings of the ``claude_cli`` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executable: str = "claude"
    """The CLI: a name looked up on the environment's PATH, or a path."""
    input: Literal["stdin", "arg"] = "stdin"
    """How the prompt reaches the CLI: on stdin (no length limit, hidden from ``ps``) or as
    an argument."""
    system_prompt_mode: Literal["append", "replace"] = "append"
    """``--append-system-prompt`` (keep Claude Code's own prompt) or ``--system-prompt``."""
    partial_messages: bool = True
    """Pass ``--include-partial-messages`` to stream token deltas (else whole messages)."""
    resume: bool = True
    """Resume the CLI session of a conversation with ``--resume`` instead of resending it."""
    permission_mode: str | None = None
    """``--permission-mode`` (e.g. ``plan``, ``acceptEdits``); the CLI's default when unset."""
    allowed_tools: list[str] = Field(default_factory=list)
    """Built-in CLI tools allowed without asking (``--allowedTools``)."""
    disallowed_tools: list[str] = Field(default_factory=list)
    """Built-in CLI tools the model may not use (``--disallowedTools``)."""
    max_turns: int | None = Field(default=None, ge=1)
    """``--max-turns``: agentic turns the CLI may take per call."""
    cwd: str | None = None
    """Working directory of the CLI (sessions are stored per directory)."""
    extra_args: list[str] = Field(default_factory=list)
    """More arguments, passed as they are."""
    timeout_s: float = Field(default=300.0, gt=0.0)
    """Deadline of one call, from start to the final result."""
    kill_grace_s: float = Field(default=2.0, ge=0.0, le=60.0)
    """Time between SIGTERM and SIGKILL when the CLI is stopped."""
    max_sessions: int = Field(default=1024, ge=1)
    """Conversations whose session id is remembered (least recently used are dropped)."""


@dataclass
class _Session:
    session_id: str
    sent: int
    """How many of the conversation's messages the session already holds."""
    fingerprint: str


def _fingerprint(messages: Sequence[ChatMessage]) -> str:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(repr((message.role, message.content, message.tool_call_id)).encode())
        for call in message.tool_calls:
            digest.update(repr((call.id, call.name, sorted(call.arguments.items()))).encode())
    return digest.hexdigest()


class _ResumeFailedError(Exception):
    """The CLI no longer knows the session: start over with the whole transcript."""


class ClaudeCliProvider:
    """Runs the Claude Code CLI per call; see the module docstring."""

    kind = "claude_cli"

    def __init__(self, model: str, options: ClaudeCliOptions, context: ProviderContext) -> None:
        self.model = model
        self.options = options
        self._env: dict[str, str] | None = dict(context.environ) or None
        search = (self._env or os.environ).get("PATH", os.defpath)
        found = shutil.which(options.executable, path=search)
        if found is None:
            raise ConfigError(
                f"claude_cli provider: executable {options.executable!r} not found on PATH "
                "(install Claude Code or set `executable`)"
            )
        self.executable = found
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __repr__(self) -> str:
        return f"ClaudeCliProvider(model={self.model!r}, executable={self.executable!r})"

    # ----------------------------------------------------------------- command line

    def command(self, system: str, resume: str | None, prompt: str | None) -> list[str]:
        opts = self.options
        cmd = [self.executable, "-p", "--output-format", "stream-json", "--verbose"]
        if opts.partial_messages:
            cmd.append("--include-partial-messages")
        if self.model and self.model != "default":
            cmd += ["--model", self.model]
        if system:
            append = opts.system_prompt_mode == "append"
            cmd += ["--append-system-prompt" if append else "--system-prompt", system]
        if resume:
            cmd += ["--resume", resume]
        if opts.permission_mode:
            cmd += ["--permission-mode", opts.permission_mode]
        if opts.allowed_tools:
            cmd += ["--allowedTools", ",".join(opts.allowed_tools)]
        if opts.disallowed_tools:
            cmd += ["--disallowedTools", ",".join(opts.disallowed_tools)]
        if opts.max_turns is not None:
            cmd += ["--max-turns", str(opts.max_turns)]
        cmd += opts.extra_args
        if prompt is not None:
            cmd.append(prompt)
        return cmd

    def _plan(self, request: ModelRequest) -> tuple[str, str | None]:
        """The prompt to send and the session to resume (if any)."""
        messages = list(request.messages)
        session = self._sessions.get(request.conversation_id) if request.conversation_id else None
        if session is not None and self.options.resume:
            held = messages[: session.sent]
            if len(messages) > session.sent and _fingerprint(held) == session.fingerprint:
                new = messages[session.sent :]
                while new and new[0].role == "assistant":
                    new = new[1:]  # the CLI's own reply, already in its session
                if new:
                    self._sessions.move_to_end(request.conversation_id)
                    prompt = "\n\n".join(text for _, text in text_messages(new))
                    return prompt, session.session_id
        return render_transcript(messages), None

    def _remember(self, request: ModelRequest, session_id: str) -> None:
        if not (request.conversation_id and session_id and self.options.resume):
            return
        messages = list(request.messages)
        self._sessions[request.conversation_id] = _Session(
            session_id, len(messages), _fingerprint(messages)
        )
        self._sessions.move_to_end(request.conversation_id)
        while len(self._sessions) > self.options.max_sessions:
            self._sessions.popitem(last=False)

    # ----------------------------------------------------------------- streaming

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        system = system_with_tools(request.system, request.tools)
        prompt, resume = self._plan(request)
        # ``aclosing``: closing this generator must close the inner one (and so stop
        # the CLI) at once, not whenever the inner generator is garbage collected.
        try:
            async with contextlib.aclosing(self._run(request, system, prompt, resume)) as run:
                async for event in run:
                    yield event
        except _ResumeFailedError:
            self._sessions.pop(request.conversation_id, None)
            whole = render_transcript(request.messages)
            async with contextlib.aclosing(self._run(request, system, whole, None)) as run:
                async for event in run:
                    yield event

    async def _run(
        self, request: ModelRequest, system: str, prompt: str, resume: str | None
    ) -> AsyncGenerator[ModelEvent, None]:
        """One CLI process: start it, feed its output to the parser, stop it however this ends."""
        opts = self.options
        via_stdin = opts.input == "stdin"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.timeout_s
        proc = await self._spawn(self.command(system, resume, None if via_stdin else prompt))
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        parser = StreamJsonParser("cli_call")
        try:
            if via_stdin:
                await _write_stdin(proc, prompt)
            while parser.result is None:
                line = await self._readline(proc.stdout, deadline - loop.time())
                if not line:
                    break
                for event in parser.feed(line):
                    yield event
            result = parser.result
            if result is None:
                code = await self._wait(proc, deadline)
                stderr = await _tail(stderr_task)
                if resume and not parser.emitted and RESUME_LOST in stderr.lower():
                    raise _ResumeFailedError
                raise classify_error(stderr or f"exited with status {code} before a result")
            if result.failed:
                if resume and not parser.emitted and result.resume_lost:
                    raise _ResumeFailedError
                raise classify_error(result.message)
            self._remember(request, parser.session_id)
            for event in parser.finish():
                yield event
        finally:
            stopper = asyncio.ensure_future(self._stop(proc, stderr_task))
            await asyncio.shield(stopper)

    async def _spawn(self, cmd: list[str]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *cmd,
                stdin=(
                    asyncio.subprocess.PIPE
                    if self.options.input == "stdin"
                    else asyncio.subprocess.DEVNULL
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self.options.cwd,
                start_new_session=True,  # its own process group: a kill reaches its children
                limit=_STDOUT_LIMIT,
            )
        except OSError as err:
            raise ProviderUnavailable(f"claude_cli: cannot start {self.executable}: {err}") from err

    async def _readline(self, stdout: asyncio.StreamReader, remaining: float) -> bytes:
        try:
            return await asyncio.wait_for(stdout.readline(), max(remaining, 0.0))
        except TimeoutError:
            raise ProviderUnavailable(
                f"claude_cli: no result within {self.options.timeout_s:g}s"
            ) from None
        except ValueError as err:  # a line over the limit
            raise ProviderUnavailable(f"claude_cli: output line too long: {err}") from None

    async def _wait(self, proc: asyncio.subprocess.Process, deadline: float) -> int:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(proc.wait(), max(remaining, 0.0))
        except TimeoutError:
            raise ProviderUnavailable(
                f"claude_cli: no exit within {self.options.timeout_s:g}s"
            ) from None

    async def _stop(
        self, proc: asyncio.subprocess.Process, stderr_task: asyncio.Future[bytes]
    ) -> None:
        """Terminate (then kill) the CLI's process group if it still runs, and reap it."""
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.options.kill_grace_s)
            except TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        else:
            await proc.wait()
        if not stderr_task.done():
            stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await stderr_task

    async def aclose(self) -> None:
        self._sessions.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _write_stdin(proc: asyncio.subprocess.Process, prompt: str) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(prompt.encode())
        await proc.stdin.drain()
    proc.stdin.close()


async def _tail(task: asyncio.Future[bytes]) -> str:
    try:
        data = await asyncio.wait_for(task, 1.0)
    except (TimeoutError, asyncio.CancelledError):
        return ""
    return data.decode(errors="replace").strip()[-_STDERR_KEEP:]


def _factory(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, ClaudeCliOptions)
    return ClaudeCliProvider(model, options, context)


SPECS = [ProviderSpec(kind="claude_cli", options=ClaudeCliOptions, factory=_factory)]
