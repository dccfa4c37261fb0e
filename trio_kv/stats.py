"""Plain counters the node bumps on its slow paths; ``metrics`` reads them at scrape time.

Ints and a tiny fixed-bucket histogram, no locks and no label lookups: the node runs on one
trio thread, and a scrape reads them between two of its steps.  Nothing here is on the
path of an ordinary request (causal waits, forwarding and replication are the slow paths).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative-at-scrape histogram: counts per upper bound, plus sum and count."""

    bounds: tuple[float, ...] = WAIT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class NodeStats:
    causal_waits: int = 0
    causal_wait_timeouts: int = 0
    causal_wait_seconds: Histogram = field(default_factory=Histogram)
    waits_refused: int = 0  # max_waiting reached
    sync_sent: int = 0  # replication batches acknowledged by a peer
    sync_entries_sent: int = 0
    sync_received: int = 0
    sync_entries_received: int = 0
    forward_gave_up: int = 0  # forwarded requests answered 503 because no replica answered
    view_changes: int = 0
    # Entries this node put on the wire for view changes (each copy counted: a handoff batch
    # sent to two receivers counts twice), so a bench can compare them with what had to move.
    pull_entries_served: int = 0
    handoff_entries_sent: int = 0
    handoff_digests_sent: int = 0  # keys and versions offered (no values)
    pull_digests_sent: int = 0  # keys and versions a puller said it holds

    def waited(self, seconds: float, met: bool) -> bool:
        """Count one causal wait; returns ``met``."""
        self.causal_waits += 1
        self.causal_wait_seconds.observe(seconds)
        self.causal_wait_timeouts += not met
        return met

    def synced(self, direction: str, entries: int) -> None:
        """Count one replication batch sent (acknowledged) or received."""
        if direction == "sent":
            self.sync_sent += 1
            self.sync_entries_sent += entries
        else:
            self.sync_received += 1
            self.sync_entries_received += entries
