"""The probe's contract, ``probe.proto`` (package ``meshtest.v1``).

Compiled with ``grpc_tools.protoc`` when this package is first imported (test
collection) into a fresh temporary directory and imported from there: no generated
code is checked in, so none can go stale. ``pb2`` and ``pb2_grpc`` are the generated
modules (typed ``Any``: mypy never sees generated code).
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

PROTO = Path(__file__).with_name("probe.proto")
SERVICE = "meshtest.v1.ProbeService"


def _compile() -> tuple[ModuleType, ModuleType]:
    out = tempfile.mkdtemp(prefix="meshtest-probe-")
    atexit.register(shutil.rmtree, out, True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    sys.path.insert(0, out)
    try:
        return importlib.import_module("probe_pb2"), importlib.import_module("probe_pb2_grpc")
    finally:
        sys.path.remove(out)


pb2, pb2_grpc = _compile()

__all__ = ["PROTO", "SERVICE", "pb2", "pb2_grpc"]
