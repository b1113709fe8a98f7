"""W3C trace context from callers: only well-formed values pass.

Every service takes ``traceparent``, ``tracestate`` and ``baggage`` from its callers'
metadata (``mesh.interceptors``), and the edges take them from their protocol (MCP's
``params._meta``, HTTP headers). Only well-formed values pass (W3C Trace Context level
1, W3C Baggage): a malformed one is dropped, never forwarded as it came and never an
error; ``tracestate`` travels only with the ``traceparent`` beside it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mesh.context import MD_TRACEPARENT

MAX_VALUE = 512
"""The longest value forwarded (the router keeps none longer)."""
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?"
)
_KEY = re.compile(r"[a-z][a-z0-9_*/-]{0,255}|[a-z0-9][a-z0-9_*/-]{0,240}@[a-z][a-z0-9_*/-]{0,13}")
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OCTETS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")


def traceparent(value: object) -> str | None:
    """``value`` when it is a valid ``traceparent``, else None."""
    if not isinstance(value, str) or len(value) > MAX_VALUE:
        return None
    value = value.strip(" \t")
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if rest is not None and version == "00":
        return None  # version 00 has exactly four fields; later versions may add more
    return value


def tracestate(value: object) -> str | None:
    """``value`` normalised (no blanks around the commas) when it is a valid
    ``tracestate``, else None."""
    if not isinstance(value, str) or len(value) > MAX_VALUE:
        return None
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    keys: set[str] = set()
    for member in members:
        key, eq, item = member.partition("=")
        if not eq or not _KEY.fullmatch(key) or not _VALUE.fullmatch(item) or key in keys:
            return None
        keys.add(key)
    if not members or len(members) > 32:
        return None
    return ",".join(members)


def baggage(value: object) -> str | None:
    """``value`` normalised (no optional blanks) when it is valid W3C ``baggage``, else None."""
    if not isinstance(value, str) or len(value) > 8192:
        return None
    members: list[str] = []
    for member in value.split(","):
        parts = [_pair(part, i == 0) for i, part in enumerate(member.split(";"))]
        if any(part is None for part in parts):
            return None
        members.append(";".join(p for p in parts if p))
    out = ",".join(members)
    return out if 0 < len(out) <= MAX_VALUE else None


def _pair(text: str, required: bool) -> str | None:
    """One ``key=value`` (a property may be a bare key) without its optional blanks."""
    key, eq, item = (s.strip(" \t") for s in text.partition("="))
    if not _TOKEN.fullmatch(key) or not _OCTETS.fullmatch(item) or (required and not eq):
        return None
    return f"{key}={item}" if eq else key


def checked(carrier: Mapping[str, Any]) -> dict[str, str]:
    """The well-formed trace context of one carrier (metadata, ``_meta``, headers)."""
    out: dict[str, str] = {}
    if (parent := traceparent(carrier.get(MD_TRACEPARENT))) is not None:
        out[MD_TRACEPARENT] = parent
        if (state := tracestate(carrier.get("tracestate"))) is not None:
            out["tracestate"] = state
    if (bag := baggage(carrier.get("baggage"))) is not None:
        out["baggage"] = bag
    return out


def incoming(meta: Mapping[str, Any] | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace context to forward from two carriers: ``traceparent`` (and its
    ``tracestate``) from ``meta``, else from ``headers``; ``baggage`` likewise, on its own."""
    sources = (checked(meta or {}), checked(headers or {}))
    out: dict[str, str] = {}
    for group in ((MD_TRACEPARENT, "tracestate"), ("baggage",)):
        source = next((s for s in sources if group[0] in s), {})
        out.update((k, source[k]) for k in group if k in source)
    return out
