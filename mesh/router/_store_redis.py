"""The Redis conversation store: a list per conversation, written and read in groups."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.errors import Unavailable
from mesh.providers.base import ChatMessage
from mesh.router._store import _CommitCounts, _decode, _encode, _PendingTurn, _settle


@dataclass(slots=True)
class _PendingRead:
    conversation_id: str
    limit: int
    done: asyncio.Future[tuple[list[ChatMessage], str]]


class RedisStore(_CommitCounts):
    """A Redis list per conversation plus a key for the active agent.

    Appends are written in groups: every turn that finishes while a write is in flight
    joins the next one, and each group is one pipelined MULTI/EXEC (one round trip); an
    ``append`` returns once the EXEC holding its turn has succeeded. Loads are grouped
    the same way into one non-transactional pipeline (LRANGE + GET per conversation).
    ``after_commit`` (called with the number of turns in each EXEC) is a hook for metrics
    and tests.
    """

    #: The most turns one MULTI takes (the rest join the next).
    MAX_BATCH = 256

    def __init__(
        self,
        url: str,
        ttl_s: float | None = None,
        timeout_s: float = 5.0,
        *,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
        )
        self._ttl = int(ttl_s) if ttl_s else None
        self._after_commit = after_commit
        self._queue: list[_PendingTurn] = []
        self._flusher: asyncio.Task[None] | None = None
        self._reads: list[_PendingRead] = []
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0
        """MULTI/EXEC groups written so far (each covers one or more turns)."""
        self.turns = 0
        """Turns written so far."""
        self.reads = 0
        """Read pipelines sent so far (each serves one or more loads)."""

    @staticmethod
    def _keys(conversation_id: str) -> tuple[str, str]:
        return f"mesh:conv:{conversation_id}:messages", f"mesh:conv:{conversation_id}:active"

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        if self._closed:
            raise Unavailable("conversation store is closed")
        loop = asyncio.get_running_loop()
        read = _PendingRead(conversation_id, limit, loop.create_future())
        self._reads.append(read)
        if self._reader is None:
            self._reader = loop.create_task(self._flush_reads())
        return await read.done

    async def _flush_reads(self) -> None:
        """Serve queued reads, one pipeline (LRANGE + GET each) per group, until none wait."""
        from redis.exceptions import RedisError

        try:
            while self._reads:
                batch = self._reads[: self.MAX_BATCH]
                del self._reads[: self.MAX_BATCH]
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for read in batch:
                            messages_key, active_key = self._keys(read.conversation_id)
                            pipe.lrange(messages_key, -read.limit, -1)
                            pipe.get(active_key)
                        values = await pipe.execute()
                    self.reads += 1
                except (RedisError, OSError) as err:
                    error = Unavailable(f"conversation store unavailable: {type(err).__name__}")
                    for read in batch:
                        if not read.done.done():
                            read.done.set_exception(error)
                    continue
                for i, read in enumerate(batch):
                    if read.done.done():  # the caller went away
                        continue
                    rows, value = values[2 * i], values[2 * i + 1]
                    active = value.decode() if isinstance(value, bytes) else ""
                    read.done.set_result(([_decode(row) for row in rows], active))
        finally:
            self._reader = None

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        if self._closed:
            raise Unavailable("conversation store is closed")
        loop = asyncio.get_running_loop()
        turn = _PendingTurn(conversation_id, list(messages), active_agent, loop.create_future())
        self._queue.append(turn)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        await turn.done

    async def _flush(self) -> None:
        """Write queued turns, one MULTI per group, until the queue is empty."""
        try:
            while self._queue:
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
                _settle(batch, await self._write(batch))
        finally:
            self._flusher = None

    async def _write(self, batch: list[_PendingTurn]) -> Exception | None:
        from redis.exceptions import RedisError

        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for turn in batch:
                    messages_key, active_key = self._keys(turn.conversation_id)
                    pipe.rpush(messages_key, *[_encode(m) for m in turn.messages])
                    pipe.set(active_key, turn.active_agent)
                    if self._ttl:
                        pipe.expire(messages_key, self._ttl)
                        pipe.expire(active_key, self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as err:
            return Unavailable(f"conversation store unavailable: {type(err).__name__}")
        self._committed(len(batch))
        return None

    async def close(self) -> None:
        self._closed = True
        for task in (self._flusher, self._reader):
            if task is not None:
                await asyncio.shield(task)
        await self._redis.aclose()
