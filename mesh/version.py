"""The package version, as installed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("grpc-agent-mesh")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+local"
