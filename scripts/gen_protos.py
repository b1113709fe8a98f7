"""Generate the ``mesh.v1`` Python package from ``protos/mesh/v1/*.proto``.

The proto package ``mesh.v1`` maps onto the Python package ``mesh.v1`` with no
import rewriting: protoc runs with ``protos/`` as the include root and the repo
root as the output root. Messages get ``.pyi`` stubs and the service stubs get
typed ``_grpc.pyi`` stubs, both from mypy-protobuf.

Usage: ``python scripts/gen_protos.py [--out DIR]`` (``make protos``).
``tests/test_protos.py`` runs this into a temporary directory and fails when the
committed code differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("mesh") / "v1"
INIT = '"""Generated from protos/mesh/v1 by `make protos`; do not edit."""\n'


def _plugin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable}: run `uv sync`")
    return found


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the package under ``out`` from ``proto_root``; return the files written."""
    target = out / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*_pb2*"):
        old.unlink()
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / PACKAGE).glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (target / "__init__.py").write_text(INIT)
    (target / "py.typed").write_text("")
    return sorted(p for p in target.iterdir() if p.is_file())


def stale_files(proto_root: Path = PROTO_ROOT, committed_root: Path = ROOT) -> list[str]:
    """Generated files that differ from (or are missing in) ``committed_root``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = committed_root / rel
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(str(rel))
        names = {p.name for p in fresh}
        extra = [
            str(p.relative_to(committed_root))
            for p in (committed_root / PACKAGE).glob("*_pb2*")
            if p.name not in names
        ]
    return sorted(stale + extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if the committed code is stale"
    )
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            raise SystemExit("stale generated code (run `make protos`): " + ", ".join(stale))
        print("mesh/v1 is up to date")
        return
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
