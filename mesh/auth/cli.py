"""``mesh sts`` and ``mesh token``: the embedded token service and a user token for grpcurl.

``mesh/cli.py`` calls :func:`add_parsers`; each subcommand sets ``func`` to a
function taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from types import FrameType

from mesh.errors import ConfigError


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sts`` and ``token`` subcommands."""
    sts = subparsers.add_parser(
        "sts",
        help="run the embedded token service (OIDC discovery, JWKS, token endpoint)",
        description="Serve the embedded OAuth2/OIDC token service over HTTPS with a dev CA "
        "kept in the data dir. Prints 'sts: https://HOST:PORT' once listening.",
    )
    sts.add_argument(
        "--config", metavar="FILE", help="mesh file (default: $MESH_CONFIG or services/mesh.yaml)"
    )
    sts.add_argument("--host", help="address to bind (default: auth.sts.host, loopback)")
    sts.add_argument("--port", type=int, help="port to bind (0: any free port)")
    sts.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the signing key on disk and exit (a running STS picks it up)",
    )
    sts.set_defaults(func=run_sts)

    token = subparsers.add_parser(
        "token",
        help="print a user token for the router (for grpcurl -H 'authorization: Bearer ...')",
        description="Mint a user token with the embedded token service's signing key and "
        "print only the token on stdout.",
    )
    token.add_argument("--config", metavar="FILE", help="mesh file")
    token.add_argument("--sub", required=True, help="the user (sub claim)")
    token.add_argument(
        "--scope",
        action="append",
        default=None,
        metavar="SCOPE",
        help="scope to grant (repeatable; default: auth.sts.default_scopes)",
    )
    token.add_argument(
        "--ttl",
        type=int,
        default=None,
        metavar="SECONDS",
        help="lifetime in seconds (default: auth.sts.token_ttl_s)",
    )
    token.add_argument("--audience", help="audience (default: the router's)")
    token.add_argument("--mfa", action="store_true", help="mark the sign-in as multi-factor")
    token.set_defaults(func=run_token)


def run_sts(args: argparse.Namespace) -> int:
    """``mesh sts``: serve until SIGINT/SIGTERM (or rotate keys with ``--rotate``)."""
    from mesh.auth.sts import TokenService, rotate_keys
    from mesh.config import MeshConfig, load_config

    try:
        config: MeshConfig = load_config(args.config)
        if args.rotate:
            kid = rotate_keys(config)
            print(f"sts: new signing key {kid}", flush=True)
            return 0
        service = TokenService(config, host=args.host, port=args.port).start()
    except ConfigError as err:
        print(f"mesh sts: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        message = str(err)
        if err.errno == errno.EADDRINUSE:
            from mesh.cli._common import port_in_use

            host = args.host or config.auth.sts.host
            port = config.auth.sts.port if args.port is None else args.port
            message = str(port_in_use("the token service", f"{host}:{port}"))
        print(f"mesh sts: {message}", file=sys.stderr)
        return 2
    print(f"sts: {service.url}", flush=True)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


def run_token(args: argparse.Namespace) -> int:
    """``mesh token``: print only a user token on stdout."""
    from mesh.auth.sts import mint_user_token
    from mesh.config import MeshConfig, load_config

    if args.ttl is not None and not 1 <= args.ttl <= 86400:
        print("mesh token: --ttl must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    try:
        config: MeshConfig = load_config(args.config)
        token = mint_user_token(
            config,
            args.sub,
            args.scope,
            args.ttl,
            audience=args.audience,
            amr=["pwd", "mfa"] if args.mfa else None,
        )
    except (ConfigError, OSError, ValueError) as err:
        print(f"mesh token: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0
