"""``mesh chat``: one message, a message from stdin (``-``), or an interactive chat.

Answers stream as they arrive, each run of text labelled with the agent speaking.
The interactive chat keeps one conversation across turns (the router keeps its
history; talking to one agent with ``--target``, the history travels with each
turn) and takes commands: ``/agent NAME``, ``/new``, ``/history``,
``/context KEY=VALUE``, ``/quit``. Ctrl-C cancels the turn in flight (the server
ends it with ``stop_reason`` ``cancelled``) and the chat goes on.

Each turn is its own Chat call, bounded by ``--timeout``, and ends cleanly: the
client half-closes and reads to the end, so the server records it as OK.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from mesh._approval_prompt import ask_approval
from mesh.cli._common import (
    EXIT_USAGE,
    Caller,
    CommandError,
    add_config,
    add_no_auth,
    add_user,
    caller_of,
    explained,
    raise_for,
    router_address,
)
from mesh.client import AgentClient, ChatStream, create_channel, turn_request
from mesh.convert import error_code_name, stop_name
from mesh.v1 import types_pb2

HELP = (
    "commands: /agent NAME (talk to NAME; /agent - lets the router choose), /new (new "
    "conversation), /history, /context KEY=VALUE (KEY= removes; /context lists), /quit"
)


def parse_context(items: list[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--context takes KEY=VALUE, not {item!r}", EXIT_USAGE)
        context[key.strip()] = value
    return context


class Renderer:
    """Prints one turn's events: text as it streams, labelled by agent."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.speaker = ""

    def start_turn(self) -> None:
        self.speaker = ""

    def show(self, event: types_pb2.ChatEvent) -> None:
        if self.as_json:
            print(json_format.MessageToJson(event, indent=None), flush=True)
            return
        kind = event.WhichOneof("kind")
        if event.agent != self.speaker and kind in ("delta", "final", "handoff", "tool_call"):
            if self.speaker:
                print()
            self.speaker = event.agent
            print(f"[{self.speaker}] ", end="", flush=True)
        if kind == "delta":
            print(event.delta.text, end="", flush=True)
        elif kind == "tool_call":
            print(f"\n  -> {event.tool_call.name}(...)", flush=True)
        elif kind == "handoff":
            mode = types_pb2.HandoffMode.Name(event.handoff.mode)
            mode = mode.removeprefix("HANDOFF_MODE_").lower()
            print(f"\n  => {event.handoff.target} ({mode}) {event.handoff.reason}", flush=True)
        elif kind == "final":
            usage = event.final.usage
            print(flush=True)
            print(
                f"-- {event.agent} {stop_name(event.final.stop_reason)}; tokens in "
                f"{usage.input_tokens} out {usage.output_tokens}; "
                f"conversation {event.conversation_id}",
                file=sys.stderr,
                flush=True,
            )
        elif kind == "error":
            code = error_code_name(event.error.code)
            print(f"\nerror {code}: {event.error.message}", file=sys.stderr)
        elif kind == "routing":
            fallback = " (fallback)" if event.routing.fallback else ""
            print(f"  (routed to {event.routing.agent}{fallback}: {event.routing.reason})")
        elif kind == "reflection":
            step = event.reflection
            verdict = "accepted" if step.accepted else "revising"
            print(f"\n  ~ draft {step.iteration} scored {step.score:.2f}, {verdict}", flush=True)


@dataclass
class Session:
    """One conversation: where it goes, what it carries, what was said."""

    client: AgentClient
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    renderer: Renderer
    direct: bool
    """Talking to one agent (``--target``): the history travels with each turn."""
    agent: str = ""
    conversation_id: str = ""
    context: dict[str, str] = field(default_factory=dict)
    history: list[tuple[str, str, str]] = field(default_factory=list)
    """(role, agent, text) of every message so far."""

    def _history_messages(self) -> list[types_pb2.Message]:
        if not self.direct:
            return []
        roles = {"user": types_pb2.Message.ROLE_USER, "assistant": types_pb2.Message.ROLE_ASSISTANT}
        return [
            types_pb2.Message(role=roles[role], content=text, agent=agent)
            for role, agent, text in self.history
        ]

    async def turn(self, message: str, cancel: asyncio.Event | None = None) -> bool:
        """Send one turn and render its events; True when it ended without error.
        Setting ``cancel`` asks the server to cancel the turn (it still ends cleanly)."""
        stream = self.client.open(timeout=self.timeout, metadata=self.metadata)
        request = turn_request(
            message,
            conversation_id=self.conversation_id,
            agent=self.agent,
            context=self.context,
            history=self._history_messages(),
        )
        self.renderer.start_turn()
        answer: list[str] = []
        speaker = ""
        ok = True
        watcher = asyncio.ensure_future(_on(cancel, stream)) if cancel is not None else None
        try:
            async for event in stream.turn(request):
                self.renderer.show(event)
                speaker = event.agent or speaker
                if event.conversation_id:
                    self.conversation_id = event.conversation_id
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    answer.append(event.delta.text)
                elif kind == "error":
                    ok = False
                elif kind == "approval_request":  # a tool waits for the person's yes/no
                    verdict = await ask_approval(event)
                    await stream.send(types_pb2.ChatRequest(approval=verdict))
        except BaseException:
            stream.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        await stream.finish()
        self.history.append(("user", "", message))
        if answer:
            self.history.append(("assistant", speaker, "".join(answer)))
        return ok


async def _on(event: asyncio.Event, stream: ChatStream) -> None:
    await event.wait()
    await stream.request_cancel()


