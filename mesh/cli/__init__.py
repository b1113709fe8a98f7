"""The ``mesh`` command line (``mesh --help``); :func:`main` is the console script."""

import os

# Before grpc is imported: the mesh's processes start others only by fork and exec
# (MCP stdio servers, `mesh up`'s children). grpc's fork handlers serve fork without
# exec, and otherwise print a plain-text "skipping fork() handlers" line at every
# spawn, which breaks JSON log lines.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from mesh.cli._common import without_auth
from mesh.cli._main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main", "without_auth"]
