"""``python -m tests.reliability._sts CONFIG``: the embedded token service in its own
process (so that killing it closes its connections, as a real outage does)."""

from __future__ import annotations

import sys
import threading

from mesh.auth.sts import TokenService
from mesh.config import load_config


def main() -> int:
    service = TokenService(load_config(sys.argv[1])).start()
    print(f"sts: {service.url}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
