"""Real generation with SmolLM2-135M-Instruct: in-process llama.cpp, and the
openai_compatible provider against a real ``llama_cpp.server``.

Needs the ``llama`` extra (llama-cpp-python); skipped with the install command
when it is missing. The model is fetched on first use by
``scripts/fetch_smollm2.py`` (sha256-checked, idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.providers.base import Provider, ProviderContext, Stop, TextDelta
from mesh.providers.registry import create_provider

from .helpers import ask, collect, stop_of, text_of, usage_of

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / ".models"

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason='llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF" '
        "uv sync --extra llama",
    ),
]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The SmolLM2 GGUF, fetched by the script the Makefile runs (a no-op when present)."""
    script = REPO / "scripts" / "fetch_smollm2.py"
    subprocess.run([sys.executable, str(script), "--dest", str(MODELS)], check=True)
    return MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


def local(model_path: Path, **options: object) -> Provider:
    opts: dict[str, object] = {
        "model_path": str(model_path),
        "temperature": 0.0,
        "seed": 7,
        "n_ctx": 2048,
        "max_tokens": 48,
    }
    opts.update(options)
    return create_provider(
        "llama_cpp", "smollm2-135m-instruct", opts, ProviderContext(agent="local", environ={})
    )


async def test_real_generation_in_process(model_path: Path) -> None:
    p = local(model_path)
    events = await collect(p.stream(ask("What is the capital of France?")))
    text = text_of(events)
    # A 135M model's facts are not the point (nor stable across builds): real text is.
    assert len(text.split()) >= 3, text
    assert len([e for e in events if isinstance(e, TextDelta)]) > 1  # streamed per token
    assert stop_of(events) in ("end_turn", "max_tokens")
    usage = usage_of(events)
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0


async def test_close_stops_generation_between_tokens(model_path: Path) -> None:
    p = local(model_path, max_tokens=1500, temperature=0.8)
    events = p.stream(ask("Write a very long story about a dragon and a knight."))
    assert isinstance(await anext(events), TextDelta)
    started = time.monotonic()
    await events.aclose()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 1.0
    # The model is free again at once: another call runs to completion.
    again = await asyncio.wait_for(collect(local(model_path).stream(ask("Say hi."))), 30)
    assert isinstance(again[-1], Stop)


async def test_cancel_stops_generation(model_path: Path) -> None:
    p = local(model_path, max_tokens=1500, temperature=0.8)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in p.stream(ask("Tell me everything about the history of Rome.")):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert task in done


def test_missing_model_file_names_the_fetch_script() -> None:
    with pytest.raises(ConfigError, match="fetch_smollm2"):
        create_provider(
            "llama_cpp",
            "x",
            {"model_path": "/nonexistent/model.gguf"},
            ProviderContext(agent="a", environ={}),
        )


# ----------------------------------------------------------------- llama_cpp.server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def llama_server(model_path: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"llama_cpp.server exited: {err[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("llama_cpp.server did not start within 60s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
async def compatible(llama_server: str) -> AsyncIterator[Provider]:
    p = create_provider(
        "openai_compatible",
        "smollm2",
        {"base_url": llama_server, "temperature": 0.0, "max_tokens": 48, "timeout_s": 60},
        ProviderContext(agent="a", environ={}),
    )
    yield p
    await p.aclose()


async def test_openai_compatible_against_real_llama_cpp_server(compatible: Provider) -> None:
    events = await collect(compatible.stream(ask("What is the capital of France?")))
    text = text_of(events)
    assert len(text.split()) >= 3, text
    assert len([e for e in events if isinstance(e, TextDelta)]) > 1
    assert stop_of(events) in ("end_turn", "max_tokens")
