"""The committed mesh/v1 package matches protos/; a changed .proto is noticed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from .meshtest import REPO


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    assert _gen().stale_files() == []


def test_changed_proto_is_noticed(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    types = protos / "mesh" / "v1" / "types.proto"
    types.write_text(
        types.read_text().replace(
            "string reason = 1;\n}", "string reason = 1;\n  string note = 2;\n}"
        )
    )
    stale = _gen().stale_files(proto_root=protos)
    assert "mesh/v1/types_pb2.py" in stale
    assert "mesh/v1/types_pb2.pyi" in stale


def test_generated_imports_need_no_rewriting() -> None:
    source = (REPO / "mesh" / "v1" / "agent_pb2_grpc.py").read_text()
    assert "from mesh.v1 import agent_pb2" in source


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    buf = subprocess.run(
        [str(REPO / "scripts" / "ensure-buf.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.strip()
    return subprocess.run(
        [buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_buf_lint_passes_on_the_contract() -> None:
    result = _buf("lint", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_fails_on_a_badly_named_field(tmp_path: Path) -> None:
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    types = tmp_path / "protos" / "mesh" / "v1" / "types.proto"
    types.write_text(types.read_text().replace("string turn_id = 6;", "string turnId = 6;"))
    result = _buf("lint", cwd=tmp_path)
    assert result.returncode != 0
    assert "turnId" in result.stdout and "lower_snake_case" in result.stdout


def _release_repo(tmp_path: Path) -> Path:
    """A scratch git repo holding the contract, tagged ``v0.0.1`` as a release."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "protos", repo / "protos")
    shutil.copy(REPO / "buf.yaml", repo / "buf.yaml")
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "buf.yaml", "protos"],
        ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "r"],
        ["tag", "v0.0.1"],
    ):
        subprocess.run(["git", *args], cwd=repo, env={**os.environ, **env}, check=True, timeout=60)
    return repo


def _buf_breaking(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / "buf-breaking.sh")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_buf_breaking_fails_on_a_renamed_or_renumbered_field(tmp_path: Path) -> None:
    repo = _release_repo(tmp_path)
    assert _buf_breaking(repo).returncode == 0
    types = repo / "protos" / "mesh" / "v1" / "types.proto"
    original = types.read_text()
    assert "string turn_id = 6;" in original
    types.write_text(original.replace("string turn_id = 6;", "string turn_ref = 6;"))
    renamed = _buf_breaking(repo)
    assert renamed.returncode != 0
    assert "against v0.0.1" in renamed.stdout
    assert 'changed name from "turn_id" to "turn_ref"' in renamed.stdout, renamed.stdout
    types.write_text(original.replace("string turn_id = 6;", "string turn_id = 16;"))
    renumbered = _buf_breaking(repo)
    assert renumbered.returncode != 0
    assert '"6" with name "turn_id"' in renumbered.stdout, renumbered.stdout


def test_buf_breaking_passes_a_new_field_and_skips_before_a_release(tmp_path: Path) -> None:
    repo = _release_repo(tmp_path)
    types = repo / "protos" / "mesh" / "v1" / "types.proto"
    types.write_text(
        types.read_text().replace(
            "string turn_id = 6;", "string turn_id = 6;\n  // A new field.\n  string note = 99;"
        )
    )
    added = _buf_breaking(repo)
    assert added.returncode == 0, added.stdout + added.stderr
    assert "against v0.0.1" in added.stdout
    subprocess.run(["git", "tag", "-d", "v0.0.1"], cwd=repo, check=True, capture_output=True)
    skipped = _buf_breaking(repo)
    assert skipped.returncode == 0
    assert skipped.stdout.strip() == "buf breaking: skipped, no release tag (v*) yet"
