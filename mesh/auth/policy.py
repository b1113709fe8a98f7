"""Who may obtain which tokens: one audience policy per client of the identity provider.

The embedded STS enforces it on every grant (client credentials, on-behalf-of, RFC
8693), and every exchanger the mesh drives checks the same policy before it asks any
identity provider, so a compromised agent cannot turn a user's token into one for the
router or for another agent. With Entra ID or another RFC 8693 issuer the issuer's own
configuration must say the same (see the README's auth section).

Defaults, from the mesh file:

- the router: delegated and app tokens for every agent (turns, and its own ``Info``);
- an agent: delegated and app tokens for the MCP servers it lists with an
  ``audience`` (add remote A2A peers in ``auth.clients.<agent>.audiences``), app tokens
  for the router (registration, with the ``router.discovery.register_role`` role);
- an edge (``mesh mcp``, the A2A edge): a user's token for the router only;
- ``auth.service_callers``: ``{agent: [service, ...]}`` also lets those services get app
  tokens for that agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.config import MeshConfig
from mesh.errors import PermissionDenied


@dataclass(frozen=True)
class ClientPolicy:
    """What one client (a service of the mesh) may obtain."""

    service: str
    """The service ("router", an agent name, or an extra ``auth.clients`` key)."""
    client_id: str
    """The client id it authenticates as."""
    delegated: frozenset[str]
    """Audiences it may get a user's token for (on-behalf-of, token exchange)."""
    app: frozenset[str]
    """Audiences it may get its own client-credentials token for."""
    roles: tuple[str, ...] = ()
    """App roles in its client-credentials tokens."""

    def check(self, audience: str, *, delegated: bool) -> None:
        """PermissionDenied unless this client may obtain a token for ``audience``."""
        allowed = self.delegated if delegated else self.app
        if audience not in allowed:
            kind = "a delegated" if delegated else "an app"
            raise PermissionDenied(
                f"client {self.client_id} may not obtain {kind} token for {audience}"
            )


#: Edges that take a user's token for themselves and reach the mesh through the router
#: (``mesh mcp``; the A2A edge): a user's token for the router, nothing else.
EDGES = ("mcp", "a2a")


def _audiences(config: MeshConfig, names: Iterable[str]) -> set[str]:
    """Service names become their audiences; anything else is taken as an audience."""
    known = {"router", *config.agents}
    return {config.auth.audience_for(n) if n in known else n for n in names}


def client_policy(config: MeshConfig, service: str) -> ClientPolicy:
    """The policy of ``service`` from the mesh file (explicit lists replace the defaults)."""
    auth = config.auth
    client = auth.client_for(service)
    agents = list(config.agents)
    if service == "router":
        delegated, app, roles = agents, agents, []
    elif service in config.agents:
        resources = [s.audience for s in config.agents[service].mcp_servers if s.audience]
        role = config.router.discovery.register_role
        delegated, app, roles = resources, ["router", *resources], [role]
    elif service in EDGES:
        delegated, app, roles = ["router"], [], []
    else:
        delegated, app, roles = [], [], []
    if client.audiences is not None:
        delegated = client.audiences
    if client.app_audiences is not None:
        app = client.app_audiences
    if client.roles is not None:
        roles = client.roles
    callee = [agent for agent, callers in auth.service_callers.items() if service in callers]
    return ClientPolicy(
        service=service,
        client_id=auth.client_id_for(service),
        delegated=frozenset(_audiences(config, delegated)),
        app=frozenset(_audiences(config, [*app, *callee])),
        roles=tuple(dict.fromkeys(roles)),
    )


def client_services(config: MeshConfig) -> list[str]:
    """Every client of the identity provider the mesh file names."""
    return list(dict.fromkeys(["router", *config.agents, *config.auth.clients]))


def policies(config: MeshConfig) -> dict[str, ClientPolicy]:
    """Every client's policy, by client id."""
    out: dict[str, ClientPolicy] = {}
    for service in client_services(config):
        policy = client_policy(config, service)
        out[policy.client_id] = policy
    return out


def hop_scopes(config: MeshConfig, agent: str) -> list[str] | None:
    """The scopes ``agent``'s hop token should carry (``auth.scopes``, else its
    ``required_scopes``); None: whatever the user's token has."""
    declared = config.auth.scopes.get(agent)
    if declared is None and agent in config.agents:
        declared = config.agents[agent].required_scopes or None
    return list(declared) if declared is not None else None


def hops_claim_for(config: MeshConfig, agent: str, hops_used: int) -> int:
    """The hop budget to put in ``agent``'s token after ``hops_used`` handoffs this turn:
    what is left of the smaller of the mesh's and the agent's ``max_hops``."""
    return max(config.max_hops_for(agent) - hops_used, 0)


def check_hop_budget(hops_remaining: int | None, hops_wanted: int) -> None:
    """PermissionDenied when a turn asks for more handoffs (``hops_wanted``) than the
    caller's token grants (``Principal.hops_remaining``; None: the token carries no
    budget). Agents call it so a bypassed router cannot buy a longer chain."""
    if hops_remaining is not None and hops_wanted > hops_remaining:
        raise PermissionDenied(
            f"hop budget exceeded: the token grants {hops_remaining} more hop(s), "
            f"the turn asks for {hops_wanted}"
        )


def acting_client(claims: Mapping[str, Any]) -> str:
    """The client that presented a delegated token: the outermost ``act``'s ``sub``, else
    ``azp``/``appid`` (Entra records no ``act``)."""
    act = claims.get("act")
    if isinstance(act, Mapping):
        sub = act.get("sub") or act.get("client_id")
        return sub if isinstance(sub, str) else ""
    client = claims.get("azp") or claims.get("appid") or claims.get("client_id")
    return client if isinstance(client, str) else ""


__all__ = [
    "ClientPolicy",
    "acting_client",
    "check_hop_budget",
    "client_policy",
    "client_services",
    "hop_scopes",
    "hops_claim_for",
    "policies",
]
