"""Consistent hashing with virtual nodes, derived only from the shard names of a view."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from hashlib import blake2b

HASH_SPACE = 1 << 64


def key_hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """Each shard owns ``vnodes`` points; a key belongs to the first point at or after its hash.

    The ring depends on shard names only, so nodes moving between shards move no keys, and
    adding or removing one of S shards moves about 1/S of the keys.
    """

    def __init__(self, shards: Iterable[str], vnodes: int) -> None:
        points = sorted(
            (key_hash(f"{shard}\x00{i}"), shard) for shard in set(shards) for i in range(vnodes)
        )
        if not points:
            raise ValueError("a ring needs at least one shard")
        self.positions = [p for p, _ in points]
        self.owners = [s for _, s in points]

    def shard_for(self, key: str) -> str:
        i = bisect.bisect_left(self.positions, key_hash(key))
        return self.owners[i % len(self.owners)]

    def segments(self) -> list[tuple[int, int, str]]:
        """Half-open hash ranges ``(start, end, shard)`` covering the whole space.

        The range before the first point wraps: it belongs to the first point's shard.
        """
        out: list[tuple[int, int, str]] = []
        start = 0
        for pos, shard in zip(self.positions, self.owners, strict=True):
            out.append((start, pos + 1, shard))
            start = pos + 1
        out.append((start, HASH_SPACE, self.owners[0]))
        return out
