"""The ``mesh`` command: the argument parser and the one place failures are printed.

mesh up                      run the token service, every agent and the router
mesh router                  serve the router
mesh agent NAME              serve one agent
mesh agents                  list the agents a router sees
mesh chat [MESSAGE | -]      chat (interactive without a message)
mesh info --target HOST:PORT describe an agent
mesh new agent NAME          scaffold an agent: mesh file block, tools, a test
mesh k8s [--check]           the agents' Kubernetes manifests, from the mesh file
mesh sts / mesh token        the embedded token service; a user token for grpcurl

Each group of subcommands lives in its own module with an ``add_parsers(sub)``;
:data:`COMMANDS` lists them in the order ``mesh --help`` shows them. A new group
(``mesh mcp``) adds its registrar there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mesh.cli import _chat, _inspect, _k8s, _new, _serve, _supervisor
from mesh.cli._common import EXIT_USAGE, CommandError
from mesh.errors import ConfigError, MeshError
from mesh.logs import setup_logging

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _auth_parsers(sub: SubParsers) -> None:
    from mesh.auth.cli import add_parsers

    add_parsers(sub)


def _mcp_parsers(sub: SubParsers) -> None:
    from mesh.mcp.cli import add_parser

    add_parser(sub)


def _a2a_parsers(sub: SubParsers) -> None:
    from mesh.a2a.cli import add_parser

    add_parser(sub)


#: Subcommand registrars, in help order. Add a group here (one line).
COMMANDS: list[Callable[[SubParsers], None]] = [
    _supervisor.add_parsers,  # up
    _serve.add_parsers,  # router, agent
    _inspect.add_parsers,  # agents, info
    _chat.add_parsers,  # chat
    _new.add_parsers,  # new
    _k8s.add_parsers,  # k8s
    _auth_parsers,  # sts, token
    _mcp_parsers,  # mcp
    _a2a_parsers,  # a2a
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="A mesh of AI agents over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe: send what is left of stdout nowhere (so that the
    interpreter's last flush does not fail again)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"mesh {args.command}"
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return err.code
    except MeshError as err:
        print(f"{name}: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _quiet_stdout()
        print(f"{name}: output closed before the end (broken pipe)", file=sys.stderr)
        return 141
    except KeyboardInterrupt:
        return 130
    return code


__all__ = ["COMMANDS", "build_parser", "main"]
