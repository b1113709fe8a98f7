"""``mesh agents`` (what a router sees) and ``mesh info`` (what an agent says of itself)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from google.protobuf import json_format

from mesh.cli._common import (
    Caller,
    add_config,
    add_no_auth,
    add_user,
    caller_of,
    explained,
    reaching,
    router_address,
)
from mesh.client import create_channel
from mesh.v1 import agent_pb2, agent_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2


async def _agents(router: str, as_json: bool, caller: Caller) -> int:
    metadata = await caller.metadata("router")
    async with create_channel(router, credentials=caller.credentials()) as channel:
        with reaching(router, "the router"):
            listing = await router_pb2_grpc.RouterServiceStub(channel).ListAgents(
                router_pb2.ListAgentsRequest(), timeout=10, metadata=metadata
            )
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


def _health(value: types_pb2.EndpointHealth.ValueType) -> str:
    return types_pb2.EndpointHealth.Name(value).removeprefix("ENDPOINT_HEALTH_")


def _sources(values: Sequence[types_pb2.EndpointSource.ValueType]) -> str:
    names = (types_pb2.EndpointSource.Name(v) for v in values)
    return ",".join(n.removeprefix("ENDPOINT_SOURCE_").lower() for n in names)


def cmd_agents(args: argparse.Namespace) -> int:
    caller = caller_of(args)
    return asyncio.run(_agents(router_address(args, caller), args.json, caller))


async def _info(target: str, agent: str | None, caller: Caller) -> int:
    metadata = await caller.metadata(caller.audience_service(target, agent))
    async with create_channel(target, credentials=caller.credentials()) as channel:
        with reaching(target, "the agent"), explained(target, "the agent"):
            response = await agent_pb2_grpc.AgentServiceStub(channel).Info(
                agent_pb2.InfoRequest(), timeout=10, metadata=metadata
            )
        info = response.info
        print(json_format.MessageToJson(info, indent=2, preserving_proto_field_name=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return asyncio.run(_info(args.target, args.agent, caller_of(args)))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agents", help="list the agents a router sees")
    add_config(p)
    add_user(p)
    add_no_auth(p)
    p.add_argument("--router", help="HOST:PORT of the router (default: from the config)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=cmd_agents)

    p = sub.add_parser("info", help="describe an agent")
    p.add_argument("--target", required=True, help="HOST:PORT of an agent")
    p.add_argument(
        "--agent",
        help="the agent's name (its token's audience when auth is on; default: the agent "
        "of the mesh file on that port)",
    )
    add_config(p)
    add_user(p)
    add_no_auth(p)
    p.set_defaults(func=cmd_info)


__all__ = ["add_parsers"]
