"""Build and run the router's server from the mesh config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from mesh.client import create_channel
from mesh.config import DiscoveryConfig, MeshConfig, RouterConfig
from mesh.interceptors import server_interceptors
from mesh.interceptors import service_credentials as server_credentials
from mesh.lifecycle import Lifecycle
from mesh.router._agents import StreamPool
from mesh.router._core import RoutingCore
from mesh.router._engine import Router
from mesh.router._pool import AgentPool
from mesh.router._port import AgentStreams
from mesh.router._servicer import RouterServicer, add_router_service
from mesh.router._store import ConversationStore, open_store
from mesh.server import MeshServer, Service
from mesh.v1 import router_pb2

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def agent_channel_factory(config: MeshConfig) -> Callable[[str, str, str], grpc.aio.Channel]:
    """Channels to agents: TLS when configured, and no client interceptors (the engine
    writes each call's metadata itself)."""

    def make(address: str, agent: str, server_name: str = "") -> grpc.aio.Channel:
        credentials: grpc.ChannelCredentials | None = None
        if config.auth.enabled:
            from mesh.auth import interceptors as auth

            credentials = auth.channel_credentials(config, "router")
        options: list[tuple[str, str]] = []
        if credentials is not None and server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        return create_channel(
            address,
            settings=config.server,
            credentials=credentials,
            options=options,
            forward_context=False,
        )

    return make


def with_static(config: MeshConfig, static: Mapping[str, Sequence[str]]) -> MeshConfig:
    """A copy of ``config`` whose static discovery also lists ``static``."""
    merged = {k: list(v) for k, v in config.router.discovery.static.items()}
    for agent, addresses in static.items():
        merged.setdefault(agent, []).extend(a for a in addresses if a not in merged[agent])
    discovery = DiscoveryConfig.model_validate(
        {**config.router.discovery.model_dump(), "static": merged}
    )
    router = RouterConfig.model_validate({**config.router.model_dump(), "discovery": discovery})
    return config.model_copy(update={"router": router})


class _HopTokens:
    """The bearer for each hop, narrowed: the user's token exchanged for exactly the next
    agent's audience, with only the scopes that agent declares (intersected with the
    user's) and the turn's remaining hop budget as a claim; the token the handing agent
    held goes along as ``previous`` so the ``act`` chain records it (router > A > ...).
    Entra's OBO carries neither; there the hop path in the audit log records the chain.
    The router's own calls (Info) carry its client-credentials token.
    """

    def __init__(self, config: MeshConfig) -> None:
        from mesh.auth.exchange import hop_tokens

        self.config = config
        self.tokens = hop_tokens(config, "router")
        self.narrowing = config.auth.exchanger != "entra"

    async def for_hop(
        self, agent: str, subject: str | None, previous: str | None, hops_used: int
    ) -> str | None:
        from mesh.auth.policy import hop_scopes, hops_claim_for

        if subject is None:
            return None
        audience = self.config.auth.audience_for(agent)
        if not self.narrowing:
            return await self.tokens.for_hop(subject, audience)
        return await self.tokens.for_hop(
            subject,
            audience,
            scopes=hop_scopes(self.config, agent),
            hops_remaining=hops_claim_for(self.config, agent, hops_used),
            previous=previous,
        )

    async def own(self, agent: str) -> tuple[tuple[str, str], ...]:
        token = await self.tokens.service_token(self.config.auth.audience_for(agent))
        return (("authorization", f"Bearer {token}"),)


class RouterApp:
    """The router's server, pool and store, started and stopped together."""

    def __init__(self, config: MeshConfig, *, store: ConversationStore | None = None) -> None:
        self.config = config
        tokens = _HopTokens(config) if config.auth.enabled else None
        self.pool = AgentPool(
            config,
            agent_channel_factory(config),
            info_metadata=tokens.own if tokens is not None else None,
        )
        self.store = store if store is not None else open_store(config)
        router_config = config.router
        self.streams = StreamPool(
            self.pool,
            keep_s=router_config.keep_agent_streams_s,
            max_idle=router_config.keep_agent_streams_max,
            connect_timeout=router_config.connect_timeout_s,
        )
        core = RoutingCore(config, lambda: self.pool.endpoints)
        port: AgentStreams = self.streams
        self.a2a_agents: Any = None
        if any(agent.a2a is not None for agent in config.agents.values()):
            from mesh.a2a._remote import A2aAgents, MeshStreams  # remote A2A agents

            self.a2a_agents = A2aAgents(config)
            port = MeshStreams(self.streams, self.a2a_agents)
        self.router = Router(
            core,
            port,
            self.store,
            token_for=tokens.for_hop if tokens else None,
            infos=lambda: self.pool.infos,
        )
        self.lifecycle = Lifecycle(config.server.max_concurrent_streams)
        servicer = RouterServicer(config, self.router, self.pool, self.lifecycle)
        self.server = MeshServer(
            config.server,
            [Service(ROUTER_SERVICE, lambda s: add_router_service(servicer, s))],
            interceptors=server_interceptors(config, "router"),
            lifecycle=self.lifecycle,
            label="router",
            server_credentials=server_credentials(config, "router"),
        )

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        await self.pool.start()
        return await self.server.start(
            host or self.config.router.host, self.config.router.port if port is None else port
        )

    async def wait(self) -> None:
        try:
            await self.server.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        if self.a2a_agents is not None:
            await self.a2a_agents.aclose()
        await self.streams.close()
        await self.pool.close()
        await self.store.close()

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.close()
