"""Helpers for the real-network scenarios: bounded polling and history assertions."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from chaos.client import KVClient
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


def causal_chain_across_partition(cluster: Cluster, history: History,
                                  clients: tuple[KVClient, KVClient, KVClient],
                                  hold: float = 2.0) -> None:
    """c1 writes x on node 1; c2 reads x there and writes y on node 2; c3 reads y on node 2,
    then x there.  With 1 cut from 2 and 3, c3's read of x must wait (not 404, not stale) for
    at least ``hold`` seconds, then answer x within 10 s of the heal."""
    c1, c2, c3 = clients
    a, b = cluster.url(1), cluster.url(2)
    cluster.partition([1], [2, 3])
    assert c1.put(a, "x", "x1").status == 200
    assert c2.get(a, "x").value == "x1"
    assert c2.put(b, "y", "y1").status == 200  # B accepts a write that depends on x
    assert c3.get(b, "y").value == "y1"  # y is on B; reading it waits for nothing
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(c3.get, b, "x")
        time.sleep(hold)  # must still be waiting: x cannot have reached B
        assert not pending.done(), f"read of x answered during the cut: {pending.result()}"
        healed = time.monotonic()
        cluster.heal()
        op = pending.result(timeout=30)
    assert op.status == 200 and op.value == "x1", op
    assert op.end - healed < 10, f"answered {op.end - healed:.1f}s after heal"
    assert op.end - started >= hold
