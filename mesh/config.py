"""The mesh file (``services/mesh.yaml``): agents, router, server limits and auth.

Loaded with pydantic; environment variables override the file
(``MESH_SERVER__GRACE_PERIOD_S=5``, ``MESH_AGENTS__TRIAGE__PORT=7000``: prefix
``MESH_``, ``__`` between levels). Secrets never live in the file: settings that
need one name the environment variable to read (``api_key_env``). A bad file
fails with one :class:`~mesh.errors.ConfigError` naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mesh._config_a2a import A2aEdgeConfig, A2aRemoteConfig
from mesh._config_load import (
    DEFAULT_CONFIG,
    ENV_CONFIG,
    NAME_RE,
    config_from_dict,
    load_config,
    resolve_config_path,
)
from mesh._config_mcp import McpHttpConfig, McpServerConfig, McpStdioConfig
from mesh._config_orch import ReflectionConfig, ReturnStrategyName, ToolPolicy
from mesh._config_provider import ProviderConfig
from mesh._config_router import (
    DiscoveryConfig,
    DnsTarget,
    RouterConfig,
    RouteRule,
    RoutingConfig,
    SequenceConfig,
    StoreConfig,
)
from mesh.auth.config import AuthConfig
from mesh.errors import ConfigError
from mesh.turns import HandoffModeName


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Frozen):
    """Transport limits shared by every service's gRPC server."""

    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` in containers)."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest message received or sent; larger ones get RESOURCE_EXHAUSTED."""
    max_metadata_bytes: int = Field(default=16 * 1024, ge=1024)
    """Largest header block a client may send."""
    max_concurrent_rpcs: int = Field(default=2000, ge=1)
    """Calls in flight per process; beyond this new calls get RESOURCE_EXHAUSTED."""
    max_concurrent_streams: int = Field(default=1000, ge=1)
    """Chat/Handoff streams in flight per process; beyond this new ones get
    RESOURCE_EXHAUSTED at once (never a queue that hangs)."""
    http2_max_streams_per_connection: int = Field(default=4096, ge=1)
    """HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: keep it above ``max_concurrent_streams``, or
    clients queue extra streams in their transport instead of being told."""
    keepalive_time_s: float = Field(default=30.0, gt=0)
    """Ping an idle connection this often."""
    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    """Close a connection whose ping is not answered within this."""
    min_ping_interval_s: float = Field(default=10.0, ge=0)
    """Refuse client pings more frequent than this."""
    grace_period_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long in-flight streams may take to finish."""
    idle_stream_timeout_s: float = Field(default=300.0, gt=0)
    """A Chat stream that carries no request for this long is closed (DEADLINE_EXCEEDED)."""
    reflection: bool = True
    """Serve gRPC server reflection (grpcurl needs it)."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve ``grpc.health.v1`` alone, in plaintext, on this port (0: any free one):
    for the kubelet's gRPC probes, which cannot speak TLS, when the main port does."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics (``/metrics``) and HTTP probes (``/healthz``, ``/readyz``)
    in plaintext HTTP on this port (0: any free one); None: no metrics endpoint."""


class LimitsConfig(_Frozen):
    """Per-agent limits."""

    max_hops: int | None = Field(default=None, ge=0, le=100)
    """Handoffs a turn may take once it reaches this agent (default: the mesh's)."""
    max_tool_rounds: int = Field(default=8, ge=1, le=100)
    """Model calls per turn (each round may call tools)."""
    turn_timeout_s: float = Field(default=300.0, gt=0)
    """A turn that runs longer is cancelled (the caller's deadline still applies)."""
    tool_timeout_s: float = Field(default=30.0, gt=0)
    """A tool call that runs longer becomes an error result."""
    tool_timeouts_s: dict[str, float] = Field(default_factory=dict)
    """Per-tool timeouts (tool name -> seconds), overriding ``tool_timeout_s``."""
    tool_workers: int = Field(default=8, ge=1, le=256)
    """Threads this agent's sync tools may hold at once. A sync tool cannot be
    interrupted: one that timed out keeps its thread until it returns, and a call
    made while all are held is an error result at once, never a queue."""
    consult_timeout_s: float = Field(default=120.0, gt=0)
    """How long to wait for the router to answer a CONSULT."""
    approval_timeout_s: float = Field(default=60.0, gt=0)
    """How long a tool marked ``approval: required`` waits for the person's answer
    (no answer in time is a denial)."""


class HandoffConfig(_Frozen):
    """An agent this one may hand over to, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    target: str
    modes: list[HandoffModeName] = Field(
        default_factory=lambda: list[HandoffModeName](["transfer"]), min_length=1
    )
    """``transfer`` (swarm) and/or ``consult`` (coordinator)."""
    description: str = ""
    """Shown to the model in the tool description."""
    pass_context: list[str] = Field(default_factory=list)
    """Context keys handed to the target; nothing else travels."""
    return_strategy: ReturnStrategyName = Field(default="bubble_up", alias="return")
    """Where control goes after a TRANSFER to this target (``return:`` in the file):
    ``bubble_up`` (the target keeps the conversation), ``return_to_caller`` (back to
    this agent, which finishes the turn), ``continue_chain`` (the target's answer feeds
    the sequence's next step) or ``end_conversation``."""


class SkillConfig(_Frozen):
    name: str
    description: str = ""


class AgentConfig(_Frozen):
    """One agent of the mesh."""

    name: str = Field(default="", pattern=r"^$|" + NAME_RE)
    """Filled in from the key under ``agents:``."""
    description: str
    instructions: str = ""
    """The system prompt."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port when run by ``mesh up`` or ``mesh agent`` (0: any free port)."""
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    tools: list[str] = Field(default_factory=list)
    """Python functions as ``module:function``, importable from the config's folder."""
    handoffs: list[HandoffConfig] = Field(default_factory=list)
    can_end_conversation: bool = False
    """Offer the model an ``end_conversation`` tool."""
    skills: list[SkillConfig] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    required_scopes: list[str] = Field(default_factory=list)
    """With auth on, a caller's token must carry one of these scopes or roles."""
    replicas: int = Field(default=1, ge=1, le=16)
    """Processes ``mesh up`` starts for this agent."""
    mcp_servers: list[McpServerConfig] = Field(default_factory=list)
    """MCP servers whose tools this agent uses (stdio, sse or streamable_http)."""
    tool_policies: dict[str, ToolPolicy] = Field(default_factory=dict)
    """Per tool name (function or MCP): ``{approval: required}`` asks the person first."""
    kind: Literal["model", "reflection"] = "model"
    """``reflection``: every answer is drafted, scored and revised (see ``reflection``)."""
    reflection: ReflectionConfig = Field(default_factory=ReflectionConfig)
    """Settings of a ``kind: reflection`` agent."""
    a2a: A2aRemoteConfig | None = None
    """A remote A2A agent: the router hands off to it over A2A (``mesh up`` starts
    nothing for it)."""

    @field_validator("tools")
    @classmethod
    def _tool_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", ref):
                raise ValueError(f"tool {ref!r} must look like module.path:function")
        return value

    @field_validator("mcp_servers")
    @classmethod
    def _mcp_names(cls, value: list[McpServerConfig]) -> list[McpServerConfig]:
        names = [server.name for server in value]
        if len(set(names)) != len(names):
            raise ValueError("MCP server names must be unique")
        return value


class MeshConfig(BaseSettings):
    """The whole mesh file."""

    model_config = SettingsConfigDict(
        env_prefix="MESH_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    name: str = "mesh"
    max_hops: int = Field(default=10, ge=0, le=100)
    """Handoffs a turn may take, mesh-wide (agents may set lower)."""
    data_dir: Path = Path(".mesh")
    """Where the router's SQLite store and the token service's keys live. Relative paths
    in a mesh file (this one when it is not set: ``.mesh`` beside the file, CA and
    certificate files) are relative to the file's folder; in the environment, to the
    current directory."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    router: RouterConfig = Field(default_factory=RouterConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    a2a: A2aEdgeConfig = Field(default_factory=A2aEdgeConfig)
    """The A2A edge (``mesh a2a``)."""
    source: str = Field(default="", exclude=True)
    """The file this came from (set by :func:`load_config`)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs).
        return (env_settings, init_settings)

    @model_validator(mode="before")
    @classmethod
    def _a2a_audiences(cls, value: object) -> object:
        """A remote A2A agent's ``a2a.audience`` is its audience everywhere."""
        if not isinstance(value, dict) or not isinstance(value.get("agents"), dict):
            return value
        extra = {
            name: body["a2a"]["audience"]
            for name, body in value["agents"].items()
            if isinstance(body, dict)
            and isinstance(body.get("a2a"), dict)
            and body["a2a"].get("audience")
        }
        if not extra:
            return value
        auth = value.get("auth")
        auth = dict(auth) if isinstance(auth, dict) else {}
        audiences = dict(auth.get("audiences") or {})
        for name, audience in extra.items():
            audiences.setdefault(name, audience)
        return {**value, "auth": {**auth, "audiences": audiences}}

    @field_validator("agents", mode="before")
    @classmethod
    def _names_from_keys(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, body in value.items():
            if not isinstance(key, str) or not re.fullmatch(NAME_RE, key):
                raise ValueError(f"agent name {key!r} must match {NAME_RE}")
            if isinstance(body, dict):
                body = {**body, "name": key}
            out[key] = body
        return out

    @model_validator(mode="after")
    def _references(self) -> MeshConfig:
        names = set(self.agents)
        routable = names | set(self.router.sequences)
        for agent in self.agents.values():
            for handoff in agent.handoffs:
                if handoff.target not in names:
                    raise ValueError(
                        f"agents.{agent.name}.handoffs: unknown target {handoff.target!r}"
                    )
                if handoff.target == agent.name:
                    raise ValueError(
                        f"agents.{agent.name}.handoffs: an agent cannot hand to itself"
                    )
        if self.router.routing.strategy == "best_match" and not self.router.default_agent:
            raise ValueError(
                "router.routing: best_match needs router.default_agent to fall back on"
            )
        if self.router.default_agent and self.router.default_agent not in routable:
            raise ValueError(f"router.default_agent: unknown agent {self.router.default_agent!r}")
        for i, route in enumerate(self.router.routes):
            if route.agent not in routable:
                raise ValueError(f"router.routes.{i}.agent: unknown agent {route.agent!r}")
        for seq_name, seq in self.router.sequences.items():
            if seq_name in names:
                raise ValueError(f"router.sequences.{seq_name}: clashes with an agent's name")
            for step in seq.steps:
                if step not in names:
                    raise ValueError(f"router.sequences.{seq_name}.steps: unknown agent {step!r}")
        return self

    def agent(self, name: str) -> AgentConfig:
        """The named agent, or a ConfigError listing the known ones."""
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(f"unknown agent {name!r}{where} (known: {known})") from None

    def max_hops_for(self, agent: str) -> int:
        own = self.agents[agent].limits.max_hops if agent in self.agents else None
        return self.max_hops if own is None else min(own, self.max_hops)

    @property
    def base_dir(self) -> Path:
        """The folder of the config file (tool modules are imported from here)."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()


__all__ = [
    "DEFAULT_CONFIG",
    "ENV_CONFIG",
    "NAME_RE",
    "A2aEdgeConfig",
    "A2aRemoteConfig",
    "AgentConfig",
    "ConfigError",
    "DiscoveryConfig",
    "DnsTarget",
    "HandoffConfig",
    "LimitsConfig",
    "McpHttpConfig",
    "McpServerConfig",
    "McpStdioConfig",
    "MeshConfig",
    "ProviderConfig",
    "ReflectionConfig",
    "RouteRule",
    "RouterConfig",
    "RoutingConfig",
    "SequenceConfig",
    "ServerSettings",
    "StoreConfig",
    "ToolPolicy",
    "config_from_dict",
    "load_config",
    "resolve_config_path",
]
