"""The ``mesh`` command.

mesh up                      run every agent of the config (each its own process)
mesh agent NAME              serve one agent
mesh chat MESSAGE            stream a turn to the terminal
mesh info --target HOST:PORT describe an agent
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from mesh.config import ENV_CONFIG, MeshConfig, load_config
from mesh.errors import ConfigError, MeshError
from mesh.logs import setup_logging

EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> MeshConfig:
    return load_config(args.config)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"mesh file (default: ${ENV_CONFIG}, else services/mesh.yaml)",
    )


# -- mesh agent ---------------------------------------------------------------------------


async def _run_agent(config: MeshConfig, name: str, host: str | None, port: int | None) -> int:
    from mesh.agent._serve import build_agent_server

    server, runtime = build_agent_server(config, name)
    bound = await server.start(host, config.agent(name).port if port is None else port)
    server.install_signal_handlers()
    print(f"agent {name}: {host or config.server.host}:{bound}", flush=True)
    await server.wait()
    await runtime.provider.aclose()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    config = _config(args)
    config.agent(args.name)  # unknown names fail here, before anything starts
    return asyncio.run(_run_agent(config, args.name, args.host, args.port))


# -- mesh up ------------------------------------------------------------------------------


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", *argv],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise ConfigError(f"process exited ({proc.wait()}) before printing {prefix!r}")


def cmd_up(args: argparse.Namespace) -> int:
    config = _config(args)
    config_arg = ["--config", str(Path(config.source).resolve())]
    procs: list[subprocess.Popen[str]] = []
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        lines = []
        for name, agent in config.agents.items():
            proc = _spawn(["agent", name, *config_arg, "--port", str(agent.port)])
            procs.append(proc)
            lines.append(_wait_line(proc, f"agent {name}: "))
        for line in lines:
            print(line, flush=True)
        first = lines[0].split(": ", 1)[1] if lines else ""
        if first:
            print(f"try: grpcurl -plaintext {first} list", flush=True)
            print(f"try: mesh chat --target {first} hello", flush=True)
        print("mesh up: running; Ctrl-C stops everything", flush=True)
        while not stopping and all(p.poll() is None for p in procs):
            try:
                procs[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    finally:
        stop(0, None)
        codes = [p.wait(timeout=config.server.grace_period_s + 5) for p in procs]
    return 0 if stopping and all(c == 0 for c in codes) else 1


# -- mesh chat / info ---------------------------------------------------------------------


async def _chat(args: argparse.Namespace) -> int:
    from mesh.client import AgentClient, create_channel, turn_request
    from mesh.v1 import types_pb2

    async with create_channel(args.target) as channel:
        client = AgentClient(channel, router=args.router_api)
        stream = client.open(timeout=args.timeout)
        speaker = ""
        try:
            request = turn_request(
                args.message, conversation_id=args.conversation or "", agent=args.agent or ""
            )
            async for event in stream.turn(request):
                if args.json:
                    print(json_format.MessageToJson(event, indent=None), flush=True)
                    continue
                kind = event.WhichOneof("kind")
                if event.agent != speaker and kind in ("delta", "final", "handoff", "tool_call"):
                    if speaker:
                        print()
                    speaker = event.agent
                    print(f"[{speaker}] ", end="", flush=True)
                if kind == "delta":
                    print(event.delta.text, end="", flush=True)
                elif kind == "tool_call":
                    print(f"\n  -> {event.tool_call.name}(...)", flush=True)
                elif kind == "handoff":
                    mode = types_pb2.HandoffMode.Mode.Name(event.handoff.mode).lower()
                    print(
                        f"\n  => {event.handoff.target} ({mode}) {event.handoff.reason}", flush=True
                    )
                elif kind == "final":
                    usage = event.final.usage
                    print(file=sys.stdout, flush=True)
                    print(
                        f"-- {event.agent} {event.final.stop_reason}; tokens in "
                        f"{usage.input_tokens} out {usage.output_tokens}; "
                        f"conversation {event.conversation_id}",
                        file=sys.stderr,
                    )
                elif kind == "error":
                    print(f"\nerror {event.error.code}: {event.error.message}", file=sys.stderr)
                    return 1
        finally:
            await stream.close()
            stream.cancel()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.target:
        print("mesh chat: --target HOST:PORT is required", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_chat(args))


async def _info(target: str) -> int:
    from mesh.client import AgentClient, create_channel

    async with create_channel(target) as channel:
        info = await AgentClient(channel).info()
        print(json_format.MessageToJson(info, indent=2, preserving_proto_field_name=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return asyncio.run(_info(args.target))


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="A mesh of AI agents over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run every agent of the config, each its own process")
    _add_config(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("agent", help="serve one agent")
    p.add_argument("name", help="the agent's name in the config")
    _add_config(p)
    p.add_argument("--host", help="address to bind (default: server.host)")
    p.add_argument("--port", type=int, help="port (default: the agent's port; 0 = any free)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("chat", help="send one message and stream the answer")
    p.add_argument("message", help="what to say")
    p.add_argument("--target", help="HOST:PORT of an agent")
    p.add_argument("--agent", help="the agent to talk to (through a router)")
    p.add_argument("--conversation", help="conversation id to continue")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print each event as a JSON line")
    p.set_defaults(func=cmd_chat, router_api=False)

    p = sub.add_parser("info", help="describe an agent")
    p.add_argument("--target", required=True, help="HOST:PORT of an agent")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"mesh {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MeshError as err:
        print(f"mesh {args.command}: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


__all__ = ["build_parser", "main"]
