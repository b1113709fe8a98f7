"""Start a mesh service for the benchmarks, optionally on uvloop.

``python -m benchmarks.serve [--uvloop] agent a --config FILE --port 0`` runs
``mesh agent a ...`` (any ``mesh`` command line) after installing uvloop's event
loop policy: the mesh's CLI has no uvloop switch, so this is how the benchmarks
measure the services on uvloop without changing them.

``python -m benchmarks.serve sts --config FILE`` runs the embedded token service
(port from the config; 0 picks one) and prints ``sts: URL``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from benchmarks.common import quiet_grpc, use_uvloop


def _sts(config_path: str) -> int:
    from mesh.auth.sts import TokenService
    from mesh.config import load_config

    service = TokenService(load_config(config_path)).start()
    print(f"sts: {service.url}", flush=True)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_grpc()
    uv = bool(args) and args[0] == "--uvloop"
    if uv:
        args = args[1:]
    use_uvloop(uv)
    # The mesh picks uvloop by itself when installed; the asyncio cases must say so.
    os.environ["MESH_EVENT_LOOP"] = "uvloop" if uv else "asyncio"
    if args[:1] == ["sts"]:
        return _sts(args[args.index("--config") + 1])
    from mesh.cli import main as mesh_main

    return mesh_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
