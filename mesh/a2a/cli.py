"""``mesh a2a``: serve the router's agents over the Agent2Agent protocol (JSON-RPC)."""

from __future__ import annotations

import argparse
from typing import Any

from mesh.config import ENV_CONFIG, load_config
from mesh.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Add ``mesh a2a`` to the ``mesh`` command's subparsers."""
    p = sub.add_parser(
        "a2a",
        help="serve the mesh's agents over A2A (an agent card per agent and sequence)",
        description="Every routable agent and sequence as an A2A agent at /agents/<name> "
        "(card at /agents/<name>/.well-known/agent-card.json), and the mesh itself at /, "
        "answered through the router with the caller's identity.",
    )
    p.add_argument("--config", metavar="FILE", help=f"mesh file (default: ${ENV_CONFIG})")
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--host", help="address to bind (default: a2a.host)")
    p.add_argument("--port", type=int, help="port, 0 = any free (default: a2a.port)")
    p.add_argument(
        "--grpc-port",
        type=int,
        help="also serve A2A over gRPC here, 0 = any (default: a2a.grpc_port)",
    )
    p.add_argument("--public-url", help="base URL the cards advertise (default: a2a.public_url)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of one task, seconds")
    p.set_defaults(func=cmd_a2a)


def cmd_a2a(args: argparse.Namespace) -> int:
    from mesh import loop
    from mesh.a2a._edge import serve_edge

    config = load_config(args.config)
    router = args.router or f"{config.router.host}:{config.router.port}"
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    edge = config.a2a
    loop.run(
        serve_edge(
            config,
            router,
            host=args.host or edge.host,
            port=edge.port if args.port is None else args.port,
            timeout_s=args.timeout,
            public_url=args.public_url or edge.public_url,
            grpc_port=edge.grpc_port if args.grpc_port is None else args.grpc_port,
            on_bound=lambda url: print(
                f"a2a-grpc: {url[7:]}" if url.startswith("grpc://") else f"a2a: {url}", flush=True
            ),
        )
    )
    return 0
