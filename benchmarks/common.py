"""What every benchmark process agrees on: the messages, the replies, the methods."""

from __future__ import annotations

import asyncio
import os
import sys

AGENT_METHOD = "/mesh.v1.AgentService/Chat"
ROUTER_METHOD = "/mesh.v1.RouterService/Chat"

#: The user's message of a short turn (the offline model answers ``a heard: <message>``).
SHORT_MESSAGE = "hello, how are you today?"
#: A message that makes agent ``a`` stream :data:`LONG_REPLY`.
LONG_MESSAGE = "tell me a long story"
LONG_WORDS = 2000
LONG_REPLY = " ".join(f"w{i:04d}" for i in range(LONG_WORDS))
#: Characters per streamed delta (the offline model's ``chunk_chars``).
CHUNK_CHARS = 12


def use_uvloop(enabled: bool) -> str:
    """Install uvloop's event loop policy when asked; returns the loop's name."""
    if not enabled:
        return "asyncio"
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from importlib import metadata

    return f"uvloop {metadata.version('uvloop')}"


def quiet_grpc() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
