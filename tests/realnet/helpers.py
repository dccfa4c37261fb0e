"""Helpers for the real-network scenarios: bounded polling and history assertions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from chaos.cluster import Cluster
from chaos.history import History, check, merged_state

T = TypeVar("T")
ClusterFactory = Callable[..., Cluster]
"""``factory(n, shards=1, env=None, **options) -> Cluster`` (the cluster fixtures)."""


def poll(probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1,
         what: str) -> T:
    """Call ``probe`` until it returns non-None; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def assert_causal(history: History, cluster: Cluster | None = None,
                  keys: Iterable[str] | None = None, dump_to: Path | None = None) -> None:
    """Run the checker (with the converged state of ``keys`` if a cluster is given)."""
    final = None
    if cluster is not None:
        _, items = cluster.wait_converged(timeout=10)
        merged = merged_state(items)
        wanted = set(keys) if keys is not None else {op.key for op in history if op.key}
        final = {k: merged.get(k) for k in wanted}
    anomalies = check(history, final)
    if anomalies and dump_to is not None:
        history.dump(dump_to)
    assert not anomalies, "causal anomalies:\n" + "\n".join(str(a) for a in anomalies[:20])
