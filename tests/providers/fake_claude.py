"""A stand-in for the Claude Code CLI in headless mode (``claude -p``).

It honours the flags the claude_cli provider uses and answers in the CLI's
``stream-json`` format: a ``system``/``init`` line with the session id, raw
Messages API ``stream_event`` lines when ``--include-partial-messages`` is on,
an ``assistant`` message and a final ``result`` with usage. Sessions live as
files under ``$FAKE_CLAUDE_STATE/sessions`` so ``--resume`` works across runs
(and fails like the real CLI for an unknown id); every invocation is appended to
``$FAKE_CLAUDE_STATE/calls.jsonl``.

What it answers depends on the prompt:
``hang`` streams a little and then waits forever (``stubborn`` also ignores
SIGTERM); ``<tool_response>`` answers with the result it got; ``refund`` hands
off with a ``transfer_to_billing`` tool call when that tool is in the system
prompt; ``weather`` calls ``get_weather``; ``badkey`` fails like a CLI whose key
is invalid; anything else is echoed with the session's turn number.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

MODEL = "claude-sonnet-4-5-20250929"


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="claude", add_help=False)
    parser.add_argument("-p", "--print", dest="print_mode", action="store_true")
    parser.add_argument("--output-format", default="text", choices=["text", "json", "stream-json"])
    parser.add_argument("--input-format", default="text", choices=["text", "stream-json"])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--include-partial-messages", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--append-system-prompt")
    parser.add_argument("--system-prompt")
    parser.add_argument("-r", "--resume")
    parser.add_argument("--permission-mode")
    parser.add_argument("--allowedTools")
    parser.add_argument("--disallowedTools")
    parser.add_argument("--max-turns", type=int)
    parser.add_argument("prompt", nargs="?")
    return parser.parse_args(argv)


def answer(prompt: str, system: str, turn: int) -> tuple[str, str]:
    """(text, stop_reason) for a prompt."""
    if "<tool_response>" in prompt:
        start = prompt.index("<tool_response>") + len("<tool_response>")
        result = json.loads(prompt[start : prompt.index("</tool_response>")])
        return f"The tool said: {result['content']}", "end_turn"
    lowered = prompt.lower()
    if "refund" in lowered and "transfer_to_billing" in system:
        body = json.dumps({"name": "transfer_to_billing", "arguments": {"reason": "refund"}})
        return f"Let me transfer you.\n<tool_call>\n{body}\n</tool_call>", "end_turn"
    if "weather" in lowered and "get_weather" in system:
        body = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
        return f"<tool_call>\n{body}\n</tool_call>", "end_turn"
    last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
    return f"Turn {turn}: you said {last}", "end_turn"


def stream_events(msg_id: str, text: str, stop: str, session: str) -> None:
    def wrap(event: dict[str, Any]) -> None:
        emit(
            {
                "type": "stream_event",
                "event": event,
                "session_id": session,
                "parent_tool_use_id": None,
                "uuid": str(uuid.uuid4()),
            }
        )

    wrap(
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
        }
    )
    wrap({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    for i in range(0, len(text), 7):
        wrap(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text[i : i + 7]},
            }
        )
    wrap({"type": "content_block_stop", "index": 0})
    wrap(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": len(text.split())},
        }
    )
    wrap({"type": "message_stop"})


def main() -> int:
    args = parse(sys.argv[1:])
    state = Path(os.environ["FAKE_CLAUDE_STATE"])
    (state / "sessions").mkdir(parents=True, exist_ok=True)
    if not args.print_mode:
        print("this stand-in supports only -p", file=sys.stderr)
        return 2
    if args.output_format == "stream-json" and not args.verbose:
        print(
            "Error: When using --print, --output-format=stream-json requires --verbose",
            file=sys.stderr,
        )
        return 1
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    system = (args.system_prompt or "") + (args.append_system_prompt or "")
    with (state / "calls.jsonl").open("a") as log:
        log.write(
            json.dumps(
                {
                    "argv": sys.argv[1:],
                    "stdin": args.prompt is None,
                    "prompt": prompt,
                    "pid": os.getpid(),
                }
            )
            + "\n"
        )

    history: list[dict[str, str]] = []
    if args.resume:
        path = state / "sessions" / f"{args.resume}.json"
        if not path.exists():
            print(f"No conversation found with session ID: {args.resume}", file=sys.stderr)
            return 1
        history = json.loads(path.read_text())
        session = args.resume
    else:
        session = str(uuid.uuid4())

    emit(
        {
            "type": "system",
            "subtype": "init",
            "cwd": os.getcwd(),
            "session_id": session,
            "tools": ["Task", "Bash", "Read", "Edit"],
            "mcp_servers": [],
            "model": args.model or MODEL,
            "permissionMode": args.permission_mode or "default",
            "apiKeySource": "none",
            "uuid": str(uuid.uuid4()),
        }
    )

    if "hang" in prompt:
        if "stubborn" in prompt:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (state / "hang.pid").write_text(str(os.getpid()))
        if args.include_partial_messages:
            emit(
                {
                    "type": "stream_event",
                    "session_id": session,
                    "parent_tool_use_id": None,
                    "event": {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": "Thinking..."},
                    },
                }
            )
        while True:
            time.sleep(60)

    if "badkey" in prompt:
        emit(
            {
                "type": "result",
                "subtype": "success",
                "is_error": True,
                "duration_ms": 5,
                "duration_api_ms": 0,
                "num_turns": 1,
                "result": "Invalid API key · Please run /login",
                "session_id": session,
                "total_cost_usd": 0,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
        )
        return 1

    turn = len(history) + 1
    text, stop = answer(prompt, system, turn)
    msg_id = f"msg_{uuid.uuid4().hex[:12]}"
    if args.include_partial_messages:
        stream_events(msg_id, text, stop, session)
    emit(
        {
            "type": "assistant",
            "session_id": session,
            "parent_tool_use_id": None,
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [{"type": "text", "text": text}],
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": len(text.split())},
            },
        }
    )
    history.append({"prompt": prompt, "answer": text})
    (state / "sessions" / f"{session}.json").write_text(json.dumps(history))
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "duration_ms": 12,
            "duration_api_ms": 10,
            "num_turns": 1,
            "result": text,
            "session_id": session,
            "total_cost_usd": 0.0012,
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 5,
                "output_tokens": len(text.split()),
            },
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
