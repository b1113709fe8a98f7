"""``mesh mcp``: serve the mesh's agents as MCP tools (stdio or streamable HTTP)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mesh.config import ENV_CONFIG, load_config
from mesh.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Add ``mesh mcp`` to the ``mesh`` command's subparsers."""
    p = sub.add_parser(
        "mcp",
        help="serve the mesh's agents as MCP tools (ask_<agent>) over stdio or HTTP",
        description="One MCP tool per routable agent and sequence, answered through the "
        "router with the caller's identity. stdio for desktop/IDE clients; streamable "
        "HTTP (stateless) for remote ones.",
    )
    p.add_argument("--config", metavar="FILE", help=f"mesh file (default: ${ENV_CONFIG})")
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="default: stdio")
    p.add_argument("--host", default="127.0.0.1", help="HTTP and --metrics-port: address to bind")
    p.add_argument("--port", type=int, default=8765, help="HTTP: port (0 = any free)")
    p.add_argument(
        "--user",
        default=os.environ.get("USER") or "dev",
        help="stdio with auth on: who you are in the locally minted token ($MESH_TOKEN wins)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of one ask, seconds")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="also serve Prometheus /metrics (and /healthz, /readyz) in plain HTTP on --host "
        "at this port (0 = any free one, printed as `metrics: HOST:PORT`, on stderr for "
        "stdio); default: none",
    )
    p.set_defaults(func=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    from mesh import loop
    from mesh.cli._common import ensure_port_free
    from mesh.mcp._serve import serve_http, serve_stdio

    config = load_config(args.config)
    router = args.router or f"{config.router.host}:{config.router.port}"
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError("--metrics-port must be 0-65535")
    # A taken port is one line naming it, not a traceback from the bind.
    free = "--metrics-port 0 picks a free one"
    ensure_port_free("mesh mcp's metrics (--metrics-port)", args.host, args.metrics_port or 0, free)
    if args.transport == "stdio":
        loop.run(
            serve_stdio(
                config,
                router,
                user=args.user,
                timeout_s=args.timeout,
                metrics_port=args.metrics_port,
                metrics_host=args.host,
                # stdout carries the MCP messages
                on_metrics=lambda where: print(f"metrics: {where}", file=sys.stderr, flush=True),
            )
        )
    else:
        loop.run(
            serve_http(
                config,
                router,
                host=args.host,
                port=args.port,
                timeout_s=args.timeout,
                on_bound=lambda url: print(f"mcp: {url}", flush=True),
                metrics_port=args.metrics_port,
                on_metrics=lambda where: print(f"metrics: {where}", flush=True),
            )
        )
    return 0
