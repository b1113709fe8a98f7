"""A real local model, in-process: llama.cpp through ``llama-cpp-python``.

No network, no key: the GGUF file is read from disk (SmolLM2-135M-Instruct by
default, fetched by ``scripts/fetch_smollm2.py`` into ``.models/``). The
package is the optional extra ``llama`` and is imported only when this kind is
used. Generation runs in a worker thread and streams tokens through a queue; a
cancel, ``aclose`` or the deadline sets a flag the thread checks between tokens,
so it stops within one token. Calls on one model are serialized (a llama.cpp
context is not thread-safe); loaded models are shared within the process.

Tools are described in the system prompt in the Hermes format and the model's
``<tool_call>`` blocks become :class:`ToolCall` events (a 135M model rarely
uses them well; larger GGUF instruct models do). Usage counts are approximate
(streamed tokens, and the context size for the prompt). Example::

    provider:
      kind: llama_cpp
      model: smollm2-135m-instruct
      # model_path: .models/SmolLM2-135M-Instruct.Q4_1.gguf  (or $MESH_LLAMA_MODEL)
      max_tokens: 256
      temperature: 0.2

To run the whole mesh on it, offline: install the extra (``CMAKE_ARGS="-DGGML_NATIVE=OFF"
uv pip install --no-cache "llama-cpp-python[server]"``), fetch the model (``uv run python
scripts/fetch_smollm2.py``), switch an agent's ``provider:`` block in
``services/mesh.yaml`` to the block above, and ``uv run mesh up``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import ConfigError, ContextTooLong, ProviderError, ProviderUnavailable
from mesh.providers._common import (
    ToolCallExtractor,
    normalize_stop,
    short,
    system_with_tools,
    text_messages,
)
from mesh.providers.base import (
    ModelEvent,
    ModelRequest,
    Provider,
    ProviderContext,
    ProviderSpec,
    Stop,
    TextDelta,
    ToolCall,
    UsageReport,
)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = ".models"
INSTALL_HINT = 'uv sync --extra llama (build with CMAKE_ARGS="-DGGML_NATIVE=OFF")'
FETCH_HINT = "uv run python scripts/fetch_smollm2.py"


class LlamaCppOptions(BaseModel):
    """Settings of the ``llama_cpp`` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str | None = None
    """GGUF file; overrides ``model_path_env``.
    Default: ``.models/SmolLM2-135M-Instruct.Q4_1.gguf`` (in the working directory or the repo)."""
    model_path_env: str | None = "MESH_LLAMA_MODEL"
    """Environment variable that may hold the GGUF file's path (used when set)."""
    n_ctx: int = Field(default=4096, ge=256)
    """Context window in tokens."""
    n_threads: int | None = Field(default=None, ge=1)
    """CPU threads for generation; llama.cpp's default when unset."""
    n_gpu_layers: int = Field(default=0, ge=-1)
    """Layers offloaded to a GPU (needs a GPU build); 0 runs on the CPU."""
    chat_format: str | None = None
    """A llama-cpp-python chat format (e.g. ``chatml``); unset: the GGUF's own template."""
    max_tokens: int = Field(default=512, ge=1)
    """Most tokens to generate per call (a request's own limit wins)."""
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    """Sampling temperature."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling threshold."""
    seed: int | None = None
    """Sampling seed, for repeatable answers."""
    stop: list[str] = Field(default_factory=list)
    """Sequences that end generation."""
    timeout_s: float = Field(default=300.0, gt=0.0)
    """Deadline of one call, loading the model included."""


@dataclass
class _Loaded:
    llm: Any
    lock: threading.Lock


_MODELS: dict[tuple[str, int, int | None, int, str | None], _Loaded] = {}
_MODELS_LOCK = threading.Lock()


@atexit.register
def _close_models() -> None:
    """Free the models while the interpreter is whole (llama's __del__ fails at teardown)."""
    with _MODELS_LOCK:
        for loaded in _MODELS.values():
            with contextlib.suppress(Exception):
                loaded.llm.close()
        _MODELS.clear()


def resolve_model_path(options: LlamaCppOptions, environ: dict[str, str]) -> Path:
    """The GGUF file to load, or a :class:`ConfigError` saying how to get one."""
    if options.model_path:
        candidates = [Path(options.model_path)]
    elif options.model_path_env and environ.get(options.model_path_env):
        candidates = [Path(environ[options.model_path_env])]
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates = [
            Path(DEFAULT_MODEL_DIR) / DEFAULT_MODEL_FILE,
            repo / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE,
        ]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    env_name = options.model_path_env or "MESH_LLAMA_MODEL"
    raise ConfigError(
        f"llama_cpp provider: model file {candidates[0]} not found "
        f"(run `{FETCH_HINT}`, or set model_path or ${env_name})"
    )


