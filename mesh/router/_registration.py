"""Who may register which agent at which address (``RouterService/Register``).

A registration takes traffic meant for an agent, so it is checked before anything is
listed: a valid agent name and ``host:port``; with auth, the caller's own service
token (client credentials, never a user's delegated token) carrying the register role
in ``roles`` and naming that very agent as its client; an IP address inside
``router.discovery.register_networks`` (and the caller's own, when configured); and
never an agent that static or DNS discovery already lists, unless configured.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from mesh.auth.jwt import is_app_only
from mesh.config import MeshConfig
from mesh.context import current_principal
from mesh.errors import InvalidArgument, PermissionDenied
from mesh.router._pool import AgentPool
from mesh.v1 import router_pb2

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def authorize_registration(
    config: MeshConfig, pool: AgentPool, request: router_pb2.RegisterRequest, peer: str
) -> None:
    """Raise PermissionDenied / InvalidArgument unless this caller may list
    ``request.name`` at ``request.address``."""
    if not _NAME.match(request.name):
        raise InvalidArgument("name must be a valid agent name", field="name")
    if not _ADDRESS.match(request.address):
        raise InvalidArgument("address must be host:port", field="address")
    if config.auth.enabled:
        _check_caller(config, request.name)
    _check_address(config, request.address, peer)
    discovery = config.router.discovery
    others = {
        source
        for endpoint in pool.endpoints.get(request.name, {}).values()
        for source in endpoint.sources
    } - {"registered"}
    if others and not discovery.registration_joins_static:
        raise PermissionDenied(
            f"{request.name} is discovered by {', '.join(sorted(others))}; a registration "
            "never shadows it (router.discovery.registration_joins_static)",
            field="name",
        )


def _roles(claims: dict[str, Any]) -> set[str]:
    value = claims.get("roles")
    if isinstance(value, str):
        return set(value.split())
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()


def _check_caller(config: MeshConfig, name: str) -> None:
    """The agent's own service token: app-only, with the register role as an app role
    (a user's delegated token never registers, whatever its scopes say)."""
    role = config.router.discovery.register_role
    principal = current_principal.get()
    claims = dict(principal.claims) if principal is not None else {}
    if principal is None or not is_app_only(claims) or role not in _roles(claims):
        raise PermissionDenied(
            f"registering needs the agent's own service token (client credentials) "
            f"with the {role!r} role"
        )
    client = str(claims.get("azp") or claims.get("client_id") or "")
    if client != config.auth.client_id_for(name):
        raise PermissionDenied(
            f"a caller may register only its own agent; this token is not {name!r}'s",
            field="name",
        )


def _check_address(config: MeshConfig, address: str, peer: str) -> None:
    discovery = config.router.discovery
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise PermissionDenied(
            "the address must be an IP address inside router.discovery.register_networks",
            field="address",
        ) from None
    networks = [ipaddress.ip_network(n, strict=False) for n in discovery.register_networks]
    if not any(ip in net for net in networks):
        raise PermissionDenied(
            f"{ip} is outside router.discovery.register_networks", field="address"
        )
    if discovery.register_own_address and ip != _peer_ip(peer):
        raise PermissionDenied(
            "the address must be the caller's own (router.discovery.register_own_address)",
            field="address",
        )


def _peer_ip(peer: str) -> IP | None:
    """The IP of a grpc peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
