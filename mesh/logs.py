"""Logging for every service: one line per record on stderr, tokens scrubbed.

Nothing should ever log a token: values a caller controls are bounded and sanitized
before they are logged (:func:`safe_text`), and grpc's own "Invalid encoding" record,
which quotes a raw metadata value, is rewritten at its logger. The scrub here is the
second line of defence: every record our handler emits, traceback and stack included,
has anything shaped like a JWT, a piece of one, or a bearer credential replaced.
"""

from __future__ import annotations

import logging
import os
import re

#: A JWT from its header on, however it was cut (``eyJ`` is ``{"`` in base64url).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*)*")
#: Pieces of a token that lost their header: long base64url runs joined by a dot, or
#: one run longer than any identifier the mesh logs.
_FRAGMENT = re.compile(
    r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}(?:\.[A-Za-z0-9_-]*)?|[A-Za-z0-9_-]{80,}"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\\-]{8,}")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
#: grpc's loggers that quote raw metadata values.
GRPC_LOGGERS = ("grpc._cython.cygrpc",)


def scrub(text: str) -> str:
    """Replace token-shaped strings (whole or in pieces) with ``[redacted]``."""
    text = _BEARER.sub(r"\1[redacted]", text)
    return _FRAGMENT.sub("[redacted]", _JWT.sub("[redacted]", text))


def safe_text(value: object, limit: int = 64) -> str:
    """A caller-controlled value fit for a log line: printable ASCII only (others become
    ``?``), at most ``limit`` characters, and no token or piece of one."""
    text = _UNSAFE.sub("?", str(value))
    if len(text) > limit:
        text = text[:limit] + "..."
    cleaned = scrub(text)
    return "[withheld]" if cleaned != text else text


class ScrubFilter(logging.Filter):
    """Scrubs a record's message and its traceback text in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logged as such, not raised
            message = f"unformattable record from {record.name}"
        cleaned = scrub(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class ScrubFormatter(logging.Formatter):
    """Scrubs the whole formatted line (message, traceback and stack)."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _GrpcMetadataFilter(logging.Filter):
    """grpc logs ``Invalid encoding on b'<raw metadata value>'`` with a traceback when a
    caller sends bytes that are not UTF-8: keep the event, drop the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "encoding" in record.msg.lower():
            record.msg, record.args = (
                "invalid metadata encoding from a caller (value withheld)",
                None,
            )
            record.exc_info, record.exc_text, record.levelno = None, None, logging.INFO
            record.levelname = "INFO"
            return True
        return True


_GRPC_FILTER = _GrpcMetadataFilter()


def guard_library_loggers() -> None:
    """Install the filters on library loggers that may quote caller data (idempotent)."""
    for name in GRPC_LOGGERS:
        logger = logging.getLogger(name)
        if _GRPC_FILTER not in logger.filters:
            logger.addFilter(_GRPC_FILTER)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from ``MESH_LOG_LEVEL``, default INFO)."""
    guard_library_loggers()
    root = logging.getLogger()
    if any(getattr(h, "_mesh", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(ScrubFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if os.environ.get("MESH_LOG_FORMAT", "text").strip().lower() == "json":
        from mesh.telemetry import JsonFormatter  # one JSON object per line, with trace ids

        handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    handler._mesh = True  # type: ignore[attr-defined]  # marks our handler as installed
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("MESH_LOG_LEVEL", "INFO")).upper())
    # One line per HTTP request to the identity provider is noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # a2a-sdk logs a DEBUG line per traced function as it is defined and called; its
    # dotted names look like tokens to the scrub, and say nothing an operator needs.
    logging.getLogger("a2a.utils.telemetry").setLevel(logging.INFO)
