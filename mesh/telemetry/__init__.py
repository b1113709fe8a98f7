"""Traces, metrics and JSON logs for every service of the mesh.

- :func:`configure` sets tracing up from the ``OTEL_*`` environment (nothing when
  none asks for export: no exporter, no thread, the no-op tracer);
- :mod:`mesh.telemetry.metrics` holds the Prometheus metrics, served by
  :class:`MetricsServer` on ``server.metrics_port``;
- :class:`JsonFormatter` is the JSON log format (``MESH_LOG_FORMAT=json``).
"""

from mesh.telemetry import _metrics as metrics
from mesh.telemetry import _trace as tracing
from mesh.telemetry._genai import ModelCall, traced_tool
from mesh.telemetry._http import MetricsServer
from mesh.telemetry._logs import JsonFormatter, trace_ids
from mesh.telemetry._setup import CAPTURE_CONTENT_ENV, configure, shutdown, state, wants_export

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "JsonFormatter",
    "MetricsServer",
    "ModelCall",
    "configure",
    "metrics",
    "shutdown",
    "state",
    "trace_ids",
    "traced_tool",
    "tracing",
    "wants_export",
]
