"""The SQLite conversation store: one file under the data dir, written in groups by one
thread, read beside the writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mesh.errors import Unavailable
from mesh.kept import KeptHistories
from mesh.providers.base import ChatMessage
from mesh.router._store import _CommitCounts, _decode, _encode, _PendingTurn, _settle, _sweep_every

log = logging.getLogger("mesh.router")

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
CREATE INDEX IF NOT EXISTS conversations_by_updated ON conversations (updated);
"""


TAILS_BYTES = 32 << 20
"""Decoded conversation tails a SQLite store keeps in memory (``ChatMessage.size``)."""


class _Tails(KeptHistories):
    """The newest ``limit`` messages of recently read conversations, decoded, least
    recently read dropped first past ``max_bytes``: a conversation's next turn reads
    only the rows stored since (its history mostly repeats), and gets the same message
    objects again (their wire form is made once; kept histories match them by identity).

    A tail is used only while its newest row is still stored: rows are only ever added
    to a conversation, or the whole of it deleted (TTL), so that row still being there
    means nothing before it changed. Rows from another process writing the same file
    are read like this process's own."""

    __slots__ = ("_marks",)

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, keep=None)
        self._marks: dict[str, tuple[int, int]] = {}
        """Per tail kept: its ``limit`` and its newest row's ``seq``."""

    def drop(self, conversation: str) -> None:
        super().drop(conversation)
        self._marks.pop(conversation, None)

    def tail(self, conversation: str, limit: int) -> tuple[int, tuple[ChatMessage, ...]] | None:
        """(newest ``seq``, messages) of the conversation's tail for ``limit``, or None."""
        mark = self._marks.get(conversation)
        messages = self.get(conversation)
        if mark is None or mark[0] != limit or messages is None:
            return None
        return mark[1], messages

    def record(
        self,
        conversation: str,
        limit: int,
        rows: Sequence[tuple[int, str]],
        kept: tuple[ChatMessage, ...] = (),
        last: int = 0,
    ) -> tuple[ChatMessage, ...]:
        """``kept`` then ``rows`` (``seq``, body) decoded, the newest ``limit`` of them:
        the conversation's tail from now on (its newest row ``last``, or the last of ``rows``)."""
        messages = (*kept, *(_decode(body) for _, body in rows))[-limit:]
        if not messages:
            self.drop(conversation)
            return messages
        self.put(conversation, messages)
        if conversation in self:
            self._marks[conversation] = (limit, rows[-1][0] if rows else last)
        return messages


class SqliteStore(_CommitCounts):
    """One SQLite file in WAL mode with ``synchronous=FULL``, written by one thread in groups.

    Group commit: ``append`` queues its turn and waits; a writer thread takes every turn
    queued so far, writes them in one transaction and commits it (one fsync of the WAL
    for all of them), then wakes their callers. Turns that finish while a commit is in
    flight join the next one. ``append`` returns only after the commit that holds its turn.

    Reads use a second connection on the caller's thread: in WAL mode a reader sees the
    last commit and never waits for the writer. A read is a lookup by primary key and an
    index range over a file in the page cache, cheaper than a hop to a thread.

    With ``ttl_s``, a conversation is forgotten that long after its last turn: reads
    treat it as new at once, a turn under its id starts it afresh, and the writer deletes
    expired conversations every quarter of the TTL (1-60 s), 256 per transaction between
    groups of turns.

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
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
        before_commit: Callable[[int], None] | None = None,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        _private_dirs(path.parent)
        _private_file(path)
        self._ttl = ttl_s
        self._clock = clock
        self._tails = _Tails(TAILS_BYTES)
        self._next_sweep = 0.0
        self.forgotten = 0
        """Expired conversations deleted so far."""
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
            head = db.execute(
                "SELECT active_agent, updated FROM conversations WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            if head is None:
                return [], ""
            if self._ttl is not None and head[1] < self._clock() - self._ttl:
                return [], ""  # expired (and not yet deleted): a new conversation
            tail = self._tails.tail(conversation_id, limit)
            if tail is not None:
                last, kept = tail
                rows = db.execute(
                    "SELECT seq, body FROM messages WHERE conversation_id = ? AND seq >= ? "
                    "ORDER BY seq",
                    (conversation_id, last),
                ).fetchall()
                if rows and rows[0][0] == last:  # still there: read only what is new
                    messages = self._tails.record(conversation_id, limit, rows[1:], kept, last)
                    return list(messages), str(head[0])
            rows = db.execute(
                "SELECT seq, body FROM (SELECT seq, body FROM messages WHERE conversation_id = ? "
                "ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (conversation_id, limit),
            ).fetchall()
        except sqlite3.Error as err:
            raise Unavailable(f"conversation store unavailable: {err}") from None
        messages = self._tails.record(conversation_id, limit, rows)
        return list(messages), str(head[0])

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
                while not self._queue and not self._closing and not self._sweep_due():
                    self._cond.wait(self._sweep_wait())
                if not self._queue and self._closing:
                    return
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
            if self._sweep_due():
                self._sweep()
            if not batch:
                continue
            error = self._commit(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[_PendingTurn]] = {}
            for turn in batch:
                by_loop.setdefault(turn.done.get_loop(), []).append(turn)
            for loop, turns in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, turns, error)

    def _sweep_due(self) -> bool:
        return self._ttl is not None and time.monotonic() >= self._next_sweep

    def _sweep_wait(self) -> float | None:
        return None if self._ttl is None else max(0.0, self._next_sweep - time.monotonic())

    def _sweep(self) -> None:
        """Delete up to 256 expired conversations in one transaction; the sweep stays due
        while more are left (turns queued meanwhile go first)."""
        assert self._ttl is not None
        db = self._writer_db
        cutoff = self._clock() - self._ttl
        try:
            ids = db.execute(
                "SELECT conversation_id FROM conversations WHERE updated < ? LIMIT 256", (cutoff,)
            ).fetchall()
            if ids:
                with _transaction(db):
                    db.executemany("DELETE FROM messages WHERE conversation_id = ?", ids)
                    db.executemany("DELETE FROM conversations WHERE conversation_id = ?", ids)
        except sqlite3.Error as err:
            log.warning("conversation store: deleting expired conversations failed: %s", err)
            ids = []
        self.forgotten += len(ids)
        if len(ids) < 256:
            self._next_sweep = time.monotonic() + _sweep_every(self._ttl)

    def _commit(self, batch: list[_PendingTurn]) -> Exception | None:
        db = self._writer_db
        now = self._clock()
        try:
            with _transaction(db):
                if self._ttl is not None:  # an expired conversation's id starts a new one
                    cutoff = now - self._ttl
                    db.executemany(
                        "DELETE FROM messages WHERE conversation_id = ? AND EXISTS (SELECT 1 "
                        "FROM conversations WHERE conversation_id = ? AND updated < ?)",
                        [(t.conversation_id, t.conversation_id, cutoff) for t in batch],
                    )
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
        except Exception as err:  # noqa: BLE001 (a hook or SQLite: the batch fails, the writer goes on)
            return Unavailable(f"conversation store unavailable: {type(err).__name__}: {err}")
        self._committed(len(batch))
        return None

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._reader_db.close()
        self._writer_db.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed when the block ends, rolled back when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
