"""Test-wide settings."""

import os

# grpc's C core logs connection-level INFO lines (GOAWAY on shutdown) to stderr.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
