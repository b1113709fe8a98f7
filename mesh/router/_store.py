"""Conversation memory: history per conversation id, written before a turn is acknowledged.

SQLite (a file under the data dir) by default; Redis when routers are
replicated; memory for tests that need neither. Every store is safe to share
between concurrent turns of different conversations.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mesh.config import MeshConfig, StoreConfig
from mesh.errors import ConfigError, Unavailable
from mesh.providers.base import ChatMessage


def _encode(message: ChatMessage) -> str:
    return json.dumps(
        {"role": message.role, "content": message.content, "agent": message.agent},
        separators=(",", ":"),
    )


def _decode(raw: str | bytes) -> ChatMessage:
    data: dict[str, Any] = json.loads(raw)
    return ChatMessage(role=data["role"], content=data["content"], agent=data.get("agent", ""))


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
    def __init__(self) -> None:
        self._messages: dict[str, list[ChatMessage]] = {}
        self._active: dict[str, str] = {}

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        history = self._messages.get(conversation_id, [])[-limit:]
        return history, self._active.get(conversation_id, "")

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        self._messages.setdefault(conversation_id, []).extend(messages)
        self._active[conversation_id] = active_agent

    async def close(self) -> None:
        return None


class SqliteStore:
    """One SQLite file; writes are committed (WAL, synchronous=FULL) before they return."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS messages (
                conversation_id TEXT NOT NULL,
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                body TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS messages_by_conversation
                ON messages (conversation_id, seq);
            CREATE TABLE IF NOT EXISTS conversations (
                conversation_id TEXT PRIMARY KEY,
                active_agent TEXT NOT NULL,
                updated REAL NOT NULL
            );
            """
        )
        self._lock = asyncio.Lock()

    def _load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        rows = self._db.execute(
            "SELECT body FROM (SELECT seq, body FROM messages WHERE conversation_id = ? "
            "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (conversation_id, limit),
        ).fetchall()
        active = self._db.execute(
            "SELECT active_agent FROM conversations WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()
        return [_decode(row[0]) for row in rows], str(active[0]) if active else ""

    def _append(self, conversation_id: str, messages: Sequence[ChatMessage], active: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO messages (conversation_id, body) VALUES (?, ?)",
                [(conversation_id, _encode(m)) for m in messages],
            )
            self._db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?) ON CONFLICT(conversation_id) "
                "DO UPDATE SET active_agent = excluded.active_agent, updated = excluded.updated",
                (conversation_id, active, time.time()),
            )

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        async with self._lock:
            return await asyncio.to_thread(self._load, conversation_id, limit)

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append, conversation_id, messages, active_agent)

    async def close(self) -> None:
        self._db.close()


class RedisStore:
    """A Redis list per conversation plus a key for the active agent, written in one MULTI."""

    def __init__(self, url: str, ttl_s: float | None = None, timeout_s: float = 5.0) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
        )
        self._ttl = int(ttl_s) if ttl_s else None

    @staticmethod
    def _keys(conversation_id: str) -> tuple[str, str]:
        return f"mesh:conv:{conversation_id}:messages", f"mesh:conv:{conversation_id}:active"

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        from redis.exceptions import RedisError

        messages_key, active_key = self._keys(conversation_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lrange(messages_key, -limit, -1)
                pipe.get(active_key)
                rows, value = await pipe.execute()
        except RedisError as err:
            raise Unavailable(f"conversation store unavailable: {type(err).__name__}") from None
        active = value.decode() if isinstance(value, bytes) else ""
        return [_decode(row) for row in rows], active

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        from redis.exceptions import RedisError

        messages_key, active_key = self._keys(conversation_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(messages_key, *[_encode(m) for m in messages])
                pipe.set(active_key, active_agent)
                if self._ttl:
                    pipe.expire(messages_key, self._ttl)
                    pipe.expire(active_key, self._ttl)
                await pipe.execute()
        except RedisError as err:
            raise Unavailable(f"conversation store unavailable: {type(err).__name__}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(config: MeshConfig) -> ConversationStore:
    store: StoreConfig = config.router.store
    if store.kind == "memory":
        return MemoryStore()
    if store.kind == "sqlite":
        path = Path(store.path)
        if not path.is_absolute():
            path = config.data_dir / path
        return SqliteStore(path)
    url = os.environ.get(store.url_env) or store.url
    if not url:
        raise ConfigError(
            f"router.store: kind redis needs a URL in ${store.url_env} (or router.store.url)"
        )
    return RedisStore(url, store.ttl_s)
