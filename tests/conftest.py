"""Test-wide settings, and the suite-wide check that no log line carries a token."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

import pytest

# grpc's C core logs connection-level INFO lines (GOAWAY on shutdown) to stderr.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

#: A JWT (header.payload.signature, base64url, header starting with `{"`).
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.name} {record.getMessage()}")
        except Exception:  # noqa: BLE001 - an unformattable record is not our check's crash
            self.lines.append(f"{record.name} {record.msg!r}")
        if record.exc_info and record.exc_info[1] is not None:
            self.lines.append(repr(record.exc_info[1]))


def leaked(lines: list[str]) -> list[str]:
    """Lines that carry a token, or that our log scrubber had to clean (also a leak)."""
    return [line for line in lines if JWT.search(line) or "[redacted]" in line]


@pytest.fixture(scope="session", autouse=True)
def no_token_in_any_log() -> Iterator[None]:
    """Reads every log line the suite writes, in this process and in every `mesh`
    process the tests start (stderr, and stdout but for `mesh token`'s)."""
    from tests.meshtest import STARTED

    handler = _Everything()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    lines = list(handler.lines)
    for proc in STARTED:
        lines.extend(proc.stderr)
        if proc.args[:1] != ["token"]:
            lines.extend(proc.stdout)
    bad = leaked(lines)
    assert not bad, f"{len(bad)} log lines carry a token, e.g. {bad[0][:120]}..."
