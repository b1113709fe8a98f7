"""Reading the mesh file: where it is, YAML to :class:`~mesh.config.MeshConfig`, relative
paths resolved against the file's folder, and one clear error naming the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.config import MeshConfig

#: What an agent, sequence or MCP server may be named.
NAME_RE = r"^[a-z][a-z0-9_-]{0,62}$"
DEFAULT_CONFIG = Path("services/mesh.yaml")
ENV_CONFIG = "MESH_CONFIG"


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$MESH_CONFIG``, else ``services/mesh.yaml``."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_CONFIG


def _format_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after[_check_options()]",))


def load_config(path: str | os.PathLike[str] | None = None) -> MeshConfig:
    """Load and validate the mesh file; environment variables override it."""
    file = resolve_config_path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (set --config or {ENV_CONFIG})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{file}{where}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping, not {type(raw).__name__}")
    return config_from_dict(_resolve_paths(raw, file.resolve().parent), source=str(file))


#: File paths a mesh file may hold, as key paths; relative ones are relative to the file.
_PATH_FIELDS = (
    ("data_dir",),
    ("auth", "ca_file"),
    ("auth", "tls", "cert_file"),
    ("auth", "tls", "key_file"),
    ("auth", "tls", "ca_file"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` with its relative file paths made absolute against ``base`` (the mesh
    file's folder), so a mesh file means the same files from any current directory.
    The data dir defaults to ``.mesh`` beside the file. Tool modules are imported
    from :attr:`MeshConfig.base_dir`, the same folder."""
    out = dict(raw)
    out.setdefault("data_dir", ".mesh")
    for keys in _PATH_FIELDS:
        parent: Any = out
        for key in keys[:-1]:
            child = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(child, dict):
                break
            child = dict(child)
            parent[key] = child
            parent = child
        else:
            value = parent.get(keys[-1]) if isinstance(parent, dict) else None
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                parent[keys[-1]] = str(base / value)
            elif isinstance(value, str) and value.startswith("~"):
                parent[keys[-1]] = str(Path(value).expanduser())
    return out


def config_from_dict(raw: dict[str, Any], *, source: str = "<config>") -> MeshConfig:
    from mesh.config import MeshConfig

    try:
        return MeshConfig(**{**raw, "source": source})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(
                str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union"))
            )
            msg = e["msg"].removeprefix("Value error, ")
            line = f"{loc}: {msg}" if loc else msg
            variable = _env_variable(loc)
            lines.append(f"{line} (from ${variable})" if variable else line)
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def _env_variable(loc: str) -> str | None:
    """The ``MESH_*`` variable that set the field at ``loc``, when one did (environment
    variables override the mesh file: a bad value there is not the file's)."""
    if not loc:
        return None
    name = "MESH_" + loc.replace(".", "__").upper()
    return name if name in os.environ else None
