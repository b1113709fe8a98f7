"""``grpc.health.v1.Health`` over a server's own statuses: Check, Watch and List.

Written here rather than subclassed from grpc_health's reference servicer: a
subclass had to reach into its private state to end Watch streams at the drain, and
the reference does not answer List.

* ``Check``: the status of a service; NOT_FOUND for a service the server does not have.
* ``Watch``: the status now, then every change. A change made while a write is in
  flight is not lost: the watcher takes the wake-up before it writes. Once the drain
  has sent a watcher NOT_SERVING, its stream ends (OK): a watcher (the router) sees
  NOT_SERVING, then the end, and watches again once the server is back. A Watch left
  open at the stop would have its last write cut, which grpc logs as an ERROR.
* ``List``: every service and its status (the health protocol's newer method).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.lifecycle import wait_set

log = logging.getLogger("mesh.server")

Status: TypeAlias = int
"""A ``HealthCheckResponse.ServingStatus`` value."""
_pb: Any = health_pb2  # the stubs predate List's messages
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
Context = grpc.aio.ServicerContext[Any, Any]


class Health(health_pb2_grpc.HealthServicer):
    """Statuses per service ("" is the server as a whole), and the drain's last word."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": SERVING}
        self._changed = asyncio.Event()
        self._draining = False
        self._watching = 0
        self._quiet = asyncio.Event()
        """Set while no Watch stream is open (the drain waits for their last word)."""
        self._quiet.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def status(self, service: str) -> Status | None:
        return self._status.get(service)

    def _notify(self) -> None:
        """Wake every watcher; later ones wait on a fresh event."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def set(self, service: str, status: Status) -> None:
        """Set a service's status (ignored once draining: the drain's NOT_SERVING stays)."""
        if self._draining:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good; open Watch streams then end."""
        if self._draining:
            return
        self._draining = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._notify()

    async def Check(  # noqa: N802  (the gRPC method's name)
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(  # noqa: N802  (the gRPC method's name)
        self, request: Any, context: Context
    ) -> Any:
        reply = _pb.HealthListResponse()
        for service, status in self._status.items():
            reply.statuses[service].status = status
        return reply

    async def Watch(  # noqa: N802  (the gRPC method's name)
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> None:
        self._watching += 1
        self._quiet.clear()
        try:
            await self._watch(request, context)
        finally:
            self._watching -= 1
            if not self._watching:
                self._quiet.set()

    async def watchers_ended(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until every Watch stream has ended: after the drain
        began, each ends once it has written NOT_SERVING. Stopping the server before
        that could cut the write, and a watcher would see the end without the status."""
        return await wait_set(self._quiet, timeout)

    async def _watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        last: Status | None = None
        while True:
            changed = self._changed  # taken before the write: a change during it wakes us
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                try:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                except Exception as exc:  # cygrpc's ExecuteBatchError: the peer left
                    if not self._draining:
                        raise
                    log.debug("health watch ended by its peer during the drain: %r", exc)
                    return
                last = status
            if self._draining:
                return
            await changed.wait()
