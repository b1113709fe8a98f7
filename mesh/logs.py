"""Logging for every service: one line per record on stderr, tokens scrubbed.

Nothing should ever log a token; the filter here is a second line of defence
that replaces anything shaped like a JWT or a bearer credential.
"""

from __future__ import annotations

import logging
import os
import re

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def scrub(text: str) -> str:
    """Replace token-shaped strings with ``[redacted]``."""
    return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted]", text))


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from ``MESH_LOG_LEVEL``, default INFO)."""
    root = logging.getLogger()
    if any(getattr(h, "_mesh", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if os.environ.get("MESH_LOG_FORMAT", "text").strip().lower() == "json":
        from mesh.telemetry import JsonFormatter  # one JSON object per line, with trace ids

        handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    handler._mesh = True  # type: ignore[attr-defined]  # marks our handler as installed
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("MESH_LOG_LEVEL", "INFO")).upper())
    # One line per HTTP request to the identity provider is noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
