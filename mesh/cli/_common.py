"""What every ``mesh`` subcommand shares: config loading, ``--no-auth``, how a
command-line client authenticates, and turning everyday failures into one line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from mesh.config import ENV_CONFIG, MeshConfig, load_config, resolve_config_path
from mesh.errors import ConfigError, MeshError, from_rpc_error

EXIT_USAGE = 2
ENV_TOKEN = "MESH_TOKEN"  # noqa: S105 - the variable's name, not a token
#: What a bearer token may hold (RFC 6750 b64token): nothing a header would break on.
_HEADER_VALUE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class CommandError(Exception):
    """An everyday failure: printed as ``mesh COMMAND: message`` (one line), exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"mesh file (default: ${ENV_CONFIG}, else services/mesh.yaml)",
    )


def add_user(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user",
        default=os.environ.get("USER") or "dev",
        help="who you are in the locally minted token when auth is on (default: $USER); "
        f"${ENV_TOKEN} overrides it",
    )


def add_no_auth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="DEVELOPMENT ONLY: turn auth off (no token is sent or checked)",
    )


def without_auth(config: MeshConfig) -> MeshConfig:
    """``config`` with auth turned off (``--no-auth``)."""
    auth = config.auth.model_copy(update={"enabled": False})
    return config.model_copy(update={"auth": auth})


def config_of(args: argparse.Namespace) -> MeshConfig:
    """The mesh file named by ``--config`` (or the default), with ``--no-auth`` applied."""
    config = load_config(args.config)
    if getattr(args, "no_auth", False):
        print(
            f"mesh {args.command}: --no-auth: development mode, auth is OFF "
            "(no token is checked or sent)",
            file=sys.stderr,
            flush=True,
        )
        config = without_auth(config)
    return config


def maybe_config(args: argparse.Namespace) -> MeshConfig | None:
    """The config when one is named or the default exists; clients can do without."""
    if args.config is None and not resolve_config_path(None).exists():
        return None
    return config_of(args)


_FREE_PORT = "--port 0 picks a free one"


def port_in_use(what: str, address: str, free: str = _FREE_PORT) -> CommandError:
    port = address.rpartition(":")[2]
    return CommandError(
        f"{address} is already in use, so {what} cannot listen there: stop what holds it "
        f"(`ss -ltnp 'sport = :{port}'` shows it; an earlier `mesh up` still running?) "
        f"or choose another port ({free})"
    )


def ensure_port_free(what: str, host: str, port: int, free: str = _FREE_PORT) -> None:
    """Fail in one line when ``host:port`` is taken (before gRPC tries and logs it)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise port_in_use(what, f"{host}:{port}", free) from None
            raise


def is_bind_error(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (OSError, RuntimeError)) and ("bind" in text or "in use" in text)


@contextlib.contextmanager
def reaching(target: str, what: str = "the router") -> Iterator[None]:
    """Turn a failed call to ``target`` into a :class:`MeshError` (one line); a
    service that is not running gets a line saying so and what to do."""
    try:
        yield
    except grpc.RpcError as err:
        raise_for(err, target, what)


@contextlib.contextmanager
def explained(target: str, what: str) -> Iterator[None]:
    """A :class:`MeshError` saying ``target`` cannot be reached becomes a line that
    says what to do."""
    try:
        yield
    except MeshError as err:
        if err.code == grpc.StatusCode.UNAVAILABLE and "connect" in err.message.lower():
            raise _unreachable(target, what) from None
        raise


def _unreachable(target: str, what: str) -> CommandError:
    flag = "--router" if what == "the router" else "--target"
    return CommandError(
        f"cannot reach {what} at {target}: is it running? (start the mesh with `make run`, "
        f"or point at it with {flag} HOST:PORT)"
    )


def raise_for(err: grpc.RpcError, target: str, what: str) -> None:
    """Raise the one-line error for a failed call to ``target``."""
    if (
        isinstance(err, grpc.aio.AioRpcError)
        and err.code() == grpc.StatusCode.UNAVAILABLE
        and "connect" in (err.details() or "").lower()
    ):
        raise _unreachable(target, what) from None
    raise from_rpc_error(err) from None


def _port_of(target: str) -> int | None:
    try:
        return int(target.rpartition(":")[2])
    except ValueError:
        return None


def agent_note(config: MeshConfig, address: str) -> Path:
    """Where ``mesh agent`` notes its name while it listens on ``address``."""
    return Path(config.data_dir) / "run" / ("agent-" + address.replace(":", "-"))


def agent_at(config: MeshConfig | None, target: str) -> str | None:
    """The agent listening on ``target``: the one that noted it in the data dir (a
    ``mesh agent`` of this mesh file), else the mesh file's agent on that port."""
    if config is None:
        return None
    try:
        name = agent_note(config, target).read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name in config.agents:
        return name
    port = _port_of(target)
    names = [n for n, a in config.agents.items() if port and a.port == port]
    return names[0] if len(names) == 1 else None


