"""The A2A settings of the mesh file: a remote A2A agent (``agents.<name>.a2a``) and the
A2A edge (``a2a:``, ``mesh a2a``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class A2aRemoteConfig(_Frozen):
    """A remote agent reached over the Agent2Agent protocol (no local process)."""

    url: str = Field(pattern=r"^https?://")
    """The agent's base URL (its card is at ``<url>/.well-known/agent-card.json``)."""
    audience: str = ""
    """The audience of the token it takes (default: ``auth.audience_for(name)``); set,
    it becomes ``auth.audiences.<name>``, so every hop exchanges for it."""
    timeout_s: float = Field(default=300.0, gt=0)
    """The longest one turn at the remote agent may take."""


class A2aEdgeConfig(_Frozen):
    """``mesh a2a``: the router's agents served over the Agent2Agent protocol."""

    enabled: bool = False
    """Run the A2A edge inside ``mesh up``."""
    host: str = "127.0.0.1"
    port: int = Field(default=8770, ge=0, le=65535)
    """JSON-RPC (HTTP) port (0: any free port)."""
    public_url: str = ""
    """The base URL clients reach the edge at (default: ``http://host:port``)."""
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve A2A's gRPC binding on this port (0: any free port; None: JSON-RPC only)."""
