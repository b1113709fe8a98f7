"""Histories an agent keeps per Chat stream, so the router sends only what is new.

The router owns conversation memory and sends each turn's history to the agent. On a
pooled stream, the same conversation's next turn mostly repeats that history (the
window moves on by the turn's two messages). An agent that says so in its Chat
response headers (``mesh-history: kept``) keeps, per stream, the history of the last
turn of each of the :data:`KEEP` conversations it carried most recently; the router
keeps the same record of what it sent on that stream and marks in a turn which kept
messages its history starts with (``Turn.kept``), sending only the rest.

Both sides update their record in the order the turns travel on the stream, by the
same rule, so they agree; a record is never shared between streams (a stream is one
caller's: the router pools agent streams per delegated token). The agent also bounds
its record's size; the router's bound is lower, so the agent never drops what the
router still counts on. If it ever did, the agent refuses the turn (FAILED_PRECONDITION,
``HISTORY_NOT_KEPT``) and the router sends it again, whole, on a new stream.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from operator import attrgetter

from mesh.providers.base import ChatMessage

HEADER = "mesh-history"
"""The Chat response header by which an agent says it keeps histories."""
HEADER_VALUE = "kept"
KEEP = 8
"""Conversations whose last history is kept per stream (part of the contract)."""
ROUTER_BYTES = 1 << 20
"""The router counts on at most this much kept history per stream (an agent keeps up to
its largest message size, 4 MiB by default)."""
_size_of = attrgetter("size")
_MAX_SKIP = 64
"""How far into a kept history its overlap is looked for (a window moves on by a turn's
few messages; this bounds the search for a history of many equal messages)."""


def size(messages: Sequence[ChatMessage]) -> int:
    """The measure both sides bound a record by (``ChatMessage.size``, kept per message)."""
    return sum(map(_size_of, messages))


class KeptHistories:
    """The last history of each of the ``keep`` (``KEEP``; None: any number) most recent
    conversations, within ``max_bytes`` (the oldest dropped first)."""

    __slots__ = ("_bytes", "_kept", "_sizes", "keep", "max_bytes")

    def __init__(self, max_bytes: int, keep: int | None = KEEP) -> None:
        self.max_bytes = max_bytes
        self.keep = keep
        self._kept: OrderedDict[str, tuple[ChatMessage, ...]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0

    def __contains__(self, conversation: str) -> bool:
        return conversation in self._kept

    def get(self, conversation: str) -> tuple[ChatMessage, ...] | None:
        return self._kept.get(conversation)

    def put(self, conversation: str, history: Sequence[ChatMessage]) -> None:
        """Record ``history`` as the conversation's last one (the newest record)."""
        self.drop(conversation)
        measure = size(history)
        self._kept[conversation] = tuple(history)
        self._sizes[conversation] = measure
        self._bytes += measure
        keep = len(self._kept) if self.keep is None else self.keep
        while len(self._kept) > keep or (self._bytes > self.max_bytes and self._kept):
            oldest = next(iter(self._kept))
            self.drop(oldest)

    def drop(self, conversation: str) -> None:
        if self._kept.pop(conversation, None) is not None:
            self._bytes -= self._sizes.pop(conversation)


def overlap(kept: Sequence[ChatMessage], history: Sequence[ChatMessage]) -> tuple[int, int]:
    """(skip, count): ``history`` starts with ``kept[skip:skip + count]``, which runs to
    the end of ``kept``; (0, 0) when no tail of ``kept`` starts ``history``.

    Looked for by identity first (a store hands out the same message objects turn after
    turn), then by value (messages decoded again are equal, not the same)."""
    if not kept or not history:
        return 0, 0
    first = history[0]
    starts = range(min(len(kept), _MAX_SKIP))
    for skip in itertools.chain(
        (i for i in starts if kept[i] is first), (i for i in starts if kept[i] == first)
    ):
        count = len(kept) - skip
        # Tuples compare in C, each pair by identity first.
        if count <= len(history) and tuple(kept[skip:]) == tuple(history[:count]):
            return skip, count
    return 0, 0


def resolve(
    kept: tuple[ChatMessage, ...] | None, skip: int, count: int
) -> tuple[ChatMessage, ...] | None:
    """The kept messages a turn names, or None when they are not kept."""
    if kept is None or count < 1 or skip + count > len(kept):
        return None
    return kept[skip : skip + count]