@dataclass
class Caller:
    """How a command-line client reaches a service: credentials and a bearer token."""

    config: MeshConfig | None
    user: str

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.config is None or not self.config.auth.enabled:
            return None
        from mesh.auth.interceptors import channel_credentials

        return channel_credentials(self.config)

    @property
    def auth_on(self) -> bool:
        return self.config is not None and self.config.auth.enabled

    async def metadata(self, service: str) -> tuple[tuple[str, str], ...]:
        """``authorization`` for ``service`` ("router" or an agent), when auth is on.

        ``$MESH_TOKEN`` wins; otherwise, on a mesh that runs the embedded token
        service, a user token is minted locally (as ``mesh token`` would).
        """
        token = (os.environ.get(ENV_TOKEN) or "").strip()
        if token and not _HEADER_VALUE.fullmatch(token):
            raise CommandError(
                f"${ENV_TOKEN} holds characters a header cannot carry (a line break, a "
                "space, a quote?): set it to the token alone, as `mesh token` prints it",
                EXIT_USAGE,
            )
        if not token and self.config is not None and self.config.auth.enabled:
            if self.config.auth.exchanger != "embedded" or self.config.auth.issuer:
                raise ConfigError(
                    f"auth is on: set ${ENV_TOKEN} to a user token for "
                    f"{self.config.auth.audience_for(service)}"
                )
            from mesh.auth.exchange import StsUserTokenSource

            audience = self.config.auth.audience_for(service)
            try:
                token = await StsUserTokenSource(self.config, self.user, audience=audience).token()
            except FileNotFoundError:
                raise CommandError(
                    f"auth is on and the token service has no keys in {self.config.data_dir}: "
                    "start it (`.venv/bin/mesh sts`, or `make run`), or use --no-auth"
                ) from None
        return (("authorization", f"Bearer {token}"),) if token else ()

    def audience_service(self, target: str | None, agent: str | None) -> str:
        """Which service a token is for: the router, or the agent at ``--target``
        (``--agent``, else the mesh file's agent on that port)."""
        if not target:
            return "router"
        if agent:
            return agent
        found = agent_at(self.config, target)
        if found is None and self.auth_on:
            raise CommandError(
                f"auth is on and no agent of the mesh file listens on {target}'s port: "
                "name it with --agent NAME (its token's audience)",
                EXIT_USAGE,
            )
        return found or "router"


def caller_of(args: argparse.Namespace) -> Caller:
    return Caller(maybe_config(args), args.user)


def router_address(args: argparse.Namespace, caller: Caller) -> str:
    if getattr(args, "router", None):
        return str(args.router)
    if caller.config is None:
        raise ConfigError("no config found: give --router HOST:PORT (or --config FILE)")
    return f"{caller.config.router.host}:{caller.config.router.port}"


def venv_command(name: str) -> str:
    """How to run ``name`` from the project's venv, as a user can type it from here:
    ``.venv/bin/NAME`` relative to the current directory when inside it, else absolute."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel)


__all__ = [
    "EXIT_USAGE",
    "Caller",
    "CommandError",
    "MeshError",
]
