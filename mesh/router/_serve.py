"""Build and run the router's server from the mesh config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import grpc

from mesh.agent._serve import server_credentials, server_interceptors
from mesh.client import create_channel
from mesh.config import DiscoveryConfig, MeshConfig, RouterConfig
from mesh.context import current_token
from mesh.router._engine import Delegate, Router
from mesh.router._pool import AgentPool
from mesh.router._servicer import RouterServicer
from mesh.router._store import ConversationStore, open_store
from mesh.server import Lifecycle, MeshServer, Service
from mesh.v1 import router_pb2, router_pb2_grpc

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


def agent_channel_factory(config: MeshConfig) -> Callable[[str, str, str], grpc.aio.Channel]:
    """Channels to agents, with the token-exchange interceptors when auth is on."""

    def make(address: str, agent: str, server_name: str = "") -> grpc.aio.Channel:
        interceptors: list[grpc.aio.ClientInterceptor] = []
        credentials: grpc.ChannelCredentials | None = None
        if config.auth.enabled:
            from mesh.auth import interceptors as auth

            # The user's token, exchanged for this agent, on calls made for a turn; the
            # router's own client-credentials token on its own calls (Info).
            audience = config.auth.audience_for(agent)
            interceptors.extend(auth.service_interceptors(config, audience, service="router"))
            credentials = auth.channel_credentials(config)
        options: list[tuple[str, str]] = []
        if credentials is not None and server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        return create_channel(
            address,
            settings=config.server,
            interceptors=interceptors,
            credentials=credentials,
            options=options,
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


def delegation(config: MeshConfig) -> Delegate | None:
    """How the router gets the token an agent held, for handoffs from that agent.

    With the embedded STS or RFC 8693 the router re-exchanges that token, so the next
    agent's token nests ``act`` through the agent that handed over. Entra's OBO cannot
    take a token issued to another app; there the hop path in the audit log records it.
    """
    if not config.auth.enabled or config.auth.exchanger == "entra":
        return None
    from mesh.auth.exchange import exchanger_for

    exchanger = exchanger_for(config, "router")

    async def held_by(agent: str) -> str | None:
        token = current_token.get()
        if token is None:
            return None
        return await exchanger.token_for(token, config.auth.audience_for(agent))

    return held_by


class RouterApp:
    """The router's server, pool and store, started and stopped together."""

    def __init__(self, config: MeshConfig, *, store: ConversationStore | None = None) -> None:
        self.config = config
        self.pool = AgentPool(config, agent_channel_factory(config))
        self.store = store or open_store(config)
        self.router = Router(config, self.pool, self.store, delegate=delegation(config))
        self.lifecycle = Lifecycle(config.server.max_concurrent_streams)
        servicer = RouterServicer(config, self.router, self.pool, self.lifecycle)
        self.server = MeshServer(
            config.server,
            [
                Service(
                    ROUTER_SERVICE,
                    lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
                )
            ],
            interceptors=server_interceptors(config, "router"),
            lifecycle=self.lifecycle,
            label="router",
            server_credentials=server_credentials(config),
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
        await self.pool.close()
        await self.store.close()

    async def stop(self) -> None:
        await self.server.stop(0)
        await self.close()
