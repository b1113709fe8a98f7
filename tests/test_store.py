"""The conversation stores: SQLite group commit, reads beside writes, private files,
and Redis appends grouped into one MULTI (counted by the Redis server itself)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mesh.config import config_from_dict
from mesh.errors import Unavailable
from mesh.providers.base import ChatMessage
from mesh.router import MemoryStore, RedisStore, SqliteStore, open_store

from .meshtest import redis_server


def _turn(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text), ChatMessage("assistant", f"re: {text}", agent="a")]


def _committed(path: Path) -> dict[str, list[str]]:
    """What another connection (another process, say) sees committed, per conversation."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT conversation_id, body FROM messages ORDER BY seq").fetchall()
    finally:
        db.close()
    out: dict[str, list[str]] = {}
    for conversation, body in rows:
        out.setdefault(conversation, []).append(body)
    return out


class _Gate:
    """Holds the writer thread inside the first transaction (rows written, not committed)
    until the test releases it; records the size of every committed batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []
        self.armed = False

    def before_commit(self, turns: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(30), "the test never released the writer"

    def after_commit(self, turns: int) -> None:
        self.batches.append(turns)


async def test_sqlite_group_commit_and_reads_beside_the_writer(tmp_path: Path) -> None:
    gate = _Gate()
    path = tmp_path / "conv.db"
    store = SqliteStore(path, before_commit=gate.before_commit, after_commit=gate.after_commit)
    try:
        await store.append("old", _turn("before"), "a")
        gate.batches.clear()
        gate.armed = True

        first = asyncio.create_task(store.append("c0", _turn("t0"), "a"))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        # The writer holds an open transaction with c0's rows in it. 50 more turns finish.
        rest = [
            asyncio.create_task(store.append(f"c{i}", _turn(f"t{i}"), "b")) for i in range(1, 51)
        ]
        await asyncio.sleep(0)  # one loop pass: every task queues its turn
        # Reads neither wait for the writer nor see what it has not committed.
        history, active = await asyncio.wait_for(store.load("old", 10), 10)
        assert [m.content for m in history] == ["before", "re: before"] and active == "a"
        assert await asyncio.wait_for(store.load("c0", 10), 10) == ([], "")
        # No append has returned: none of them is committed yet.
        assert not first.done() and not any(t.done() for t in rest)
        assert "c0" not in _committed(path)

        gate.release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        # 51 appends, two commits: c0's alone, then the 50 that queued meanwhile in one.
        assert gate.batches == [1, 50]
        seen = _committed(path)
        assert all(len(seen[f"c{i}"]) == 2 for i in range(51))
        history, active = await store.load("c7", 10)
        assert [m.content for m in history] == ["t7", "re: t7"] and active == "b"
        assert history[1].agent == "a"
    finally:
        gate.release.set()
        await store.close()


async def test_sqlite_append_returns_after_its_commit(tmp_path: Path) -> None:
    path = tmp_path / "conv.db"
    store = SqliteStore(path)
    try:
        for i in range(20):
            await store.append("one", _turn(f"m{i}"), "a")
            # Each acknowledged turn is visible to a separate connection at once.
            assert len(_committed(path)["one"]) == 2 * (i + 1)
        await asyncio.gather(*(store.append(f"p{i}", _turn("x"), "a") for i in range(64)))
        assert store.turns == 84 and store.commits < 84
        history, _ = await store.load("one", 4)  # the newest 4, oldest first
        assert [m.content for m in history] == ["m18", "re: m18", "m19", "re: m19"]
    finally:
        await store.close()
    with pytest.raises(Unavailable):
        await store.append("late", _turn("x"), "a")


async def test_sqlite_failed_commit_fails_every_turn_of_it(tmp_path: Path) -> None:
    def refuse(turns: int) -> None:
        raise OSError("disk full")

    store = SqliteStore(tmp_path / "conv.db", before_commit=refuse)
    try:
        with pytest.raises(Unavailable, match="disk full"):
            await store.append("c", _turn("x"), "a")
    finally:
        await store.close()
    assert _committed(tmp_path / "conv.db") == {}


async def test_sqlite_files_private(tmp_path: Path) -> None:
    # An older install left a world-readable data dir and database behind.
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # noqa: S103 - an older install's mode, for the store to tighten
    old = data / "conversations.db"
    sqlite3.connect(old).close()
    os.chmod(old, 0o644)
    config = config_from_dict(
        {"data_dir": str(data), "router": {"store": {"kind": "sqlite"}}}, source="<test>"
    )
    store = open_store(config)
    try:
        await store.append("c", _turn("secret"), "a")
        files = [old, data / "conversations.db-wal", data / "conversations.db-shm"]
        modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in files}
        assert modes == {p.name: 0o600 for p in files}
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    finally:
        await store.close()

    # A fresh data dir (and a nested store path under it) is created private.
    fresh = tmp_path / "new" / "mesh"
    config = config_from_dict(
        {"data_dir": str(fresh), "router": {"store": {"kind": "sqlite", "path": "db/c.db"}}},
        source="<test>",
    )
    store = open_store(config)
    try:
        await store.append("c", _turn("secret"), "a")
        for directory in (fresh, fresh / "db"):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        for name in ("c.db", "c.db-wal", "c.db-shm"):
            assert stat.S_IMODE(os.stat(fresh / "db" / name).st_mode) == 0o600
    finally:
        await store.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def _execs(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


async def test_redis_appends_share_one_multi(redis_url: str, redis_client: Redis) -> None:
    batches: list[int] = []
    store = RedisStore(redis_url, ttl_s=600, after_commit=batches.append)
    try:
        await store.append("r0", _turn("first"), "a")
        before = await _execs(redis_client)
        await asyncio.gather(*(store.append(f"r{i}", _turn(f"t{i}"), "b") for i in range(1, 41)))
        # Redis itself ran one EXEC for the 40 turns that finished together.
        assert await _execs(redis_client) - before == 1
        assert batches == [1, 40]
        assert await redis_client.llen("mesh:conv:r17:messages") == 2
        assert await redis_client.get("mesh:conv:r17:active") == b"b"
        assert 0 < await redis_client.ttl("mesh:conv:r17:active") <= 600
        history, active = await store.load("r17", 10)
        assert [m.content for m in history] == ["t17", "re: t17"] and active == "b"
    finally:
        await store.close()


async def test_redis_loads_share_one_pipeline(redis_url: str, redis_client: Redis) -> None:
    store = RedisStore(redis_url)
    try:
        for i in range(30):
            await store.append(f"l{i}", _turn(f"t{i}"), "a" if i % 2 else "b")
        await store.load("warm", 5)  # the connection is open
        before = await redis_client.info("commandstats")
        results = await asyncio.gather(*(store.load(f"l{i}", 10) for i in range(30)))
        after = await redis_client.info("commandstats")
        for i, (history, active) in enumerate(results):
            assert [m.content for m in history] == [f"t{i}", f"re: t{i}"]
            assert active == ("a" if i % 2 else "b")
        # 30 concurrent loads: 30 LRANGEs and 30 GETs reached Redis, in one round trip
        # (the pipeline holds no EXEC: loads are not transactions).
        calls = {
            cmd: int(after[f"cmdstat_{cmd}"]["calls"]) - int(before[f"cmdstat_{cmd}"]["calls"])
            for cmd in ("lrange", "get")
        }
        assert calls == {"lrange": 30, "get": 30}
        assert store.reads == 2  # the warm-up's pipeline and the one for the 30 loads
    finally:
        await store.close()


async def test_redis_down_is_unavailable_for_every_turn_of_the_group(tmp_path: Path) -> None:
    store = RedisStore(f"unix://{tmp_path}/nothing.sock", timeout_s=2)
    try:
        results = await asyncio.gather(
            *(store.append(f"x{i}", _turn("x"), "a") for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results), results
        with pytest.raises(Unavailable):
            await store.load("x0", 10)
    finally:
        await store.close()


async def test_redis_restarted_under_the_store_serves_again(tmp_path: Path) -> None:
    """Turns while Redis is down fail UNAVAILABLE at once; once a Redis is back on the
    same address, the same store (no router restart) reads and writes again."""
    with redis_server(tmp_path) as url:
        store = RedisStore(url, timeout_s=2)
        await store.append("c", _turn("before"), "a")
    try:
        for _ in range(2):
            with pytest.raises(Unavailable, match="conversation store unavailable"):
                await store.append("c", _turn("down"), "a")
            with pytest.raises(Unavailable, match="conversation store unavailable"):
                await store.load("c", 10)
        with redis_server(tmp_path) as again:
            assert again == url
            await store.append("c", _turn("after"), "b")
            history, active = await store.load("c", 10)
            # This Redis keeps nothing across a restart; the store itself lost nothing.
            assert [m.content for m in history] == ["after", "re: after"] and active == "b"
    finally:
        await store.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_conversation_past_its_ttl_reads_as_new(kind: str, tmp_path: Path) -> None:
    """``ttl_s``: a conversation idle longer reads as new, and a turn under its id starts
    it afresh (its old messages never come back); others are untouched."""
    clock = _Clock()
    store = (
        SqliteStore(tmp_path / "c.db", ttl_s=100, clock=clock)
        if kind == "sqlite"
        else MemoryStore(100, clock=clock)
    )
    try:
        await store.append("old", _turn("one"), "a")
        assert await store.load("old", 10) == (_turn("one"), "a")  # (SQLite keeps its tail)
        clock.now += 60
        await store.append("kept", _turn("two"), "b")
        clock.now += 60  # "old" idle 120 s, "kept" 60 s
        assert await store.load("old", 10) == ([], "")
        assert await store.load("kept", 10) == (_turn("two"), "b")
        await store.append("old", _turn("three"), "c")
        assert await store.load("old", 10) == (_turn("three"), "c")
    finally:
        await store.close()
    if kind == "sqlite":
        assert _committed(tmp_path / "c.db")["old"] == [
            '{"role":"user","content":"three","agent":""}',
            '{"role":"assistant","content":"re: three","agent":"a"}',
        ]


async def test_sqlite_deletes_expired_conversations_from_its_file(tmp_path: Path) -> None:
    """The writer deletes expired conversations on its own (here a TTL of 0.2 s: the first
    sweep after it runs a second later), as another connection to the file sees."""
    path = tmp_path / "c.db"
    store = SqliteStore(path, ttl_s=0.2)
    try:
        for i in range(300):  # more than one sweep's transaction
            await store.append(f"c{i}", _turn(f"t{i}"), "a")
        async with asyncio.timeout(30):
            while store.forgotten < 300:
                await asyncio.sleep(0.05)
    finally:
        await store.close()
    assert store.forgotten == 300 and _committed(path) == {}
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM conversations").fetchone() == (0,)
    finally:
        db.close()


async def test_memory_store_sweeps_expired_conversations() -> None:
    clock = _Clock()
    store = MemoryStore(100, clock=clock)
    for i in range(5):
        await store.append(f"c{i}", _turn(f"t{i}"), "a")
    clock.now += 200  # past the TTL and the next sweep: the next append sweeps
    await store.append("new", _turn("n"), "a")
    assert store.held == 1 and await store.load("c0", 10) == ([], "")


async def test_sqlite_reads_only_what_was_stored_since_a_conversations_last_read(
    tmp_path: Path,
) -> None:
    """A conversation's next load reads the rows stored since its last one and hands out
    the same message objects again; a second store writing the same file (another
    process, say) is read like the store's own, and the window stays the newest
    ``limit``."""
    path = tmp_path / "c.db"
    store, other = SqliteStore(path), SqliteStore(path)
    try:
        expected: list[ChatMessage] = []
        previous: list[ChatMessage] = []
        for i in range(6):
            writer = other if i % 3 == 2 else store
            await writer.append("c", _turn(f"t{i}"), "a")
            expected += _turn(f"t{i}")
            loaded, active = await store.load("c", 5)
            assert loaded == expected[-5:] and active == "a"
            for message in loaded:  # what the last load had is handed out again
                assert not any(message == p and message is not p for p in previous)
            previous = loaded
        assert await store.load("c", 3) == (expected[-3:], "a")  # another window
        assert await store.load("c", 5) == (expected[-5:], "a")
    finally:
        await store.close()
        await other.close()


def test_sqlite_tails_stay_within_their_bound() -> None:
    from mesh.router._store_sqlite import _Tails

    tails = _Tails(max_bytes=2_500)
    rows = [(i, f'{{"role":"user","content":"{"x" * 300}{i}"}}') for i in range(3)]
    for name in "abcd":
        tails.record(name, 10, rows)  # about 1,100 bytes each: two fit
    assert [name for name in "abcd" if tails.tail(name, 10)] == ["c", "d"]
    assert tails.tail("d", 5) is None  # kept for another window
