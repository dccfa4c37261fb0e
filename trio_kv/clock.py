"""Causal timestamps.

A write is identified and ordered by its ``Version``: a hybrid logical clock value and the
writing node's id.  Tuple order *is* the conflict order (last writer wins, node id breaks
ties), so comparing versions never needs a helper.  The clock only moves forward and is fed
every timestamp the node sees, so a write that causally follows another always carries a
larger version: causal order implies conflict order.
"""

from __future__ import annotations

from typing import NamedTuple

LOGICAL_BITS = 16


class Version(NamedTuple):
    hlc: int
    node: int


class HybridClock:
    """Hybrid logical clock: physical milliseconds in the high bits, a counter in the low."""

    def __init__(self) -> None:
        self.last = 0

    def peek(self, now_ms: int, floor: int = 0) -> int:
        """What ``tick`` would return, without taking it."""
        return max(now_ms << LOGICAL_BITS, self.last + 1, floor + 1)

    def tick(self, now_ms: int, floor: int = 0) -> int:
        """A fresh timestamp above everything seen and above ``floor``."""
        self.last = self.peek(now_ms, floor)
        return self.last

    def observe(self, hlc: int) -> None:
        if hlc > self.last:
            self.last = hlc
