"""Function tools: plain typed Python functions the model may call.

The JSON schema of a tool's arguments comes from its type hints (via pydantic);
its description and per-argument descriptions come from its docstring (Google
style ``Args:`` section). Arguments are validated before the call; a tool that
raises, times out or gets bad arguments produces an error *result* the model sees,
never a crash of the turn.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from mesh.errors import ConfigError
from mesh.providers.base import ToolSpec

ToolFunc = Callable[..., Any]


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {arg: description})."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"^\s*(Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    summary = parts[0].strip()
    args: dict[str, str] = {}
    if len(parts) == 3:
        current = None
        for line in parts[2].splitlines():
            if re.match(r"^\s*(Returns|Raises|Yields|Examples?):\s*$", line):
                break
            match = re.match(r"^\s*(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if match:
                current = match.group(1)
                args[current] = match.group(3).strip()
            elif current and line.strip():
                args[current] += " " + line.strip()
    summary = " ".join(summary.split("\n\n")[0].split())
    return summary, args


@dataclass(frozen=True)
class ToolOutcome:
    content: str
    is_error: bool = False


class FunctionTool:
    """A Python function exposed to models as a tool."""

    def __init__(self, func: ToolFunc, *, name: str | None = None) -> None:
        self.func = func
        self.name = name or func.__name__
        summary, arg_docs = _parse_docstring(func.__doc__ or "")
        self.description = summary or self.name.replace("_", " ")
        hints = get_type_hints(func)
        fields: dict[str, Any] = {}
        for param in inspect.signature(func).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(f"tool {self.name}: *args/**kwargs are not supported")
            if param.name not in hints:
                raise ConfigError(f"tool {self.name}: argument {param.name!r} needs a type hint")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (
                hints[param.name],
                Field(default, description=arg_docs.get(param.name)),
            )
        self.args_model: type[BaseModel] = create_model(
            f"{self.name}_args",
            __config__=ConfigDict(extra="forbid"),
            **fields,
        )
        schema = self.args_model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        self.parameters: dict[str, Any] = schema
        self.is_async = inspect.iscoroutinefunction(func)

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters)

    async def run(self, arguments: Mapping[str, Any], *, timeout: float) -> ToolOutcome:
        """Validate and run; every failure becomes an error outcome.

        Cancellation propagates: an async tool is cancelled at once; a sync tool runs
        in a worker thread, which Python cannot stop, so the turn moves on without it.
        """
        try:
            parsed = self.args_model.model_validate(dict(arguments))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}"
                for e in err.errors()
            )
            return ToolOutcome(f"invalid arguments for {self.name}: {problems}", True)
        kwargs = {key: getattr(parsed, key) for key in type(parsed).model_fields}
        try:
            async with asyncio.timeout(timeout):
                if self.is_async:
                    result = await self.func(**kwargs)
                else:
                    result = await asyncio.to_thread(self.func, **kwargs)
        except TimeoutError:
            return ToolOutcome(f"{self.name} timed out after {timeout:g}s", True)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a tool's failure is the model's to see
            return ToolOutcome(f"{self.name} failed: {type(err).__name__}: {err}", True)
        return ToolOutcome(_render(result))


def _render(result: Any) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, BaseModel):
        return result.model_dump_json()
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError):
        return str(result)


def tool(func: ToolFunc) -> ToolFunc:
    """Mark a function as a tool (optional; any typed function works)."""
    func.__mesh_tool__ = True  # type: ignore[attr-defined]  # marker attribute on a function
    return func


def load_tool(ref: str, base_dir: Path | None = None) -> FunctionTool:
    """Import ``module.path:function`` (from ``base_dir`` first) as a tool."""
    module_name, _, attr = ref.partition(":")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"tool {ref!r}: cannot import {module_name!r}: {err}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"tool {ref!r}: {module_name} has no function {attr!r}")
    return FunctionTool(func)


def load_tools(refs: Iterable[str], base_dir: Path | None = None) -> dict[str, FunctionTool]:
    tools: dict[str, FunctionTool] = {}
    for ref in refs:
        loaded = load_tool(ref, base_dir)
        if loaded.name in tools:
            raise ConfigError(f"tool name {loaded.name!r} is declared twice")
        tools[loaded.name] = loaded
    return tools


AsyncToolFunc = Callable[..., Awaitable[Any]]
