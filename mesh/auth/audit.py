"""The audit trail: one structured JSON line per call on logger ``mesh.audit``.

Values the caller controls (hop path, conversation and request ids) are bounded and
sanitized before they are written: a refused call's unvalidated headers never reach
the log as sent.

Each line names the service, method, final status, the subject, the delegation
chain (nested ``act``) and the hop path, so a call can be traced across hops even
where the issuer records no ``act``. Never a token: free text is scrubbed of
anything shaped like a JWT.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import grpc

from mesh.auth.jwt import redact
from mesh.context import Principal
from mesh.logs import safe_text, scrub

log = logging.getLogger("mesh.audit")
_ORDINARY = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)


def log_call(
    *,
    service: str,
    method: str,
    code: grpc.StatusCode,
    principal: Principal | None,
    hop_path: Sequence[str] = (),
    conversation_id: str = "",
    request_id: str = "",
    duration_ms: float | None = None,
    reason: str = "",
) -> None:
    """Write the audit line for one completed (or refused) call."""
    record: dict[str, object] = {
        "event": "call",
        "service": service,
        "method": method,
        "status": code.name,
        "subject": principal.subject if principal else None,
        "actors": list(principal.actor_chain) if principal else [],
        "client": (principal.claims.get("azp") if principal else None),
        "hop_path": _safe_path(hop_path),
    }
    if conversation_id:
        record["conversation_id"] = safe_text(conversation_id, 128)
    if request_id:
        record["request_id"] = safe_text(request_id, 128)
    if duration_ms is not None:
        record["duration_ms"] = round(duration_ms, 1)
    if reason:
        record["reason"] = scrub(redact(reason))[:300]
    # A caller that goes away (CANCELLED: a closed terminal, a turn the router gave up
    # on) is ordinary; refusals and failures are what an operator looks for.
    level = logging.INFO if code in _ORDINARY else logging.WARNING
    log.log(level, json.dumps(record, sort_keys=True, separators=(",", ":"), default=str))


_MAX_PATH = 32


def _safe_path(hop_path: Sequence[str]) -> list[str]:
    """At most 32 entries of at most 64 printable characters each, tokens withheld."""
    path = [safe_text(name, 64) for name in list(hop_path)[:_MAX_PATH]]
    if len(hop_path) > _MAX_PATH:
        path.append(f"... {len(hop_path) - _MAX_PATH} more")
    return path