def llama_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppProvider:
    """Generates with llama.cpp in a worker thread; see the module docstring."""

    kind = "llama_cpp"

    def __init__(self, model: str, options: LlamaCppOptions, context: ProviderContext) -> None:
        if not llama_installed():
            raise ConfigError(
                f"llama_cpp provider: llama-cpp-python is not installed; run `{INSTALL_HINT}`"
            )
        self.model = model
        self.options = options
        self.model_path = resolve_model_path(options, dict(context.environ))

    def __repr__(self) -> str:
        return f"LlamaCppProvider(model={self.model!r}, path={str(self.model_path)!r})"

    def _load(self) -> _Loaded:
        """Load (or reuse) the model; runs in a worker thread."""
        opts = self.options
        key = (
            str(self.model_path),
            opts.n_ctx,
            opts.n_threads,
            opts.n_gpu_layers,
            opts.chat_format,
        )
        with _MODELS_LOCK:
            loaded = _MODELS.get(key)
            if loaded is None:
                from llama_cpp import Llama

                llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=opts.n_ctx,
                    n_threads=opts.n_threads,
                    n_gpu_layers=opts.n_gpu_layers,
                    chat_format=opts.chat_format,
                    verbose=False,
                )
                loaded = _MODELS[key] = _Loaded(llm, threading.Lock())
            return loaded

    def _messages(self, request: ModelRequest) -> list[dict[str, str]]:
        system = system_with_tools(request.system, request.tools)
        out = [{"role": "system", "content": system}] if system else []
        pairs = text_messages(request.messages)
        out.extend({"role": role, "content": text} for role, text in pairs)
        return out

    def _generate(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        put: Callable[[tuple[str, Any]], None],
        cancel: threading.Event,
    ) -> None:
        """Run one completion on a worker thread, putting ("text", str) items, then one
        ("end", (finish, prompt_tokens, produced)) or ("error", exception)."""
        opts = self.options
        try:
            loaded = self._load()
            with loaded.lock:
                if cancel.is_set():
                    put(("end", (None, 0, 0)))
                    return
                chunks: Iterator[Any] = loaded.llm.create_chat_completion(
                    messages=messages,
                    stream=True,
                    max_tokens=max_tokens,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    seed=opts.seed,
                    stop=list(opts.stop) or None,
                )
                produced = 0
                finish: str | None = None
                try:
                    for chunk in chunks:
                        if cancel.is_set():
                            break
                        choice = chunk["choices"][0]
                        text = choice.get("delta", {}).get("content")
                        if text:
                            produced += 1
                            put(("text", text))
                        finish = choice.get("finish_reason") or finish
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
                prompt_tokens = max(int(loaded.llm.n_tokens) - produced, 0)
                put(("end", (finish, prompt_tokens, produced)))
        except Exception as err:  # noqa: BLE001 - reported to the consumer
            put(("error", err))

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        opts = self.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.timeout_s
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        max_tokens = request.max_tokens or opts.max_tokens
        worker = loop.run_in_executor(
            None, self._generate, self._messages(request), max_tokens, put, cancel
        )
        extractor = ToolCallExtractor("llama_call")
        try:
            while True:
                remaining = deadline - loop.time()
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(remaining, 0.0))
                except TimeoutError:
                    raise ProviderUnavailable(
                        f"llama_cpp: no answer within {opts.timeout_s:g}s"
                    ) from None
                if kind == "error":
                    raise _generation_error(value)
                text, done = (value, False) if kind == "text" else ("", True)
                shown, calls = extractor.feed(text) if not done else extractor.finish()
                if shown:
                    yield TextDelta(shown)
                for call in calls:
                    yield ToolCall(call)
                if done:
                    finish, prompt_tokens, produced = value
                    yield UsageReport(input_tokens=prompt_tokens, output_tokens=produced)
                    yield Stop(normalize_stop(finish, has_tool_calls=bool(extractor.calls)))
                    return
        finally:
            cancel.set()
            # The thread stops at its next token; wait for it so the model is free again.
            with contextlib.suppress(Exception):
                await asyncio.shield(worker)

    async def aclose(self) -> None:
        return None


def _factory(model: str, options: BaseModel, context: ProviderContext) -> Provider:
    assert isinstance(options, LlamaCppOptions)
    return LlamaCppProvider(model, options, context)


SPECS = [ProviderSpec(kind="llama_cpp", options=LlamaCppOptions, factory=_factory)]


def _generation_error(err: BaseException) -> ProviderError:
    message = short(err)
    if "context window" in message.lower() or "exceed context" in message.lower():
        return ContextTooLong(f"llama_cpp: context too long: {message}")
    return ProviderUnavailable(f"llama_cpp: generation failed: {message}")
