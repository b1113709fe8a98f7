"""Settings of the ``auth:`` block of ``mesh.yaml``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class AuthConfig(BaseModel):
    """How every service authenticates callers and exchanges tokens for the next hop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Validate a bearer JWT on every call (health is always exempt)."""
