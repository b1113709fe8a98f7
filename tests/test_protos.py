"""The committed mesh/v1 package matches protos/; a changed .proto is noticed."""

from __future__ import annotations

import importlib.util
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
