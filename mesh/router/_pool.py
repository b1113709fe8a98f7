"""Where the agents are: discovery, health, and picking a replica.

Endpoints come from the static list in the config, from agents that register
themselves (``Router.Register``), and from DNS names re-resolved periodically
(a Kubernetes headless Service resolves to one address per ready pod). Each
endpoint has one long-lived channel and a ``grpc.health.v1`` Watch on it; only
SERVING endpoints are picked, least outstanding streams first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import MeshConfig
from mesh.errors import MeshError
from mesh.lifecycle import wait_set
from mesh.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("mesh.router.pool")

Source = Literal["static", "registered", "dns"]
AGENT_SERVICE = "mesh.v1.AgentService"
ChannelFactory = Callable[[str, str, str], grpc.aio.Channel]
"""(address, agent name, TLS server name or "") -> channel (with the agent's interceptors)."""


@dataclass(eq=False)
class Endpoint:
    agent: str
    address: str
    sources: set[Source]
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.AgentServiceAsyncStub
    healthy: bool = False
    active: int = 0
    watch: asyncio.Task[None] | None = None
    probe: asyncio.Task[None] | None = None
    """Re-probing after a call found the endpoint down (None when not failed)."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def health(self) -> str:
        return "SERVING" if self.healthy else "NOT_SERVING"

    @property
    def health_pb(self) -> types_pb2.EndpointHealth.ValueType:
        if self.healthy:
            return types_pb2.ENDPOINT_HEALTH_SERVING
        return types_pb2.ENDPOINT_HEALTH_NOT_SERVING


class AgentPool:
    def __init__(
        self,
        config: MeshConfig,
        channel_factory: ChannelFactory,
        *,
        info_metadata: Callable[[str], Awaitable[tuple[tuple[str, str], ...]]] | None = None,
    ) -> None:
        self.config = config
        self._channel_factory = channel_factory
        self._info_metadata = info_metadata
        self.endpoints: dict[str, dict[str, Endpoint]] = {}
        self.infos: dict[str, types_pb2.AgentInfo] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rr = itertools.count()
        self._interval = config.router.discovery.health_interval_s
        self.changed = asyncio.Condition()

    # -- membership ------------------------------------------------------------------

    async def start(self) -> None:
        for agent, addresses in self.config.router.discovery.static.items():
            for address in addresses:
                await self.add(agent, address, "static")
        for target in self.config.router.discovery.dns:
            self._tasks.append(
                asyncio.ensure_future(self._resolve_loop(target.agent, target.host, target.port))
            )

    async def add(
        self, agent: str, address: str, source: Source, server_name: str = ""
    ) -> Endpoint:
        known = self.endpoints.setdefault(agent, {})
        endpoint = known.get(address)
        if endpoint is not None:
            endpoint.sources.add(source)
            return endpoint
        channel = self._channel_factory(address, agent, server_name)
        endpoint = Endpoint(
            agent, address, {source}, channel, agent_pb2_grpc.AgentServiceStub(channel)
        )
        known[address] = endpoint
        endpoint.watch = asyncio.ensure_future(self._watch(endpoint))
        log.info("endpoint %s of %s added (%s)", address, agent, source)
        await self._notify()
        return endpoint

    async def remove(self, agent: str, address: str, source: Source) -> None:
        endpoint = self.endpoints.get(agent, {}).get(address)
        if endpoint is None:
            return
        endpoint.sources.discard(source)
        if endpoint.sources:
            return
        del self.endpoints[agent][address]
        if not self.endpoints[agent]:
            del self.endpoints[agent]
        if endpoint.watch is not None and endpoint.watch is not asyncio.current_task():
            endpoint.watch.cancel()
        await endpoint.channel.close(grace=None)
        log.info("endpoint %s of %s removed", address, agent)
        await self._notify()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- health ----------------------------------------------------------------------

    async def _set_health(self, endpoint: Endpoint, healthy: bool) -> None:
        if endpoint.healthy != healthy:
            endpoint.healthy = healthy
            log.info("endpoint %s of %s is %s", endpoint.address, endpoint.agent, endpoint.health)
            if healthy:
                endpoint.ready.set()
            else:
                endpoint.ready.clear()
            await self._notify()

    async def _watch(self, endpoint: Endpoint) -> None:
        stub: Any = health_pb2_grpc.HealthStub(endpoint.channel)  # the stubs lack Watch
        request = health_pb2.HealthCheckRequest(service=AGENT_SERVICE)
        while True:
            try:
                async for response in stub.Watch(request, wait_for_ready=False):
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    if serving and endpoint.agent not in self.infos:
                        await self._fetch_info(endpoint)
                    await self._set_health(endpoint, serving)
            except grpc.aio.AioRpcError as err:
                log.debug("health watch of %s: %s", endpoint.address, err.code().name)
            await self._set_health(endpoint, False)
            if endpoint.sources == {"registered"}:
                # A registered agent that stops answering leaves the pool.
                await self.remove(endpoint.agent, endpoint.address, "registered")
                return
            await asyncio.sleep(self._interval)

    async def _fetch_info(self, endpoint: Endpoint) -> None:
        try:
            metadata: tuple[tuple[str, str], ...] = ()
            if self._info_metadata is not None:
                metadata = await self._info_metadata(endpoint.agent)
            info = await endpoint.stub.Info(
                agent_pb2.InfoRequest(), timeout=self._interval * 5, metadata=metadata
            )
        except MeshError as err:
            log.warning("Info from %s: no token (%s)", endpoint.address, err.message)
            return
        except grpc.aio.AioRpcError as err:
            log.warning("Info from %s failed: %s", endpoint.address, err.code().name)
            return
        self.infos[endpoint.agent] = info.info

    def mark_failed(self, endpoint: Endpoint) -> None:
        """A call found the endpoint down: stop picking it, and probe it until it serves.

        The health Watch sends a message only when the status changes, so an agent
        that stayed SERVING in its own eyes would never come back without the probe.
        """
        endpoint.healthy = False
        endpoint.ready.clear()
        if endpoint.probe is None or endpoint.probe.done():
            endpoint.probe = asyncio.ensure_future(self._probe(endpoint))

    async def _probe(self, endpoint: Endpoint) -> None:
        stub: Any = health_pb2_grpc.HealthStub(endpoint.channel)
        request = health_pb2.HealthCheckRequest(service=AGENT_SERVICE)
        delay = 0.05
        while self.endpoints.get(endpoint.agent, {}).get(endpoint.address) is endpoint:
            if endpoint.healthy:
                return  # the Watch said so first
            try:
                response = await stub.Check(request, timeout=max(self._interval, 1.0))
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    log.info("endpoint %s of %s serves again", endpoint.address, endpoint.agent)
                    await self._set_health(endpoint, True)
                    return
            except grpc.aio.AioRpcError as err:
                log.debug("probe of %s: %s", endpoint.address, err.code().name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._interval)

    # -- picking ---------------------------------------------------------------------

    def pick(
        self,
        agent: str,
        exclude: set[str],
        prefer: Callable[[Endpoint], bool] | None = None,
    ) -> Endpoint | None:
        """The healthy endpoint with the fewest streams in flight (ties rotate); one that
        ``prefer`` says keeps the turn's history when it has at most one stream more in
        flight than that."""
        candidates = [
            e
            for e in self.endpoints.get(agent, {}).values()
            if e.healthy and e.address not in exclude
        ]
        if not candidates:
            return None
        least = min(e.active for e in candidates)
        if prefer is not None and len(candidates) > 1:
            for endpoint in candidates:
                if endpoint.active <= least + 1 and prefer(endpoint):
                    return endpoint
        best = [e for e in candidates if e.active == least]
        return best[next(self._rr) % len(best)]

    async def wait_endpoint(self, endpoint: Endpoint, timeout: float) -> bool:
        """Wait until this one endpoint reports SERVING."""
        return await wait_set(endpoint.ready, timeout)

    async def wait_healthy(self, agent: str, timeout: float) -> bool:
        """Wait until ``agent`` has a healthy endpoint (used at start-up and in tests)."""
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(
                    lambda: any(e.healthy for e in self.endpoints.get(agent, {}).values())
                )
        except TimeoutError:
            return False
        return True

    # -- DNS -------------------------------------------------------------------------

    async def _resolve_loop(self, agent: str, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        current: set[str] = set()
        hosts_file = self.config.router.discovery.hosts_file
        while True:
            try:
                if hosts_file:
                    ips = _lookup_hosts_file(Path(hosts_file), host)
                    if not ips:
                        raise OSError(f"{host} is not in {hosts_file}")
                    found = {f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips}
                else:
                    async with asyncio.timeout(10):
                        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                    found = set()
                    for family, _type, _proto, _name, sockaddr in infos:
                        ip = str(sockaddr[0])
                        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            except (OSError, TimeoutError) as err:
                log.warning("resolving %s for %s failed: %s", host, agent, err)
                found = current  # keep what we had
            for address in found - current:
                # A pod's IP is not in its certificate; the Service name it was found by is.
                await self.add(agent, address, "dns", server_name=host)
            for address in current - found:
                await self.remove(agent, address, "dns")
            current = found
            await asyncio.sleep(self.config.router.discovery.dns_interval_s)

    async def close(self) -> None:
        for endpoint in [e for known in self.endpoints.values() for e in known.values()]:
            if endpoint.probe is not None:
                endpoint.probe.cancel()
        for task in self._tasks:
            task.cancel()
        for agent in list(self.endpoints):
            for endpoint in list(self.endpoints.get(agent, {}).values()):
                if endpoint.watch is not None:
                    endpoint.watch.cancel()
                with contextlib.suppress(Exception):
                    await endpoint.channel.close(grace=None)
        self.endpoints.clear()


def _lookup_hosts_file(path: Path, host: str) -> list[str]:
    """The addresses ``path`` (hosts(5) format) lists for ``host``, in file order."""
    ips: list[str] = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and host in fields[1:] and fields[0] not in ips:
            ips.append(fields[0])
    return ips
