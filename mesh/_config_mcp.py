"""The ``mcp_servers`` of an agent in the mesh file: MCP servers it takes tools from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh._config_load import NAME_RE


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class McpStdioConfig(_Frozen):
    """An MCP server the agent starts as a child process and speaks to over stdin/stdout."""

    command: str = Field(min_length=1)
    """The executable (``python`` is this interpreter)."""
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables (merged over a minimal safe environment)."""
    cwd: str | None = None
    """Working directory, relative to the config's folder."""


class McpHttpConfig(_Frozen):
    """An MCP server reached over HTTP (streamable HTTP, or legacy SSE)."""

    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers (no secrets here: use ``headers_env``)."""
    headers_env: dict[str, str] = Field(default_factory=dict)
    """Header name -> environment variable holding its value (an API key)."""


class McpServerConfig(_Frozen):
    """An MCP server whose tools the agent offers its model beside its function tools."""

    name: str = Field(pattern=NAME_RE)
    """Used in logs and as the prefix of its tool names when they clash."""
    stdio: McpStdioConfig | None = None
    sse: McpHttpConfig | None = None
    """Legacy HTTP+SSE transport (client only)."""
    streamable_http: McpHttpConfig | None = None
    audience: str = ""
    """RFC 8707 resource of an HTTP server: each call carries a token for it, exchanged
    on behalf of the user (never the agent's incoming token). Empty: no token sent."""
    tools: list[str] = Field(default_factory=list)
    """Allow-list of the server's tool names (empty: all of them)."""
    cache_tools: bool = True
    """List the tools once per connection (and on ``list_changed``); off: re-list after
    every call."""
    required: bool = False
    """The agent's health is NOT_SERVING while this server is unreachable."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Starting the server / opening the session, and listing its tools."""
    call_timeout_s: float = Field(default=30.0, gt=0)
    """A tool call that runs longer is cancelled (the agent's tool timeout also applies)."""
    restart_backoff_s: float = Field(default=1.0, gt=0)
    """First wait before restarting / reconnecting a server that failed; doubles each time."""
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    max_result_bytes: int = Field(default=256 * 1024, ge=1024)
    """A tool result larger than this is refused with a tool error."""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        given = [t for t in ("stdio", "sse", "streamable_http") if getattr(self, t) is not None]
        if len(given) != 1:
            raise ValueError("an MCP server needs exactly one of stdio, sse, streamable_http")
        if self.audience and self.stdio is not None:
            raise ValueError("audience applies to HTTP servers (stdio takes env)")
        return self

    @property
    def transport(self) -> Literal["stdio", "sse", "streamable_http"]:
        if self.stdio is not None:
            return "stdio"
        return "sse" if self.sse is not None else "streamable_http"
