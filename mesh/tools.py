"""Function tools: plain typed Python functions the model may call.

The JSON schema of a tool's arguments comes from its type hints (via pydantic);
its description and per-argument descriptions come from its docstring (Google
style ``Args:`` section). Arguments are validated before the call; a tool that
raises, times out or gets bad arguments produces an error *result* the model sees,
never a crash of the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import json
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_type_hints, runtime_checkable

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
    """What a tool call gave the model: its text, and whether it is an error."""

    content: str
    is_error: bool = False


@runtime_checkable
class Tool(Protocol):
    """A tool the model may call: function tools, MCP tools, anything with these."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments."""
        ...

    @property
    def spec(self) -> ToolSpec: ...

    async def run(self, arguments: Mapping[str, Any], *, timeout: float) -> ToolOutcome:
        """Run with validated ``arguments`` within ``timeout`` seconds; failures are
        error outcomes (the executor also turns anything raised into one)."""
        ...


def _failure(name: str, err: BaseException) -> ToolOutcome:
    detail = f": {err}" if str(err) else ""
    return ToolOutcome(f"{name} failed: {type(err).__name__}{detail}", True)


_T = TypeVar("_T")


class ToolPoolFull(Exception):
    """Every worker of the agent's tool executor is held by a running sync tool."""


class ToolExecutor:
    """One agent's bounded worker threads for sync tools, and the guard around every call.

    Threads are daemons started per call and counted while they run, so a hung sync
    tool holds its slot (honestly) until it returns and never blocks the process from
    exiting. A call made while all ``workers`` slots are held fails at once.
    """

    def __init__(self, workers: int, *, label: str = "") -> None:
        self.workers = workers
        self.label = label
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        """Sync tool calls still running (timed-out ones included)."""
        return self._busy

    async def call_sync(self, func: Callable[..., _T], kwargs: Mapping[str, Any]) -> _T:
        """Run ``func(**kwargs)`` on a worker thread; raises :class:`ToolPoolFull`."""
        with self._lock:
            if self._busy >= self.workers:
                raise ToolPoolFull(
                    f"all {self.workers} tool workers{self.label} are held by sync tools that "
                    "are still running (a sync tool cannot be interrupted); try again later"
                )
            self._busy += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        # The caller's contextvars (principal, call context) as asyncio.to_thread gives them.
        context = contextvars.copy_context()

        def deliver(result: _T | None, error: BaseException | None) -> None:
            if future.done():  # the caller gave up (timeout or cancel)
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # result is a _T here

        def work() -> None:
            result: _T | None = None
            error: BaseException | None = None
            try:
                result = context.run(func, **kwargs)
            except BaseException as err:  # noqa: BLE001 - SystemExit too: the caller reports it
                error = err if isinstance(err, Exception) else _Escaped(err)
            finally:
                with self._lock:
                    self._busy -= 1
            # RuntimeError: the loop has closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, result, error)

        threading.Thread(target=work, name=f"tool{self.label}", daemon=True).start()
        return await future

    async def run(self, tool: Tool, arguments: Mapping[str, Any], timeout: float) -> ToolOutcome:
        """Run any tool; whatever it raises (short of this task's cancellation) is an
        error outcome."""
        try:
            if isinstance(tool, FunctionTool):
                return await tool.run(arguments, timeout=timeout, executor=self)
            return await tool.run(arguments, timeout=timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - SystemExit/KeyboardInterrupt included
            return _failure(tool.name, err)


class _Escaped(Exception):
    """A SystemExit/KeyboardInterrupt raised by a tool, carried as an ordinary error so
    that it can never unwind the event loop."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


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

    async def run(
        self,
        arguments: Mapping[str, Any],
        *,
        timeout: float,
        executor: ToolExecutor | None = None,
    ) -> ToolOutcome:
        """Validate and run; every failure becomes an error outcome.

        Cancellation propagates: an async tool is cancelled at once; a sync tool runs
        on a worker thread of ``executor`` (a private one-off executor when None),
        which Python cannot stop, so the turn moves on without it.
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
                    pool = executor or ToolExecutor(1)
                    result = await pool.call_sync(self.func, kwargs)
        except TimeoutError:
            hint = "" if self.is_async else " (a sync tool cannot be interrupted; it runs on)"
            return ToolOutcome(f"{self.name} timed out after {timeout:g}s{hint}", True)
        except ToolPoolFull as err:
            return ToolOutcome(f"{self.name} not run: {err}", True)
        except _Escaped as err:
            return _failure(self.name, err.original)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - SystemExit included: the model's to see
            return _failure(self.name, err)
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
