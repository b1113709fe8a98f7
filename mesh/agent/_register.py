"""Self-registration: an agent announces itself to a router and stays listed while the
stream lives; when the stream breaks it reconnects with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from mesh.client import create_channel
from mesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("mesh.agent.register")


async def register_forever(
    router: str,
    name: str,
    address: str,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
    max_backoff: float = 10.0,
    on_accept: Callable[[], None] | None = None,
) -> None:
    """Keep ``name`` at ``address`` registered with ``router`` until cancelled."""
    backoff = 0.5
    async with create_channel(
        router, interceptors=interceptors, credentials=credentials
    ) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        while True:
            call = stub.Register()
            try:
                await call.write(router_pb2.RegisterRequest(name=name, address=address))
                async for response in call:
                    if response.accepted:
                        log.info("registered with router %s as %s at %s", router, name, address)
                        backoff = 0.5
                        if on_accept is not None:
                            on_accept()
                    else:
                        log.warning("router %s refused registration: %s", router, response.message)
                log.warning("registration stream to %s ended; reconnecting", router)
            except grpc.aio.AioRpcError as err:
                log.warning("registration with %s failed: %s", router, err.code().name)
            finally:
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(max_backoff, backoff * 2)
