"""The ``router:`` block of the mesh file: routes, sequences, discovery, the store and
model-chosen routing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh._config_provider import ProviderConfig
from mesh.matching import TextCondition


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteRule(TextCondition):
    """CONDITIONAL routing: picks an agent before any model runs. Every condition given
    must hold: a word of ``contains``, the ``matches`` pattern, each ``context`` pair."""

    agent: str
    context: dict[str, str] = Field(default_factory=dict)
    """Every key must equal this value in the turn's context or call metadata."""

    def applies(self, text: str, context: Mapping[str, str], metadata: Mapping[str, str]) -> bool:
        if self.contains and not self.contains_any(text):
            return False
        if self.matches is not None and not self.matches_pattern(text):
            return False
        return all(context.get(k, metadata.get(k)) == v for k, v in self.context.items())

    @model_validator(mode="after")
    def _has_condition(self) -> RouteRule:
        if not self.contains and self.matches is None and not self.context:
            raise ValueError("a route needs contains, matches or context")
        return self


class SequenceConfig(_Frozen):
    """SEQUENTIAL: a named chain where each agent's output feeds the next."""

    steps: list[str] = Field(min_length=1)
    description: str = ""


class DnsTarget(_Frozen):
    """A DNS name whose addresses are replicas of one agent (a headless Service)."""

    agent: str
    host: str
    port: int = Field(ge=1, le=65535)


class DiscoveryConfig(_Frozen):
    static: dict[str, list[str]] = Field(default_factory=dict)
    """agent -> host:port list (``mesh up`` fills this for the agents it starts)."""
    dns: list[DnsTarget] = Field(default_factory=list)
    dns_interval_s: float = Field(default=15.0, gt=0)
    """How often DNS names are resolved again."""
    health_interval_s: float = Field(default=2.0, gt=0)
    """How soon an endpoint that stopped answering leaves the pool (at most)."""
    registration: bool = True
    """Accept agents that announce themselves on Router.Register."""
    register_role: str = "mesh.register"
    """With auth on, the app role (``roles``) a caller's token needs to register; the
    registered name must be the caller's own agent (its client id)."""
    register_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    """Networks a registered address must fall inside (CIDR)."""
    register_own_address: bool = True
    """A registered address must be the caller's own peer address."""
    registration_joins_static: bool = False
    """Let registrations add replicas to an agent that static or DNS discovery lists
    (off: a registration never shadows endpoints of another source)."""
    hosts_file: str | None = None
    """Resolve DNS targets from this hosts-format file instead of the system resolver
    (local setups and tests); re-read on every resolution."""


class StoreConfig(_Frozen):
    kind: Literal["sqlite", "redis", "memory"] = "sqlite"
    path: str = "conversations.db"
    """SQLite file, relative to the data dir."""
    url_env: str = "MESH_REDIS_URL"
    """Environment variable holding the Redis URL (it may carry a password)."""
    url: str | None = None
    """Redis URL without credentials, used when ``url_env`` is unset."""
    history_limit: int = Field(default=200, ge=1)
    """Messages of history handed to an agent per turn (the newest)."""
    history_max_bytes: int = Field(default=1 << 20, ge=1024)
    """Bytes of history handed to an agent per turn (the newest messages that fit; the
    turn's final says how many were left out). Keep it well under the message limit."""
    ttl_s: float | None = Field(default=None, gt=0)
    """Forget a conversation this long after its last turn (every store: it reads as new
    at once; Redis expires its keys, SQLite and memory delete it within a quarter of
    the TTL, at most a minute). None keeps conversations until deleted by hand."""


class RoutingConfig(_Frozen):
    """How the router picks an agent when no CONDITIONAL route matches."""

    strategy: Literal["default", "best_match"] = "default"
    """``best_match``: a model picks the agent from the agents' Info (description,
    skills) before the turn runs; ``default``: the default agent."""
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    """The routing model (``kind``, ``model`` and the provider's options)."""
    timeout_s: float = Field(default=10.0, gt=0)
    """The decision's own deadline; past it the turn goes to the default agent."""


class RouterConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=50050, ge=0, le=65535)
    default_agent: str = ""
    """The agent (a triage agent) that gets turns no rule picks."""
    routes: list[RouteRule] = Field(default_factory=list)
    sequences: dict[str, SequenceConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    """Model-chosen routing (``strategy: best_match``) after the CONDITIONAL routes."""
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """How long to wait for an agent to accept a stream."""
    default_deadline_s: float = Field(default=300.0, gt=0)
    """The deadline a turn gets when the client sets none."""
    max_streams_per_user: int = Field(default=64, ge=0)
    """With auth: at most this many Chat streams one user (the token's subject) holds
    open at once, so no user can take every stream the server allows
    (``server.max_concurrent_rpcs``); 0: no limit. Without auth there is no user."""
    keep_agent_streams_s: float = Field(default=60.0, ge=0)
    """Keep an idle agent Chat stream in the pool this long for the next turn (of any
    conversation with the same delegated token), so a turn costs a message instead of a
    new call (0: a new call every turn). An agent that runs out of streams gets the
    idle ones back at once."""
    keep_agent_streams_max: int = Field(default=64, ge=0)
    """At most this many idle pooled streams per agent replica: they share one HTTP/2
    connection with the turns in flight, whose streams must never queue behind them."""
