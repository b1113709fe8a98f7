"""Processes of a benchmark run: start, find their address, read their CPU and memory."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}


class Service:
    """A server process started with ``python -m <module> ...`` (or ``command``) that prints
    a line holding ``prefix`` followed by its address once it serves."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        prefix: str,
        logs: Path,
        *,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log: IO[str] = self.log_path.open("w")
        self.popen = subprocess.Popen(
            command or [sys.executable, "-m", *argv],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**_env(), **(env or {})},
            cwd=REPO,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        try:
            self.address = self._wait(lines, prefix)
        except BaseException:
            self.popen.kill()
            self.popen.wait()
            raise

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def _wait(self, lines: queue.Queue[str | None], prefix: str, timeout: float = 60) -> str:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no {prefix!r} line in {timeout}s") from None
            if line is None:
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.wait()}); see {self.log_path}:\n"
                    + self.log_path.read_text()[-2000:]
                )
            if prefix in line:
                return line.split(prefix, 1)[1].strip()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> float:
        return rss_mib(self.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


class LoadGenProcess:
    """``python -m benchmarks.loadgen``: one JSON command in, one JSON answer out."""

    def __init__(self, name: str, uvloop: bool, logs: Path) -> None:
        self.name = name
        self._log: IO[str] = (logs / f"{name}.log").open("w")
        argv = [sys.executable, "-m", "benchmarks.loadgen", *(["--uvloop"] if uvloop else [])]
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=_env(),
            cwd=REPO,
        )
        hello = self._read()
        self.loop = str(hello.get("loop", "?"))

    def _read(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.popen.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()
        return self._read()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
                self.request({"op": "quit"})
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
