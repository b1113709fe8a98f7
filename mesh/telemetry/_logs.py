"""One JSON object per log line, carrying the trace and span ids of the turn.

The ids come from the current span when tracing is on, else from the W3C
``traceparent`` of the turn being served (so logs join traces even when this
service exports none). Extra fields given with ``extra=`` (audit lines) are kept.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from mesh.context import current_trace_context
from mesh.logs import scrub
from mesh.telemetry._setup import state

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def trace_ids() -> tuple[str, str]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
    parts = current_trace_context.get({}).get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return "", ""


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service or os.environ.get("OTEL_SERVICE_NAME", "")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "mesh.audit" and out["message"].startswith("{"):
            out.update(_audit_fields(out["message"]))  # its fields, not a string in a string
        service = self.service or state.service
        if service:
            out["service"] = service
        trace_id, span_id = trace_ids()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(out, ensure_ascii=False))


def _audit_fields(message: str) -> dict[str, Any]:
    """An audit line's JSON fields (``event`` becomes the message)."""
    try:
        fields = json.loads(message)
    except ValueError:
        return {}
    if not isinstance(fields, dict):
        return {}
    fields["message"] = f"audit {fields.pop('event', 'call')}"
    fields["audit_service"] = fields.pop("service", "")
    return fields
