"""Conversation memory: history per conversation id, written before a turn is acknowledged.

SQLite (a file under the data dir) by default; Redis when routers are
replicated; memory for tests that need neither. Every store is safe to share
between concurrent turns of different conversations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def _decode_uncached(raw: str | bytes) -> ChatMessage:
    data: dict[str, Any] = json.loads(raw)
    return ChatMessage(role=data["role"], content=data["content"], agent=data.get("agent", ""))


#: Every turn reads its conversation's newest messages again, most of them read the turn
#: before: decoded messages (immutable) are kept by their stored bytes, short ones only.
_decode_cached = functools.lru_cache(maxsize=2048)(_decode_uncached)
_CACHED_BELOW = 2048


def _decode(raw: str | bytes) -> ChatMessage:
    return _decode_cached(raw) if len(raw) < _CACHED_BELOW else _decode_uncached(raw)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    active_agent TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


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
    """One SQLite file in WAL mode with ``synchronous=FULL``, written by one thread in groups.

    Group commit: ``append`` queues its turn and waits; a writer thread takes every turn
    queued so far, writes them in one transaction and commits it (one fsync of the WAL
    for all of them), then wakes their callers. Turns that finish while a commit is in
    flight join the next one. ``append`` returns only after the commit that holds its turn.

    Reads use a second connection on the caller's thread: in WAL mode a reader sees the
    last commit and never waits for the writer. A read is a lookup by primary key and an
    index range over a file in the page cache, cheaper than a hop to a thread.

    The file, its ``-wal`` and ``-shm`` are 0600; directories the store creates are 0700.
    ``before_commit`` and ``after_commit`` (called on the writer thread with the number of
    turns in the transaction) are hooks for metrics and tests.
    """

    #: The most turns one transaction takes (the rest join the next).
    MAX_BATCH = 512

    def __init__(
        self,
        path: Path,
        *,
        before_commit: Callable[[int], None] | None = None,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        _private_dirs(path.parent)
        _private_file(path)
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._writer_db = self._connect()
        self._writer_db.executescript(_SCHEMA)
        self._reader_db = self._connect()
        for suffix in ("-wal", "-shm"):  # SQLite gives them the file's mode; fix old ones
            _private_file(path.with_name(path.name + suffix), create=False)
        self._cond = threading.Condition()
        self._queue: list[_PendingTurn] = []
        self._closing = False
        self.commits = 0
        """Transactions committed so far (each covers one or more turns)."""
        self.turns = 0
        """Turns committed so far."""
        self._thread = threading.Thread(target=self._run, name="sqlite-store-writer", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    # -- reads ----------------------------------------------------------------------------

    async def load(self, conversation_id: str, limit: int) -> tuple[list[ChatMessage], str]:
        db = self._reader_db
        try:
            rows = db.execute(
                "SELECT body FROM (SELECT seq, body FROM messages WHERE conversation_id = ? "
                "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (conversation_id, limit),
            ).fetchall()
            active = db.execute(
                "SELECT active_agent FROM conversations WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
        except sqlite3.Error as err:
            raise Unavailable(f"conversation store unavailable: {err}") from None
        return [_decode(row[0]) for row in rows], str(active[0]) if active else ""

    # -- writes ---------------------------------------------------------------------------

    async def append(
        self, conversation_id: str, messages: Sequence[ChatMessage], active_agent: str
    ) -> None:
        loop = asyncio.get_running_loop()
        turn = _PendingTurn(conversation_id, list(messages), active_agent, loop.create_future())
        with self._cond:
            if self._closing:
                raise Unavailable("conversation store is closed")
            self._queue.append(turn)
            self._cond.notify()
        await turn.done

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
            error = self._commit(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[_PendingTurn]] = {}
            for turn in batch:
                by_loop.setdefault(turn.done.get_loop(), []).append(turn)
            for loop, turns in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, turns, error)

    def _commit(self, batch: list[_PendingTurn]) -> Exception | None:
        db = self._writer_db
        now = time.time()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO messages (conversation_id, body) VALUES (?, ?)",
                    [(t.conversation_id, _encode(m)) for t in batch for m in t.messages],
                )
                db.executemany(
                    "INSERT INTO conversations VALUES (?, ?, ?) ON CONFLICT(conversation_id) "
                    "DO UPDATE SET active_agent = excluded.active_agent, "
                    "updated = excluded.updated",
                    [(t.conversation_id, t.active_agent, now) for t in batch],
                )
                if self._before_commit is not None:
                    self._before_commit(len(batch))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as err:  # noqa: BLE001 (a hook or SQLite: the batch fails, the writer goes on)
            return Unavailable(f"conversation store unavailable: {type(err).__name__}: {err}")
        self.commits += 1
        self.turns += len(batch)
        if self._after_commit is not None:
            self._after_commit(len(batch))
        return None

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._reader_db.close()
        self._writer_db.close()


@dataclass(slots=True)
class _PendingTurn:
    conversation_id: str
    messages: list[ChatMessage]
    active_agent: str
    done: asyncio.Future[None]


@dataclass(slots=True)
class _PendingRead:
    conversation_id: str
    limit: int
    done: asyncio.Future[tuple[list[ChatMessage], str]]


def _settle(turns: list[_PendingTurn], error: Exception | None) -> None:
    for turn in turns:
        if turn.done.done():  # the caller went away (cancelled); the turn is stored anyway
            continue
        if error is None:
            turn.done.set_result(None)
        else:
            turn.done.set_exception(error)


def _private_dirs(directory: Path) -> None:
    """Create ``directory`` (and missing parents) 0700; an existing one is left as it is."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def private_data_dir(directory: Path) -> None:
    """Make the mesh's data dir 0700 (created if missing); only the owner may read it."""
    _private_dirs(directory)
    if directory.stat().st_uid == os.getuid():
        os.chmod(directory, 0o700)


def _private_file(path: Path, *, create: bool = True) -> None:
    """Create ``path`` 0600 before SQLite opens it (SQLite gives -wal/-shm the same mode)."""
    if create:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o600)


class RedisStore:
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
        self.commits += 1
        self.turns += len(batch)
        if self._after_commit is not None:
            self._after_commit(len(batch))
        return None

    async def close(self) -> None:
        self._closed = True
        for task in (self._flusher, self._reader):
            if task is not None:
                await asyncio.shield(task)
        await self._redis.aclose()


def open_store(config: MeshConfig) -> ConversationStore:
    store: StoreConfig = config.router.store
    if store.kind == "memory":
        return MemoryStore()
    if store.kind == "sqlite":
        path = Path(store.path)
        if not path.is_absolute():
            private_data_dir(Path(config.data_dir))
            path = config.data_dir / path
        return SqliteStore(path)
    url = os.environ.get(store.url_env) or store.url
    if not url:
        raise ConfigError(
            f"router.store: kind redis needs a URL in ${store.url_env} (or router.store.url)"
        )
    return RedisStore(url, store.ttl_s)
