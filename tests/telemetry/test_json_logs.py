"""The JSON log format: one object per line, trace ids, audit fields, tokens scrubbed."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from mesh.auth.audit import log_call
from mesh.context import current_trace_context
from mesh.telemetry import JsonFormatter


@contextlib.contextmanager
def _capture(name: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """``name``'s records, JSON-formatted, into a buffer (the logger restored after)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service="test-service"))
    logger = logging.getLogger(name)
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def test_lines_carry_the_turns_trace_id_from_its_traceparent() -> None:
    with _capture("mesh.test.json") as (logger, stream):
        token = current_trace_context.set({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
        try:
            logger.info("turn %s", "t1")
        finally:
            current_trace_context.reset(token)
        logger.info("outside a turn")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "turn t1" and first["level"] == "INFO"
    assert first["trace_id"] == "a" * 32 and first["span_id"] == "b" * 16
    assert first["service"] == "test-service" and first["logger"] == "mesh.test.json"
    assert "trace_id" not in second


def test_lines_carry_the_current_spans_ids_and_no_token() -> None:
    span = TracerProvider().get_tracer("t").start_span("s")
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
    with _capture("mesh.test.span") as (logger, stream), trace.use_span(span, end_on_exit=True):
        logger.info("got %s", jwt)
    line = json.loads(stream.getvalue())
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert jwt not in stream.getvalue() and "[redacted]" in line["message"]


def test_audit_lines_keep_their_fields_and_are_info_when_allowed() -> None:
    with _capture("mesh.audit") as (_logger, stream):
        log_call(
            service="billing",
            method="/mesh.v1.AgentService/Chat",
            code=grpc.StatusCode.OK,
            principal=None,
            hop_path=["triage"],
            request_id="req-1",
        )
    line = json.loads(stream.getvalue())
    assert line["level"] == "INFO" and line["message"] == "audit call"
    assert line["status"] == "OK" and line["hop_path"] == ["triage"]
    assert line["request_id"] == "req-1" and line["audit_service"] == "billing"
