"""Maps a provider ``kind`` from the config to the module that implements it.

Modules are imported only when their kind is used, so an agent on the offline
model never imports an SDK it does not need.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from mesh.errors import ConfigError
from mesh.providers.base import Provider, ProviderContext, ProviderSpec

#: kind -> module that defines ``SPECS: list[ProviderSpec]`` holding that kind.
BUILTIN: dict[str, str] = {
    "offline": "mesh.providers.offline",
    "anthropic": "mesh.providers.anthropic",
    "openai": "mesh.providers.openai",
    "azure_openai": "mesh.providers.openai",
    "openai_compatible": "mesh.providers.openai",
    "ollama": "mesh.providers.ollama",
    "claude_cli": "mesh.providers.claude_cli",
    "llama_cpp": "mesh.providers.llama_cpp",
    "gemini": "mesh.providers.gemini",
}


def spec_for(kind: str) -> ProviderSpec:
    module_name = BUILTIN.get(kind)
    if module_name is None:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(f"unknown provider kind {kind!r} (known: {known})")
    module = importlib.import_module(module_name)
    for spec in getattr(module, "SPECS", ()):
        if isinstance(spec, ProviderSpec) and spec.kind == kind:
            return spec
    raise ConfigError(f"provider module {module_name} does not define kind {kind!r}")


def validate_options(kind: str, options: Mapping[str, Any]) -> BaseModel:
    """Validate a provider block's options; the error names the offending key."""
    spec = spec_for(kind)
    try:
        return spec.options.model_validate(dict(options))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(options)"
        raise ValueError(f"{loc}: {first['msg'].removeprefix('Value error, ')}") from None


def create_provider(
    kind: str,
    model: str,
    options: Mapping[str, Any],
    context: ProviderContext | None = None,
    *,
    agent: str = "",
) -> Provider:
    """Build the provider an agent's config names."""
    spec = spec_for(kind)
    validated = spec.options.model_validate(dict(options))
    ctx = context or ProviderContext(agent=agent, environ=dict(os.environ))
    return spec.factory(model, validated, ctx)
