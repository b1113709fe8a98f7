"""``mesh agent`` and ``mesh router``: serve one service in this process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from mesh import loop
from mesh.cli._common import (
    CommandError,
    add_config,
    add_no_auth,
    agent_note,
    config_of,
    ensure_port_free,
    is_bind_error,
    port_in_use,
    venv_command,
)
from mesh.config import MeshConfig, ServerSettings
from mesh.errors import ConfigError


def _service_channel_args(
    config: MeshConfig, service: str
) -> tuple[list[grpc.aio.ClientInterceptor], grpc.ChannelCredentials | None]:
    """Interceptors/credentials a service uses to call the router as itself."""
    if not config.auth.enabled:
        return [], None
    from mesh.auth import interceptors as auth

    return (
        auth.service_interceptors(config, config.auth.audience_for("router"), service=service),
        auth.channel_credentials(config),
    )


def require_token_service(config: MeshConfig, who: str) -> None:
    """With auth on a local mesh (the embedded token service as issuer), fail in one
    line when the token service is not running: without it no token can be checked."""
    auth = config.auth
    if not auth.enabled or auth.exchanger != "embedded" or auth.issuer:
        return
    from mesh.auth.runtime import resolve_issuer, sts_dir

    cfg = f" --config {config.source}" if config.source else ""
    start = f"start it first (`{venv_command('mesh')} sts{cfg}`), or run {who} with --no-auth"
    try:
        url = urlsplit(resolve_issuer(config))
    except ConfigError:  # sts.port 0 and no URL written: it has not run
        raise CommandError(
            f"auth is on and the token service is not running (no URL in {sts_dir(config)}): "
            f"{start} (development only)"
        ) from None
    host, port = url.hostname or "127.0.0.1", url.port or 443
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        raise CommandError(
            f"auth is on and the token service ({url.scheme}://{host}:{port}) is not running: "
            f"{start} (development only)"
        ) from None


async def _start(
    server_start: Callable[[str, int], Awaitable[int]],
    what: str,
    host: str,
    port: int,
    settings: ServerSettings,
) -> int:
    """Start a server; a taken port (its own, its health or its metrics port) is one
    line naming that port and what to do."""
    ensure_port_free(what, host, port)
    for name, extra in (("health", settings.health_port), ("metrics", settings.metrics_port)):
        free = f"server.{name}_port 0 picks a free one"
        ensure_port_free(f"{what}'s {name} port (server.{name}_port)", host, extra or 0, free)
    try:
        bound = await server_start(host, port)
    except (RuntimeError, OSError) as err:
        if is_bind_error(err):
            raise port_in_use(what, f"{host}:{port}") from None
        raise
    settle_heap()
    return bound


def settle_heap() -> None:
    """Leave what start-up made (modules, config, clients: ~140,000 objects) out of
    every later garbage collection. A full collection otherwise walks them all each
    time (60-100 ms here, a pause in every stream the process carries)."""
    gc.collect()
    gc.freeze()


async def _run_agent(config: MeshConfig, args: argparse.Namespace) -> int:
    from mesh.agent._register import register_forever
    from mesh.agent._serve import build_agent_server
    from mesh.mcp import close_toolset

    name = args.name
    server, runtime = build_agent_server(config, name)
    host = args.host or config.server.host
    port = config.agent(name).port if args.port is None else args.port
    try:
        bound = await _start(server.start, f"agent {name}", host, port, config.server)
    except BaseException:
        await runtime.provider.aclose()
        raise
    server.install_signal_handlers()
    address = f"{host}:{bound}"
    announced = announce_agent(config, name, address)
    print(f"agent {name}: {address}", flush=True)
    if server.health_port:
        print(f"health: {host}:{server.health_port}", flush=True)
    if server.metrics_port:
        print(f"metrics: {host}:{server.metrics_port}", flush=True)
    registration = None
    if args.register:
        advertise = args.advertise or address
        interceptors, credentials = _service_channel_args(config, name)
        registration = asyncio.ensure_future(
            register_forever(
                args.register,
                name,
                advertise,
                interceptors=interceptors,
                credentials=credentials,
                on_accept=lambda: print(f"registered: {args.register}", flush=True),
            )
        )
    try:
        await server.wait()
    finally:
        if registration is not None:
            registration.cancel()
        announced.unlink(missing_ok=True)
        await close_toolset(runtime)
        await runtime.provider.aclose()
    return 0


def announce_agent(config: MeshConfig, name: str, address: str) -> Path:
    """Note which agent listens on ``address`` (``<data_dir>/run``), so that local
    clients of the same mesh file know whose audience to ask a token for."""
    path = agent_note(config, address)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(name)
    return path


def cmd_agent(args: argparse.Namespace) -> int:
    config = config_of(args)
    config.agent(args.name)  # unknown names fail here, before anything starts
    require_token_service(config, f"`mesh agent {args.name}`")
    return loop.run(_run_agent(config, args))


def _parse_static(items: Sequence[str]) -> dict[str, list[str]]:
    static: dict[str, list[str]] = {}
    for item in items:
        name, sep, address = item.partition("=")
        if not sep or not name or not address:
            raise ConfigError(f"--static takes NAME=HOST:PORT, not {item!r}")
        static.setdefault(name, []).append(address)
    return static


async def _run_router(config: MeshConfig, args: argparse.Namespace) -> int:
    from mesh.router import RouterApp, with_static

    if args.static:
        config = with_static(config, _parse_static(args.static))
    app = RouterApp(config)
    host = args.host or config.router.host
    port = config.router.port if args.port is None else args.port
    bound = await _start(app.start, "the router", host, port, config.server)
    app.server.install_signal_handlers()
    print(f"router: {host}:{bound}", flush=True)
    if app.server.health_port:
        print(f"health: {host}:{app.server.health_port}", flush=True)
    if app.server.metrics_port:
        print(f"metrics: {host}:{app.server.metrics_port}", flush=True)
    await app.wait()
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    return loop.run(_run_router(config_of(args), args))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("router", help="serve the router")
    add_config(p)
    add_no_auth(p)
    p.add_argument("--host", help="address to bind (default: router.host)")
    p.add_argument("--port", type=int, help="port (default: router.port; 0 = any free)")
    p.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="add an agent endpoint to static discovery (repeatable)",
    )
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("agent", help="serve one agent")
    p.add_argument("name", help="the agent's name in the config")
    add_config(p)
    add_no_auth(p)
    p.add_argument("--host", help="address to bind (default: server.host)")
    p.add_argument("--port", type=int, help="port (default: the agent's port; 0 = any free)")
    p.add_argument("--register", metavar="ROUTER", help="announce this agent to ROUTER (host:port)")
    p.add_argument(
        "--advertise", metavar="HOST:PORT", help="address the router should dial (default: bound)"
    )
    p.set_defaults(func=cmd_agent)


__all__ = ["add_parsers", "require_token_service"]
