"""The ``mesh`` command line (``mesh --help``); :func:`main` is the console script."""

from mesh.cli._common import without_auth
from mesh.cli._main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main", "without_auth"]
