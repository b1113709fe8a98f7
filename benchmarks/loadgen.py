"""The load generator: its own process, driven by JSON lines on stdin.

Each command is one line of JSON; each answer is one line of JSON on stdout
(nothing else is printed there). Commands:

``{"op": "turns", ...}``
    ``concurrency`` workers each keep one Chat stream open and send turns back to
    back for ``warmup + duration`` seconds; turns that end inside the measured window
    are counted. ``conversation``: ``"worker"`` (each worker keeps its own conversation
    id, as a client does) or ``"turn"`` (every turn a new conversation id). The CPU
    time of the processes named in ``pids`` (and of this one) is read from
    ``/proc/<pid>/stat`` at the window's start and end, so it covers exactly the
    measured turns. ``tls_ca``: a CA file to verify the server with (TLS).
    Answers with turns/s, latency percentiles, time to first delta, deltas/s and
    CPU ms per turn per process.
``{"op": "hold", "address": ..., "count": N}``
    Opens N Chat streams (one turn each, so each is known to be live) and keeps
    them open and idle until ``{"op": "release"}``.
``{"op": "quit"}``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks.common import AGENT_METHOD, ROUTER_METHOD, quiet_grpc, use_uvloop
from mesh.client import create_channel, turn_request
from mesh.config import ServerSettings
from mesh.v1 import types_pb2

METHODS = {"agent": AGENT_METHOD, "router": ROUTER_METHOD}
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


ChatCall = grpc.aio.StreamStreamCall[types_pb2.ChatRequest, types_pb2.ChatEvent]
ChatMethod = grpc.aio.StreamStreamMultiCallable[types_pb2.ChatRequest, types_pb2.ChatEvent]


class TurnFailed(Exception):
    """A turn ended with an error event or an early end of stream."""


@dataclass
class Window:
    start: float
    stop: float
    latencies: list[float] = field(default_factory=list)
    first_delta: list[float] = field(default_factory=list)
    deltas: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what[:300])


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


class LoadGen:
    def __init__(self) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.settings = ServerSettings(max_message_bytes=64 * 1024 * 1024)
        self.held: list[ChatCall] = []

    def channel(self, address: str, slot: str = "", tls_ca: str = "") -> grpc.aio.Channel:
        key = f"{address}#{slot}#{tls_ca}"
        if key not in self.channels:
            credentials = None
            if tls_ca:
                with open(tls_ca, "rb") as f:
                    credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            # Each slot its own connection: one holds at most the server's HTTP/2
            # streams per connection, and held streams never free theirs.
            self.channels[key] = create_channel(
                address, settings=self.settings, own_connection=bool(slot), credentials=credentials
            )
        return self.channels[key]

    def method(self, address: str, kind: str, slot: str = "", tls_ca: str = "") -> ChatMethod:
        return self.channel(address, slot, tls_ca).stream_stream(
            METHODS[kind],
            request_serializer=types_pb2.ChatRequest.SerializeToString,
            response_deserializer=types_pb2.ChatEvent.FromString,
        )

    # -- turns ------------------------------------------------------------------------

    async def _one_turn(
        self, call: ChatCall, request: types_pb2.ChatRequest, window: Window
    ) -> tuple[float, float | None, float]:
        clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
        t0 = clock()
        await call.write(request)
        first: float | None = None
        while True:
            event = await call.read()
            if not isinstance(event, types_pb2.ChatEvent):
                raise TurnFailed("stream ended before the final event")
            kind = event.WhichOneof("kind")
            if kind == "delta":
                now = clock()
                if first is None:
                    first = now
                if window.start <= now <= window.stop:
                    window.deltas += 1
            elif kind == "final":
                return t0, first, clock()
            elif kind == "error":
                raise TurnFailed(f"{event.error.code}: {event.error.message}")

    async def _worker(
        self,
        method: ChatMethod,
        request: types_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
        per_turn: bool,
        window: Window,
    ) -> None:
        clock = time.perf_counter
        call: ChatCall | None = None
        request.turn.conversation_id = uuid.uuid4().hex  # this worker's conversation
        while clock() < window.stop:
            try:
                if call is None:
                    call = method(metadata=metadata, timeout=600)
                if per_turn:
                    request.turn.conversation_id = uuid.uuid4().hex
                t0, first, t1 = await self._one_turn(call, request, window)
                # Closed loop: a turn counts when it ends inside the window.
                if window.start <= t1 <= window.stop:
                    window.latencies.append(t1 - t0)
                    if first is not None:
                        window.first_delta.append(first - t0)
            except (grpc.aio.AioRpcError, TurnFailed) as err:
                text = (
                    f"{err.code().name}: {err.details()}"
                    if isinstance(err, grpc.aio.AioRpcError)
                    else str(err)
                )
                window.failed(text)
                if call is not None:
                    call.cancel()
                call = None
                await asyncio.sleep(0.01)  # an error storm must not spin the loop
        if call is not None:
            call.cancel()

    async def turns(self, cmd: dict[str, Any]) -> dict[str, Any]:
        concurrency = int(cmd["concurrency"])
        warmup, duration = float(cmd["warmup"]), float(cmd["duration"])
        method = self.method(cmd["address"], cmd["kind"], tls_ca=cmd.get("tls_ca", ""))
        metadata = tuple((str(k), str(v)) for k, v in cmd.get("metadata", []))
        # One metadata list per user: worker i is user i (modulo), as many clients are.
        users = [tuple((str(k), str(v)) for k, v in pairs) for pairs in cmd.get("users", [])]
        per_turn = cmd.get("conversation", "worker") == "turn"
        pids: dict[str, int] = {str(k): int(v) for k, v in cmd.get("pids", {}).items()}
        pids["loadgen"] = os.getpid()
        samples: list[dict[str, float]] = []

        def sample() -> None:
            samples.append({name: cpu_seconds(pid) for name, pid in pids.items()})

        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        window = Window(start=now + warmup, stop=now + warmup + duration)
        # The window's edges on the loop's clock; a timer callback is cheap and on time.
        loop.call_later(warmup, sample)
        loop.call_later(warmup + duration, sample)
        await asyncio.gather(
            *(
                self._worker(
                    method,
                    turn_request(cmd["message"], agent=cmd.get("agent", "")),
                    users[i % len(users)] if users else metadata,
                    per_turn,
                    window,
                )
                for i in range(concurrency)
            )
        )
        while len(samples) < 2:  # the stop sample is due at the window's end
            await asyncio.sleep(0.01)
        lat = sorted(window.latencies)
        turns = max(len(lat), 1)
        cpu_ms = {name: (samples[1][name] - samples[0][name]) / turns * 1000 for name in samples[0]}
        ttfd = sorted(window.first_delta)
        return {
            "turns": len(lat),
            "turns_per_s": len(lat) / duration,
            "deltas_per_s": window.deltas / duration,
            "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "ttfd_p50_ms": percentile(ttfd, 50) * 1000,
            "ttfd_p99_ms": percentile(ttfd, 99) * 1000,
            "errors": window.errors,
            "error_samples": window.error_samples,
            "cpu_ms_per_turn": cpu_ms,
        }

    # -- holding idle streams -----------------------------------------------------------

    async def hold(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count, per_channel = int(cmd["count"]), int(cmd.get("per_channel", 1000))
        address = cmd["address"]
        metadata = tuple((str(k), str(v)) for k, v in cmd.get("metadata", []))
        request = turn_request(cmd["message"])
        gate = asyncio.Semaphore(int(cmd.get("parallel", 200)))
        loop = asyncio.get_running_loop()
        window = Window(start=0.0, stop=float("inf"))
        errors: list[str] = []
        base = len(self.held)

        async def open_one(index: int) -> None:
            slot = f"hold-{(base + index) // per_channel}"
            call = self.method(address, "router", slot)(metadata=metadata, timeout=3600)
            async with gate:
                started = loop.time()
                try:
                    await asyncio.wait_for(self._one_turn(call, request, window), 30)
                except TimeoutError:
                    call.cancel()
                    errors.append("no final event within 30 s")
                    return
                except grpc.aio.AioRpcError as err:
                    call.cancel()
                    if loop.time() - started >= 30:  # our timeout cancelled the call
                        errors.append("no final event within 30 s (call cancelled)")
                    else:
                        errors.append(f"{err.code().name}: {err.details()}"[:200])
                    return
                except TurnFailed as err:
                    call.cancel()
                    errors.append(str(err)[:200])
                    return
                except asyncio.InvalidStateError:  # ended before the write: say how
                    errors.append(f"{(await call.code()).name}: {await call.details()}"[:200])
                    return
            self.held.append(call)

        started = loop.time()
        await asyncio.gather(*(open_one(i) for i in range(count)))
        return {
            "held": len(self.held),
            "opened": count - len(errors),
            "errors": len(errors),
            "error_samples": errors[:3],
            "seconds": loop.time() - started,
        }

    async def release(self) -> dict[str, Any]:
        released = len(self.held)
        for call in self.held:
            call.cancel()
        self.held.clear()
        for key in [k for k in self.channels if "#hold-" in k]:
            await self.channels.pop(key).close()
        return {"released": released}

    async def close(self) -> None:
        await self.release()
        for channel in self.channels.values():
            await channel.close()


async def serve_commands(loop_name: str) -> None:
    gen = LoadGen()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 << 20)  # a command may carry a token per user
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, "loop": loop_name}), flush=True)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                break
            if op == "turns":
                result = await gen.turns(cmd)
            elif op == "hold":
                result = await gen.hold(cmd)
            elif op == "release":
                result = await gen.release()
            else:
                result = {"error": f"unknown op {op!r}"}
            print(json.dumps(result), flush=True)
    finally:
        await gen.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    quiet_grpc()
    loop_name = use_uvloop(args.uvloop)
    asyncio.run(serve_commands(loop_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
