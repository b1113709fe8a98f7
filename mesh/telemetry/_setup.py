"""Telemetry setup from the standard ``OTEL_*`` environment, once per process.

With no ``OTEL_*`` variable that asks for export, nothing is created: the global
tracer stays OpenTelemetry's no-op, no exporter exists and no thread starts, and
the hooks in the mesh check :data:`state.tracing` before building anything.

Honoured: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` (``otlp`` or ``none``),
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (and the
exporter's other ``OTEL_EXPORTER_OTLP_*`` settings, read by the exporter itself),
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*`` and
``OTEL_TRACES_SAMPLER``. Message content is recorded only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mesh.telemetry")

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


@dataclass
class _State:
    tracing: bool = False
    """Spans are recorded and exported (an exporter is configured)."""
    capture_content: bool = False
    """Message content goes into spans (an explicit opt-in)."""
    service: str = ""
    provider: Any = None


state = _State()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wants_export(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces to be exported over OTLP."""
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter == "otlp":
        return True
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(service_name: str) -> bool:
    """Set up tracing for this process from the environment (first call wins).

    Returns whether spans are exported. ``service_name`` is the default of
    ``service.name`` (``OTEL_SERVICE_NAME`` overrides it).
    """
    if state.service:
        return state.tracing
    state.service = service_name
    state.capture_content = _truthy(os.environ.get(CAPTURE_CONTENT_ENV))
    if not wants_export():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
    insecure = endpoint.startswith("http://") or None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(insecure=insecure, timeout=10)))
    trace.set_tracer_provider(provider)
    state.provider = provider
    state.tracing = True
    log.info(
        "exporting traces over OTLP to %s as %s",
        endpoint or "the default endpoint",
        os.environ.get("OTEL_SERVICE_NAME") or service_name,
    )
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is buffered and stop the exporter (at the end of a drain)."""
    provider = state.provider
    if provider is None:
        return
    try:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()
    except Exception as err:  # noqa: BLE001 - telemetry never fails a shutdown
        log.info("telemetry shutdown: %s", err)
    state.provider = None
    state.tracing = False
