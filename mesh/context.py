"""Per-call state shared by interceptors, servicers and tools.

Server interceptors fill these context variables before the servicer runs; the
servicer, tools and outgoing client interceptors read them. Nothing here is
gRPC-specific, so the logic under the servicers can use it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

#: Metadata keys the mesh reads and forwards on every hop.
MD_AUTHORIZATION = "authorization"
MD_HOP_PATH = "x-mesh-hop-path"
MD_CONVERSATION_ID = "x-mesh-conversation-id"
MD_REQUEST_ID = "x-request-id"
MD_TRACEPARENT = "traceparent"
#: The W3C trace context headers, carried at every hop.
TRACE_KEYS = (MD_TRACEPARENT, "tracestate", "baggage")
#: Forwarded as-is from the incoming call to the next hop.
FORWARDED_KEYS = (MD_CONVERSATION_ID, MD_REQUEST_ID, MD_TRACEPARENT)


@dataclass(frozen=True)
class Principal:
    """Who a call acts for, as the validated token says."""

    subject: str
    """The user (``sub``) the call acts for."""
    issuer: str = ""
    """The token's ``iss``."""
    audience: str = ""
    """The audience the token was issued for (this service)."""
    scopes: frozenset[str] = frozenset()
    """Scopes from ``scp``/``scope`` plus app roles from ``roles``."""
    actor_chain: tuple[str, ...] = ()
    """Delegation chain from nested ``act`` claims, outermost (latest) first."""
    claims: Mapping[str, Any] = field(default_factory=dict)
    """All validated claims."""
    hops_remaining: int | None = None
    """The hop budget the token grants from this hop on (``mesh_hops``); None: not carried."""


current_principal: ContextVar[Principal | None] = ContextVar("mesh_principal", default=None)
#: The raw bearer token of the incoming call; never log it.
current_token: ContextVar[str | None] = ContextVar("mesh_token", default=None)
#: Agents the current turn has passed through, in order.
current_hop_path: ContextVar[tuple[str, ...]] = ContextVar("mesh_hop_path", default=())
current_conversation_id: ContextVar[str] = ContextVar("mesh_conversation_id", default="")
current_request_id: ContextVar[str] = ContextVar("mesh_request_id", default="")
#: W3C trace context of the current turn (traceparent, tracestate, baggage).
current_trace_context: ContextVar[dict[str, str]] = ContextVar("mesh_trace_context")


CONVERSATION_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def check_conversation_id(value: str, field: str) -> None:
    """Conversation ids travel in metadata: 1-128 visible ASCII characters of a safe set."""
    from mesh.errors import InvalidArgument

    if value and not CONVERSATION_ID_RE.match(value):
        raise InvalidArgument(
            f"{field} must be 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -", field=field
        )


def parse_hop_path(value: str) -> tuple[str, ...]:
    """Parse the ``x-mesh-hop-path`` header (comma-separated agent names)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def format_hop_path(path: tuple[str, ...] | list[str]) -> str:
    return ",".join(path)
