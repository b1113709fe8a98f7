"""An agent's (or the routing model's) ``provider:`` block."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from mesh.errors import ConfigError


class ProviderConfig(BaseModel):
    """``kind`` and ``model``; every other key is the provider's own option."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "offline"
    model: str = "offline-1"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_options(self) -> ProviderConfig:
        from mesh.providers.registry import validate_options

        try:
            validate_options(self.kind, self.options)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self
