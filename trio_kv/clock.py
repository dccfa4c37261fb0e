"""Causal timestamps.

A write is identified and ordered by its ``Version``: a hybrid logical clock value and the
writing node's id.  Tuple order *is* the conflict order (last writer wins, node id breaks
ties), so comparing versions never needs a helper.  The clock only moves forward and is fed
every timestamp the node sees, so a write that causally follows another always carries a
larger version: causal order implies conflict order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

LOGICAL_BITS = 16


class Version(NamedTuple):
    hlc: int
    node: int


class HybridClock:
    """Hybrid logical clock: physical milliseconds in the high bits, a counter in the low."""

    def __init__(self) -> None:
        self.last = 0

    def tick(self, now_ms: int, floor: int = 0) -> int:
        """A fresh timestamp above everything seen and above ``floor``."""
        self.last = max(now_ms << LOGICAL_BITS, self.last + 1, floor + 1)
        return self.last

    def observe(self, hlc: int) -> None:
        if hlc > self.last:
            self.last = hlc


def merge_vectors(*vectors: Mapping[str, int]) -> dict[str, int]:
    """Pointwise maximum: the join of version vectors."""
    out: dict[str, int] = {}
    for vector in vectors:
        for origin, seq in vector.items():
            if seq > out.get(origin, 0):
                out[origin] = seq
    return out


def vector_covers(big: Mapping[str, int], small: Mapping[str, int]) -> bool:
    return all(big.get(origin, 0) >= seq for origin, seq in small.items())


def max_version(versions: Iterable[Version]) -> Version | None:
    return max(versions, default=None)