async def _open_session(
    args: argparse.Namespace, caller: Caller
) -> tuple[Session, grpc.aio.Channel]:
    service = caller.audience_service(None if args.router_api else args.target, args.agent)
    metadata = await caller.metadata(service)
    channel = create_channel(args.target, credentials=caller.credentials())
    session = Session(
        client=AgentClient(channel, router=args.router_api),
        metadata=metadata,
        timeout=args.timeout,
        renderer=Renderer(args.json),
        direct=not args.router_api,
        agent=args.agent or "",
        conversation_id=args.conversation or "",
        context=parse_context(args.context),
    )
    return session, channel


async def _one(args: argparse.Namespace, caller: Caller, message: str) -> int:
    session, channel = await _open_session(args, caller)
    async with channel:
        what = "the router" if args.router_api else "the agent"
        try:
            with explained(args.target, what):
                ok = await session.turn(message)
        except grpc.RpcError as err:
            raise_for(err, args.target, what)
            raise
    return 0 if ok else 1


def _command(session: Session, line: str) -> bool:
    """Handle a /command; False to quit."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "agent":
        session.agent = "" if rest in ("", "-") else rest
        print(f"(talking to {session.agent or 'whoever the router picks'})", flush=True)
    elif name == "new":
        session.conversation_id = ""
        session.history.clear()
        print("(new conversation)", flush=True)
    elif name == "history":
        for role, agent, text in session.history:
            who = "you" if role == "user" else agent
            print(f"{who}: {text}", flush=True)
        if not session.history:
            print("(no messages yet)", flush=True)
    elif name == "context":
        if rest:
            try:
                key, value = next(iter(parse_context([rest]).items()))
            except CommandError as err:
                print(f"({err})", flush=True)
                return True
            if value:
                session.context[key] = value
            else:
                session.context.pop(key, None)
        shown = ", ".join(f"{k}={v}" for k, v in session.context.items()) or "none"
        print(f"(context: {shown})", flush=True)
    else:
        print(f"({HELP})", flush=True)
    return True


def _interactive(args: argparse.Namespace, caller: Caller) -> int:
    """The chat loop: input() in the main thread, each turn on one event loop."""
    with asyncio.Runner() as runner:
        session, channel = runner.run(_open_session(args, caller))
        where = "the router" if args.router_api else f"agent at {args.target}"
        print(f"mesh chat with {where}; {HELP}", flush=True)
        try:
            while True:
                try:
                    line = input("you> ").strip()
                except KeyboardInterrupt:
                    print("\n(Ctrl-C cancels a turn in flight; /quit leaves)", flush=True)
                    continue
                except EOFError:
                    print(flush=True)
                    break
                if not line:
                    continue
                if line.startswith("/"):
                    if not _command(session, line):
                        break
                    continue
                try:
                    runner.run(_interruptible_turn(session, line))
                except grpc.RpcError as err:
                    try:
                        raise_for(
                            err, args.target, "the router" if args.router_api else "the agent"
                        )
                    except Exception as shown:  # noqa: BLE001 - shown, and the chat goes on
                        print(f"(turn failed: {shown})", file=sys.stderr, flush=True)
                except CommandError as err:
                    print(f"(turn failed: {err})", file=sys.stderr, flush=True)
                except asyncio.CancelledError:
                    print("(turn dropped)", file=sys.stderr, flush=True)
                except Exception as err:  # noqa: BLE001 - a MeshError: one line, chat goes on
                    message = getattr(err, "message", str(err))
                    code = getattr(getattr(err, "code", None), "name", type(err).__name__)
                    print(f"(turn failed: {code}: {message})", file=sys.stderr, flush=True)
        finally:
            runner.run(channel.close())
    return 0


async def _interruptible_turn(session: Session, message: str) -> None:
    """One turn where Ctrl-C asks the server to cancel it instead of leaving."""
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_sigint() -> None:
        if cancel.is_set() and task is not None:  # a second Ctrl-C: drop the call itself
            task.cancel()
            return
        print("\n(cancelling the turn...; Ctrl-C again drops it)", file=sys.stderr, flush=True)
        cancel.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await session.turn(message, cancel)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.target and args.router:
        raise CommandError("give --router or --target, not both", EXIT_USAGE)
    caller = caller_of(args)
    args.router_api = not args.target
    if args.router_api:
        args.target = router_address(args, caller)
    parse_context(args.context)  # bad pairs fail before anything connects
    if args.message is None:
        return _interactive(args, caller)
    message = sys.stdin.read() if args.message == "-" else args.message
    if not message.strip():
        raise CommandError("the message is empty", EXIT_USAGE)
    return asyncio.run(_one(args, caller, message))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with the mesh (interactive without a message)",
        description="Send MESSAGE and stream the answer; `-` reads the message from stdin; "
        "with no MESSAGE, an interactive chat (" + HELP + "; Ctrl-C cancels a turn).",
    )
    p.add_argument("message", nargs="?", help="what to say (`-`: read stdin; none: interactive)")
    add_user(p)
    add_config(p)
    add_no_auth(p)
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--target", help="HOST:PORT of an agent, to talk to it directly")
    p.add_argument("--agent", help="the agent (or sequence) to talk to")
    p.add_argument("--conversation", help="conversation id to continue")
    p.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a context key of the turn (repeatable), e.g. department=finance",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per turn, in seconds")
    p.add_argument("--json", action="store_true", help="print each event as a JSON line")
    p.set_defaults(func=cmd_chat, router_api=False)


__all__ = ["Renderer", "Session", "add_parsers", "parse_context"]
