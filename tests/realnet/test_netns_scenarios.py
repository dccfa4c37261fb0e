"""Scenarios over real processes in network namespaces, with faults injected by iptables.

Each test starts its own small cluster (``netns_cluster`` fixture), drives it with recording
causal clients over real HTTP, injects faults with the chaos library, and ends with the
history checker and a convergence check.  Synchronisation is always a bounded poll on an
observable condition, never a bare sleep; sleeps appear only where a test must show that
something does *not* happen for a while (a read that must keep waiting).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from chaos.client import KVClient
from chaos.cluster import Cluster
from chaos.history import History
from trio_kv.core.forwarding import _preference
from trio_kv.view import parse_view

from .helpers import ClusterFactory, assert_causal, causal_chain_across_partition, poll

pytestmark = pytest.mark.realnet


def test_causal_chain_waits_across_partition(netns_cluster: ClusterFactory,
                                             tmp_path: Path) -> None:
    """c1 writes x on A; c2 reads x on A, writes y on B; c3 reads y on B, then x on B.

    While A is cut from B, x cannot reach B, so c3's read of x must wait (not 404, not
    stale); once healed it must answer x.
    """
    cluster = netns_cluster(3)
    history = History()
    with KVClient("c1", history) as c1, KVClient("c2", history) as c2, \
            KVClient("c3", history) as c3:
        causal_chain_across_partition(cluster, history, (c1, c2, c3))
    assert_causal(history, cluster, dump_to=tmp_path / "history.jsonl")


def test_both_sides_of_a_partition_stay_available(netns_cluster: ClusterFactory,
                                                  tmp_path: Path) -> None:
    """With 2 shards of 2 replicas split so each side keeps one replica of each shard,
    every key can be read and written on both sides, quickly, then all converges."""
    cluster = netns_cluster(4, shards=2)  # shard1 = 1,2; shard2 = 3,4
    cluster.partition([1, 3], [2, 4])
    history = History()
    keys = [f"k{i}" for i in range(12)]
    with KVClient("left", history, timeout=10) as left, \
            KVClient("right", history, timeout=10) as right:
        for i, key in enumerate(keys):
            for client, url, side in ((left, cluster.url(1 + i % 2 * 2), "L"),
                                      (right, cluster.url(2 + i % 2 * 2), "R")):
                op = client.put(url, key, f"{key}-{side}")
                assert op.status == 200, op
                assert op.end - op.start < 5, f"slow write during partition: {op}"
                back = client.get(url, key)
                assert back.value == f"{key}-{side}", back
    latencies = sorted(op.end - op.start for op in history)
    print(f"{len(latencies)} ops during the partition: median {latencies[len(latencies) // 2]:.3f}s"
          f", max {latencies[-1]:.3f}s")
    cluster.heal()
    elapsed, items = cluster.wait_converged(timeout=10)
    merged = {k: v for node_items in items.values() for k, v in (node_items or {}).items()}
    assert set(merged) == set(keys)
    assert all(merged[k] in (f"{k}-L", f"{k}-R") for k in keys)
    assert_causal(history, cluster, keys, dump_to=tmp_path / "history.jsonl")
    print(f"converged {elapsed:.2f}s after heal")


def test_isolated_replica_catches_up_after_heal(netns_cluster: ClusterFactory) -> None:
    """Writes made while a replica is isolated reach it within 10 s of heal."""
    cluster = netns_cluster(3)
    cluster.isolate(3)
    with KVClient("w") as client:
        for i in range(100):
            assert client.put(cluster.url(1 + i % 2), f"key{i}", f"v{i}").status == 200
        assert "key0" not in (cluster.items(3) or {}), "isolated node got data through a cut"
        healed = time.monotonic()
        cluster.heal()
        elapsed, items = cluster.wait_converged(timeout=10)
        assert len(items["n3"] or {}) == 100
        # and a causal read on the former isolated node sees the client's last write
        assert client.get(cluster.url(3), "key99").value == "v99"
    print(f"converged {time.monotonic() - healed:.2f}s after heal ({elapsed:.2f}s polling)")


def _sync_failures(cluster: Cluster, node_id: int) -> float:
    """Node ``node_id``'s replication calls that got no answer, from its ``/metrics``."""
    text = cluster.http.get(f"{cluster.url(node_id)}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('trio_kv_peer_call_failures_total{route="/internal/sync"}'))


@pytest.mark.parametrize("where", ["both ends", "receiver only"])
def test_a_cut_channel_fails_its_calls_long_before_their_timeout(
        netns_cluster: ClusterFactory, where: str) -> None:
    """A replication call stuck on a cut link fails once the kernel has resent for
    ``channel_stall_timeout`` with no acknowledgement, not after ``peer_timeout`` (60 s here),
    and the writes reach the cut replica soon after the heal.  Cut at both ends (the sender's
    own firewall drops its packets: they never leave) or at the receiver only (they leave
    and are lost: TCP's retransmissions)."""
    cluster = netns_cluster(3, env={"KV_PEER_TIMEOUT": "60"})
    receiver = cluster.node(3)
    drop = ["INPUT", "-s", cluster.node(1).host, "-j", "DROP"]
    with KVClient("w") as client:
        assert client.put(cluster.url(1), "warm", "up").status == 200  # channels open
        cluster.wait_converged(timeout=10)
        before = _sync_failures(cluster, 1)
        if where == "both ends":
            cluster.isolate(3)
        else:
            cluster.backend.node_exec(receiver, ["iptables", "-I", *drop])
        for i in range(10):
            assert client.put(cluster.url(1), f"key{i}", f"v{i}").status == 200
        poll(lambda: _sync_failures(cluster, 1) > before or None, timeout=15,
             what="the call stuck on the cut link to fail")
        if where == "both ends":
            cluster.heal()
        else:
            cluster.backend.node_exec(receiver, ["iptables", "-D", *drop])
        _, items = cluster.wait_converged(timeout=10)
        assert len(items["n3"] or {}) == 11


def test_a_forwarded_write_stuck_on_a_cut_channel_goes_to_the_other_replica(
        netns_cluster: ClusterFactory) -> None:
    """Node 1 forwards a write for the other shard over an open channel to the replica it
    prefers, which a partition has just cut off.  Once the stall watcher resets that channel,
    what it knows never left this host counts as not sent, so the write goes to the shard's
    other replica and succeeds, not a 503 "may or may not have been applied" at the deadline."""
    cluster = netns_cluster(4, shards=2)
    view = parse_view({"view": cluster.state.view()})
    other = next(name for name, members in view.shards.items()
                 if 1 not in {m.id for m in members})
    replicas = [m.id for m in view.shards[other]]
    preferred = min(replicas, key=lambda m: _preference(1, m))  # where node 1 forwards first
    key = next(k for k in (f"k{i}" for i in range(1000)) if view.shard_for(k) == other)
    with KVClient("w", timeout=30) as client:
        assert client.put(cluster.url(1), key, "v0").status == 200  # the channel is open
        cluster.partition([1], [preferred])
        op = client.put(cluster.url(1), key, "v1")
        assert op.status == 200, op
        assert op.end - op.start < 15, op  # wait_deadline is 20 s here
        cluster.heal()
        _, items = cluster.wait_converged(timeout=10)
        assert all((n or {}).get(key) == "v1" for n in items.values() if n and key in n)


def test_sigkill_and_restart(netns_cluster: ClusterFactory, tmp_path: Path) -> None:
    """A replica killed with SIGKILL and restarted gets the view again and all the data,
    and what it accepts after the restart wins over what it accepted before.

    The writes are left to replicate before the kill: a write acknowledged by one replica and
    not yet replicated dies with that replica's memory (the store promises no durability), which
    is not what this test is about.
    """
    cluster = netns_cluster(3)
    history = History()
    with KVClient("c1", history, timeout=20) as c1, KVClient("c2", history, timeout=20) as c2:
        for i in range(20):
            assert c1.put(cluster.url(1 + i % 3), f"a{i}", f"a{i}-1").status == 200
        assert c1.put(cluster.url(2), "z", "z-before").status == 200
        cluster.wait_converged(timeout=10)
        cluster.kill(2)
        assert not cluster.backend.alive(cluster.node(2))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{cluster.url(2)}/ping", timeout=1)
        for i in range(20):  # the survivors keep serving
            assert c2.put(cluster.url(1 + i % 2 * 2), f"b{i}", f"b{i}-1").status == 200
        cluster.restart(2)
        view = httpx.get(f"{cluster.url(2)}/view", timeout=5).json()
        assert view["id"] == 2 and view["view"] == cluster.state.view()
        _, items = cluster.wait_converged(timeout=10)
        assert len(items["n2"] or {}) == 41
        # causal reads through the restarted node see both clients' writes
        assert c1.get(cluster.url(2), "a19").value == "a19-1"
        assert c2.get(cluster.url(2), "b19").value == "b19-1"
        # a write the restarted node accepts now is causally after z-before: it must win
        assert c1.put(cluster.url(2), "z", "z-after").status == 200
        _, items = cluster.wait_converged(timeout=10)
        assert {(n or {}).get("z") for n in items.values()} == {"z-after"}
    assert_causal(history, cluster, dump_to=tmp_path / "history.jsonl")


def test_asymmetric_partition(netns_cluster: ClusterFactory, tmp_path: Path) -> None:
    """Packets from node 1 to node 2 are dropped (2 -> 1 still flows); node 3 talks to both.

    No TCP connection between 1 and 2 can complete, but data written on 1 still reaches 2
    through 3, and both ends keep serving clients.
    """
    cluster = netns_cluster(3)
    cluster.partition([1], [2], oneway=True)
    rules = cluster.backend.rules_of(cluster.node(1))  # type: ignore[attr-defined]
    assert f"-d {cluster.node(2).host}/32" in rules and f"-s {cluster.node(2).host}" not in rules
    history = History()
    with KVClient("c1", history, timeout=20) as c1, KVClient("c2", history, timeout=20) as c2:
        assert c1.put(cluster.url(1), "x", "x1").status == 200
        # c1's metadata depends on x1: a read on node 2 must return it (via node 3)
        op = c1.get(cluster.url(2), "x")
        assert op.status == 200 and op.value == "x1", op
        assert c2.put(cluster.url(2), "y", "y1").status == 200
        op = c2.get(cluster.url(1), "y")
        assert op.status == 200 and op.value == "y1", op
        poll(lambda: True if (cluster.items(2) or {}).get("x") == "x1" else None,
             timeout=10, what="x to reach node 2 through node 3")
    cluster.heal()
    assert_causal(history, cluster, dump_to=tmp_path / "history.jsonl")


def test_delayed_node(netns_cluster: ClusterFactory, tmp_path: Path) -> None:
    """A node whose every packet leaves 200 ms late stays correct and converges."""
    cluster = netns_cluster(3)
    slow = cluster.url(2)
    with httpx.Client(trust_env=False) as http:
        def ping_seconds() -> float:
            start = time.monotonic()
            http.get(f"{slow}/ping", timeout=5)
            return time.monotonic() - start

        ping_seconds()
        assert ping_seconds() < 0.15
        cluster.delay(2, 200)
        assert ping_seconds() >= 0.2
        history = History()
        with KVClient("c1", history, timeout=20) as c1, KVClient("c2", history, timeout=20) as c2:
            for i in range(10):
                assert c1.put(cluster.url(1), f"k{i}", f"k{i}-1").status == 200
                op = c1.get(slow, f"k{i}")  # waits for replication over the slow link
                assert op.value == f"k{i}-1", op
                assert c2.put(slow, f"s{i}", f"s{i}-2").status == 200
                assert c2.get(cluster.url(3), f"s{i}").value == f"s{i}-2"
            cluster.wait_converged(timeout=10)
        cluster.delay(2, 0)
        assert poll(lambda: True if ping_seconds() < 0.15 else None, timeout=5,
                    what="the delay to go away")
    assert_causal(history, cluster, dump_to=tmp_path / "history.jsonl")
