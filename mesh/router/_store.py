"""Conversation memory: history per conversation id, written before a turn is acknowledged.

SQLite (a file under the data dir, ``_store_sqlite``) by default; Redis when routers
are replicated (``_store_redis``); memory for tests that need neither. Every store is
safe to share between concurrent turns of different conversations.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh.config import MeshConfig, StoreConfig
from mesh.errors import ConfigError
from mesh.providers.base import ChatMessage


def _encode(message: ChatMessage) -> str:
    return json.dumps(
        {"role": message.role, "content": message.content, "agent": message.agent},
        separators=(",", ":"),
    )


def _decode_uncached(raw: str | bytes) -> ChatMessage:
    data: dict[str, Any] = json.loads(raw)
    return ChatMessage(role=data["role"], content=data["content"], agent=data.get("agent", ""))


#: Every turn reads its conversation's newest messages again, most of them read the turn
#: before: decoded messages (immutable) are kept by their stored bytes, short ones only.
_decode_cached = functools.lru_cache(maxsize=2048)(_decode_uncached)
_CACHED_BELOW = 2048


def _decode(raw: str | bytes) -> ChatMessage:
    return _decode_cached(raw) if len(raw) < _CACHED_BELOW else _decode_uncached(raw)


def _sweep_every(ttl_s: float) -> float:
    """How often expired conversations are deleted: a quarter of the TTL, 1-60 s."""
    return min(max(ttl_s / 4, 1.0), 60.0)


class ConversationStore(Protocol):
    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        """The newest ``limit`` messages (oldest first) and the agent that answered last
        ("" for a new conversation), read together: one round trip per turn."""
        ...

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        """Durably add a finished turn; returns only once it is stored."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """Histories in this process only (tests, a throwaway router). With ``ttl_s``, a
    conversation is forgotten that long after its last turn: not read from then on, and
    its messages dropped by a sweep (at most every minute) as other turns are stored."""

    def __init__(
        self, ttl_s: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._messages: dict[str, list[ChatMessage]] = {}
        self._active: dict[str, str] = {}
        self._ttl = ttl_s
        self._clock = clock
        self._updated: dict[str, float] = {}
        """Last turn per conversation, oldest first (with a TTL only)."""
        self._next_sweep = 0.0

    @property
    def held(self) -> int:
        """Conversations held."""
        return len(self._messages)

    def _forget(self, conversation_id: str) -> None:
        self._messages.pop(conversation_id, None)
        self._active.pop(conversation_id, None)
        self._updated.pop(conversation_id, None)

    def _expired(self, conversation_id: str, now: float) -> bool:
        assert self._ttl is not None
        updated = self._updated.get(conversation_id)
        return updated is not None and updated < now - self._ttl

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        if self._ttl is not None and self._expired(conversation_id, self._clock()):
            self._forget(conversation_id)
        history = self._messages.get(conversation_id, [])[-limit:]
        return history, self._active.get(conversation_id, "")

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        if self._ttl is not None:
            now = self._clock()
            if self._expired(conversation_id, now):  # the same id, a new conversation
                self._forget(conversation_id)
            self._updated.pop(conversation_id, None)
            self._updated[conversation_id] = now
            if now >= self._next_sweep:
                self._next_sweep = now + _sweep_every(self._ttl)
                for oldest in list(self._updated):
                    if not self._expired(oldest, now):
                        break
                    self._forget(oldest)
        self._messages.setdefault(conversation_id, []).extend(messages)
        self._active[conversation_id] = active_agent

    async def close(self) -> None:
        return None


class _CommitCounts:
    """Groups committed and the turns in them (for tests and metrics), then the hook."""

    commits: int
    turns: int
    _after_commit: Callable[[int], None] | None

    def _committed(self, turns: int) -> None:
        self.commits += 1
        self.turns += turns
        if self._after_commit is not None:
            self._after_commit(turns)


@dataclass(slots=True)
class _PendingTurn:
    conversation_id: str
    messages: list[ChatMessage]
    active_agent: str
    done: asyncio.Future[None]


def _settle(turns: list[_PendingTurn], error: Exception | None) -> None:
    for turn in turns:
        if turn.done.done():  # the caller went away (cancelled); the turn is stored anyway
            continue
        if error is None:
            turn.done.set_result(None)
        else:
            turn.done.set_exception(error)


def open_store(config: MeshConfig) -> ConversationStore:
    store: StoreConfig = config.router.store
    if store.kind == "memory":
        return MemoryStore(store.ttl_s)
    if store.kind == "sqlite":
        from mesh.router._store_sqlite import SqliteStore, private_data_dir

        path = Path(store.path)
        if not path.is_absolute():
            private_data_dir(Path(config.data_dir))
            path = config.data_dir / path
        return SqliteStore(path, ttl_s=store.ttl_s)
    url = os.environ.get(store.url_env) or store.url
    if not url:
        raise ConfigError(
            f"router.store: kind redis needs a URL in ${store.url_env} (or router.store.url)"
        )
    from mesh.router._store_redis import RedisStore

    return RedisStore(url, store.ttl_s)
