"""The ``mesh`` command.

mesh up                      run every agent of the config (each its own process)
mesh agent NAME              serve one agent
mesh chat MESSAGE            stream a turn to the terminal
mesh info --target HOST:PORT describe an agent
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format

from mesh import loop
from mesh.config import ENV_CONFIG, MeshConfig, load_config
from mesh.errors import ConfigError, MeshError
from mesh.logs import setup_logging

EXIT_USAGE = 2
ENV_TOKEN = "MESH_TOKEN"  # noqa: S105 - the variable's name, not a token


def _config(args: argparse.Namespace) -> MeshConfig:
    return load_config(args.config)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"mesh file (default: ${ENV_CONFIG}, else services/mesh.yaml)",
    )


def _add_user(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user",
        default=os.environ.get("USER") or "dev",
        help="who you are in the locally minted token when auth is on (default: $USER); "
        f"${ENV_TOKEN} overrides it",
    )


# -- mesh agent ---------------------------------------------------------------------------


async def _run_agent(config: MeshConfig, args: argparse.Namespace) -> int:
    from mesh.agent._register import register_forever
    from mesh.agent._serve import build_agent_server

    name = args.name
    server, runtime = build_agent_server(config, name)
    host = args.host or config.server.host
    bound = await server.start(host, config.agent(name).port if args.port is None else args.port)
    server.install_signal_handlers()
    address = f"{host}:{bound}"
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
        await runtime.provider.aclose()
    return 0


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


def cmd_agent(args: argparse.Namespace) -> int:
    config = _config(args)
    config.agent(args.name)  # unknown names fail here, before anything starts
    return loop.run(_run_agent(config, args))


# -- mesh router --------------------------------------------------------------------------


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
    bound = await app.start(host, args.port)
    app.server.install_signal_handlers()
    print(f"router: {host}:{bound}", flush=True)
    if app.server.health_port:
        print(f"health: {host}:{app.server.health_port}", flush=True)
    if app.server.metrics_port:
        print(f"metrics: {host}:{app.server.metrics_port}", flush=True)
    await app.wait()
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    return loop.run(_run_router(_config(args), args))


# -- mesh up ------------------------------------------------------------------------------


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", *argv],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise ConfigError(f"process exited ({proc.wait()}) before printing {prefix!r}")


def _ca_hint(config: MeshConfig) -> str:
    return config.auth.tls.ca_file or str(config.data_dir / "sts" / "tls" / "ca.pem")


def cmd_up(args: argparse.Namespace) -> int:
    config = _config(args)
    config_arg = ["--config", str(Path(config.source).resolve())]
    procs: list[subprocess.Popen[str]] = []
    signalled: set[int] = set()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or _signum != 0
        # The router first, so it stops taking turns while the agents finish theirs.
        for proc in reversed(procs):
            if proc.poll() is None and proc.pid not in signalled:
                signalled.add(proc.pid)
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes: list[int] = []
    try:
        static: list[str] = []
        lines = []
        auth = config.auth
        if auth.enabled and auth.exchanger == "embedded" and not auth.issuer:
            # The token service first: every other service fetches its keys at start.
            sts = _spawn(["sts", *config_arg])
            procs.append(sts)
            lines.append(_wait_line(sts, "sts: "))
        for name, agent in config.agents.items():
            for replica in range(agent.replicas):
                port = agent.port if replica == 0 else 0
                proc = _spawn(["agent", name, *config_arg, "--port", str(port)])
                procs.append(proc)
                line = _wait_line(proc, f"agent {name}: ")
                lines.append(line)
                static += ["--static", f"{name}={line.split(': ', 1)[1]}"]
        router_port = config.router.port if args.router_port is None else args.router_port
        router = _spawn(["router", *config_arg, "--port", str(router_port), *static])
        procs.append(router)
        address = _wait_line(router, "router: ").split(": ", 1)[1]
        for line in lines:
            print(line, flush=True)
        print(f"router: {address}", flush=True)
        print(f"try: mesh chat --router {address} 'I need a refund for INV-1001'", flush=True)
        transport = "-plaintext" if not auth.tls.enabled else f"-cacert {_ca_hint(config)}"
        header = ""
        if auth.enabled:
            print("try: export MESH_TOKEN=$(mesh token --sub alice)", flush=True)
            header = ' -H "authorization: Bearer $MESH_TOKEN"'
        print(f"try: grpcurl {transport}{header} {address} list", flush=True)
        turn = '\'{"turn": {"message": "hello"}}\''
        print(
            f"try: grpcurl {transport}{header} -d {turn} {address} mesh.v1.RouterService/Chat",
            flush=True,
        )
        print("mesh up: running; Ctrl-C stops everything", flush=True)
        while not stopping and all(p.poll() is None for p in procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[-1].wait(timeout=0.5)
    finally:
        stop(0, None)
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=config.server.grace_period_s + 5))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    return 0 if stopping and all(c == 0 for c in codes) else 1


# -- mesh chat / agents / info -----------------------------------------------------------


def _maybe_config(args: argparse.Namespace) -> MeshConfig | None:
    """The config when one is named or the default exists; clients can do without."""
    from mesh.config import resolve_config_path

    if args.config is None and not resolve_config_path(None).exists():
        return None
    return _config(args)


@dataclass
class _Caller:
    """How a command-line client reaches a service: credentials and a bearer token."""

    config: MeshConfig | None
    user: str

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.config is None or not self.config.auth.enabled:
            return None
        from mesh.auth.interceptors import channel_credentials

        return channel_credentials(self.config)

    async def metadata(self, service: str) -> tuple[tuple[str, str], ...]:
        """``authorization`` for ``service`` ("router" or an agent), when auth is on.

        ``$MESH_TOKEN`` wins; otherwise, on a mesh that runs the embedded token
        service, a user token is minted locally (as ``mesh token`` would).
        """
        token = os.environ.get(ENV_TOKEN)
        if not token and self.config is not None and self.config.auth.enabled:
            if self.config.auth.exchanger != "embedded" or self.config.auth.issuer:
                raise ConfigError(
                    f"auth is on: set ${ENV_TOKEN} to a user token for "
                    f"{self.config.auth.audience_for(service)}"
                )
            from mesh.auth.exchange import StsUserTokenSource

            audience = self.config.auth.audience_for(service)
            token = await StsUserTokenSource(self.config, self.user, audience=audience).token()
        return (("authorization", f"Bearer {token}"),) if token else ()


def _caller(args: argparse.Namespace) -> _Caller:
    return _Caller(_maybe_config(args), args.user)


async def _chat(args: argparse.Namespace, caller: _Caller) -> int:
    from mesh.client import AgentClient, create_channel, turn_request
    from mesh.convert import error_code_name, stop_name
    from mesh.v1 import types_pb2

    service = "router" if args.router_api else (args.agent or "router")
    metadata = await caller.metadata(service)
    async with create_channel(args.target, credentials=caller.credentials()) as channel:
        client = AgentClient(channel, router=args.router_api)
        stream = client.open(timeout=args.timeout, metadata=metadata)
        speaker = ""
        try:
            request = turn_request(
                args.message, conversation_id=args.conversation or "", agent=args.agent or ""
            )
            async for event in stream.turn(request):
                if args.json:
                    print(json_format.MessageToJson(event, indent=None), flush=True)
                    continue
                kind = event.WhichOneof("kind")
                if event.agent != speaker and kind in ("delta", "final", "handoff", "tool_call"):
                    if speaker:
                        print()
                    speaker = event.agent
                    print(f"[{speaker}] ", end="", flush=True)
                if kind == "delta":
                    print(event.delta.text, end="", flush=True)
                elif kind == "tool_call":
                    print(f"\n  -> {event.tool_call.name}(...)", flush=True)
                elif kind == "handoff":
                    mode = types_pb2.HandoffMode.Name(event.handoff.mode)
                    mode = mode.removeprefix("HANDOFF_MODE_").lower()
                    print(
                        f"\n  => {event.handoff.target} ({mode}) {event.handoff.reason}", flush=True
                    )
                elif kind == "final":
                    usage = event.final.usage
                    print(flush=True)
                    print(
                        f"-- {event.agent} {stop_name(event.final.stop_reason)}; tokens in "
                        f"{usage.input_tokens} out {usage.output_tokens}; "
                        f"conversation {event.conversation_id}",
                        file=sys.stderr,
                    )
                elif kind == "error":
                    code = error_code_name(event.error.code)
                    print(f"\nerror {code}: {event.error.message}", file=sys.stderr)
                    return 1
        finally:
            await stream.close()
            stream.cancel()
    return 0


def _router_address(args: argparse.Namespace, caller: _Caller) -> str:
    if args.router:
        return str(args.router)
    if caller.config is None:
        raise ConfigError("no config found: give --router HOST:PORT")
    return f"{caller.config.router.host}:{caller.config.router.port}"


def cmd_chat(args: argparse.Namespace) -> int:
    if args.target and args.router:
        print("mesh chat: give --router or --target, not both", file=sys.stderr)
        return EXIT_USAGE
    caller = _caller(args)
    if not args.target:
        args.router_api = True
        args.target = _router_address(args, caller)
    return asyncio.run(_chat(args, caller))


async def _agents(router: str, as_json: bool, caller: _Caller) -> int:
    from mesh.client import create_channel
    from mesh.errors import from_rpc_error
    from mesh.v1 import router_pb2, router_pb2_grpc

    metadata = await caller.metadata("router")
    async with create_channel(router, credentials=caller.credentials()) as channel:
        try:
            listing = await router_pb2_grpc.RouterServiceStub(channel).ListAgents(
                router_pb2.ListAgentsRequest(), timeout=10, metadata=metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
    if as_json:
        print(json_format.MessageToJson(listing, indent=2, preserving_proto_field_name=True))
        return 0
    for entry in listing.agents:
        endpoints = ", ".join(
            f"{e.address} {_health(e.health)} ({_sources(e.sources)}, {e.active_streams} streams)"
            for e in entry.endpoints
        )
        print(f"{entry.info.name:<14} {entry.info.description}")
        print(f"{'':<14} {endpoints}")
    return 0


def _health(value: int) -> str:
    from mesh.v1 import types_pb2

    return types_pb2.EndpointHealth.Name(value).removeprefix("ENDPOINT_HEALTH_")  # type: ignore[arg-type]  # an enum int


def _sources(values: Sequence[int]) -> str:
    from mesh.v1 import types_pb2

    names = (types_pb2.EndpointSource.Name(v) for v in values)  # type: ignore[arg-type]  # enum ints
    return ",".join(n.removeprefix("ENDPOINT_SOURCE_").lower() for n in names)


def cmd_agents(args: argparse.Namespace) -> int:
    caller = _caller(args)
    return asyncio.run(_agents(_router_address(args, caller), args.json, caller))


async def _info(target: str, agent: str | None, caller: _Caller) -> int:
    from mesh.client import AgentClient, create_channel
    from mesh.v1 import agent_pb2, agent_pb2_grpc

    metadata = await caller.metadata(agent or "router")
    async with create_channel(target, credentials=caller.credentials()) as channel:
        if metadata:
            try:
                response = await agent_pb2_grpc.AgentServiceStub(channel).Info(
                    agent_pb2.InfoRequest(), timeout=10, metadata=metadata
                )
                info = response.info
            except grpc.RpcError as err:
                from mesh.errors import from_rpc_error

                raise from_rpc_error(err) from None
        else:
            info = await AgentClient(channel).info()
        print(json_format.MessageToJson(info, indent=2, preserving_proto_field_name=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return asyncio.run(_info(args.target, args.agent, _caller(args)))


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="A mesh of AI agents over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run the router and every agent, each its own process")
    _add_config(p)
    p.add_argument("--router-port", type=int, help="router port (default: router.port; 0 = any)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("router", help="serve the router")
    _add_config(p)
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

    p = sub.add_parser("agents", help="list the agents a router sees")
    _add_config(p)
    _add_user(p)
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=cmd_agents)

    p = sub.add_parser("agent", help="serve one agent")
    p.add_argument("name", help="the agent's name in the config")
    _add_config(p)
    p.add_argument("--host", help="address to bind (default: server.host)")
    p.add_argument("--port", type=int, help="port (default: the agent's port; 0 = any free)")
    p.add_argument("--register", metavar="ROUTER", help="announce this agent to ROUTER (host:port)")
    p.add_argument(
        "--advertise", metavar="HOST:PORT", help="address the router should dial (default: bound)"
    )
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("chat", help="send one message and stream the answer")
    p.add_argument("message", help="what to say")
    _add_user(p)
    _add_config(p)
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--target", help="HOST:PORT of an agent, to talk to it directly")
    p.add_argument("--agent", help="the agent (or sequence) the router should use")
    p.add_argument("--conversation", help="conversation id to continue")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print each event as a JSON line")
    p.set_defaults(func=cmd_chat, router_api=False)

    p = sub.add_parser("info", help="describe an agent")
    p.add_argument("--target", required=True, help="HOST:PORT of an agent")
    p.add_argument("--agent", help="the agent's name (the token's audience when auth is on)")
    _add_config(p)
    _add_user(p)
    p.set_defaults(func=cmd_info)

    from mesh.auth.cli import add_parsers

    add_parsers(sub)

    from mesh.mcp.cli import add_parser as add_mcp_parser

    add_mcp_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"mesh {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MeshError as err:
        print(f"mesh {args.command}: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


__all__ = ["build_parser", "main"]
