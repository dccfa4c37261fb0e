"""The replica's data: one current version per key, and a replication stream over them.

Every time a key's current version changes here (a local write, or a merge that wins), the
entry gets the next sequence number of this replica's *stream*.  The stream therefore holds
each key once, at the position of its latest change, and "everything after seq n" is exactly
what a peer that has seen this stream up to n may be missing.  A peer's claim "seen up to n"
plus ``entry.seq <= n`` proves that peer holds the key at a version at least as new.

Keys are also kept in ring order (``HashOrder``), so a view change reads the keys of a hash
range without walking, let alone sorting, the whole store.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import orjson

from .clock import Version
from .metadata import Deps, token_bytes
from .ring import key_hash

Ranges = list[tuple[int, int]]  # half-open hash ranges, ascending, disjoint


@dataclass(slots=True)
class Entry:
    version: Version
    value: str | None  # None is a tombstone: deletes replicate and converge like writes
    deps: Deps  # causal past of the write (other keys), carried to readers
    seq: int = 0  # position in this replica's stream
    source: str = ""  # origin stream we merged it from ("" for local writes)
    encoded: int = field(default=-1, compare=False, repr=False)  # cache for ``size``

    @property
    def size(self) -> int:
        """Bytes this entry takes in a peer message, less its key: JSON escaping counted, so
        batches bounded by it stay below the receiver's cap.  Cached: entries never change."""
        if self.encoded < 0:
            deps = token_bytes(self.deps) if self.deps else 4
            self.encoded = len(orjson.dumps(self.value)) + deps + 48
        return self.encoded

    def wire_size(self, key: str) -> int:
        return self.size + len(orjson.dumps(key))


def _rank(entry: Entry) -> tuple[Version, bool, str]:
    """Total conflict order: the version, then (for equal versions, which only a reused write
    id could produce) the value, so every replica still picks the same winner."""
    return entry.version, entry.value is not None, entry.value or ""


class HashOrder:
    """Keys sorted by ``(key_hash, key)``, kept as they are written and removed.

    Writes append (O(1)); the next read sorts the appended tail into place (timsort merges a
    sorted run with a short one in linear time, in C).  Removed keys stay until the list is
    more than half dead, and are skipped when read.  Measured against sorting the store per
    pull page, see bench/README.md (resharding)."""

    def __init__(self) -> None:
        self._items: list[tuple[int, str]] = []
        self._tail = 0  # items appended since the last sort (at the end of ``_items``)

    def add(self, key: str) -> None:
        self._items.append((key_hash(key), key))
        self._tail += 1

    def _settle(self, live: Mapping[str, object]) -> list[tuple[int, str]]:
        if len(self._items) > 2 * len(live) + 1024:
            self._items = sorted((key_hash(k), k) for k in live)
            self._tail = 0
        elif self._tail:
            self._items.sort()
            self._tail = 0
        return self._items

    def walk(
        self, live: Mapping[str, object], ranges: Ranges, after: str = ""
    ) -> Iterator[str]:
        """Live keys hashing into ``ranges``, in ring order, after the key ``after`` ("":
        from the start).  Do not write to the store while walking."""
        items = self._settle(live)
        pos = (key_hash(after), after) if after else (-1, "")
        last = None
        for start, end in ranges:
            if end <= pos[0]:
                continue
            i = bisect.bisect_right(items, pos) if start <= pos[0] else bisect.bisect_left(
                items, (start, "")
            )
            n = len(items)
            while i < n:
                h, key = items[i]
                if h >= end:
                    break
                i += 1
                if key != last and key in live:
                    last = key
                    yield key


class Store:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.order = HashOrder()
        self._stream: dict[int, str] = {}  # seq -> key, insertion order == seq order
        self._seqs: list[int] = []  # ascending, may hold dead seqs until compacted
        self.head = 0
        # What changed since the shell last persisted (None: not tracked, memory-only node):
        # key -> its new entry, or None when it was removed.
        self.changes: dict[str, Entry | None] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def _restamp(self, key: str, entry: Entry) -> None:
        self._stream.pop(entry.seq, None)
        self.head += 1
        entry.seq = self.head
        self._stream[self.head] = key
        self._seqs.append(self.head)
        if len(self._seqs) > 2 * len(self._stream) + 1024:
            self._seqs = list(self._stream)

    def put(self, key: str, entry: Entry) -> bool:
        """Install ``entry`` if it wins over the current one (last writer wins); True if it did."""
        current = self.entries.get(key)
        if current is not None:
            if _rank(entry) <= _rank(current):
                return False
            self._stream.pop(current.seq, None)
        else:
            self.order.add(key)
        entry.seq = 0
        self.entries[key] = entry
        self._restamp(key, entry)
        if self.changes is not None:
            self.changes[key] = entry
        return True

    def touch(self, key: str) -> None:
        """Move ``key`` to the head of the stream (peers are sent it again)."""
        entry = self.entries.get(key)
        if entry is not None:
            self._restamp(key, entry)

    def remove(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._stream.pop(entry.seq, None)
            if self.changes is not None:
                self.changes[key] = None

    def walk(self, ranges: Ranges, after: str = "") -> Iterator[str]:
        """Keys hashing into ``ranges`` in ring order (``HashOrder.walk``)."""
        return self.order.walk(self.entries, ranges, after)

    def since(self, after: int) -> Iterator[tuple[int, str, Entry]]:
        """Current entries whose stream position is after ``after``, in stream order."""
        seqs = self._seqs
        for i in range(bisect.bisect_right(seqs, after), len(seqs)):
            seq = seqs[i]
            key = self._stream.get(seq)
            if key is not None:
                yield seq, key, self.entries[key]
