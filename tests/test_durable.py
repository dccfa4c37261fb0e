"""Durable state, in process (autojump clock, a data directory per node under tmp_path):
the engine and persister on their own, then clusters whose nodes crash and restart."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
import trio

from trio_kv import snapshot
from trio_kv.clock import Version
from trio_kv.config import Config
from trio_kv.handoff import Report
from trio_kv.persist import Persister, PersistFailed
from trio_kv.replica import Replica
from trio_kv.storage import Storage, StorageError
from trio_kv.store import Entry
from trio_kv.testing import open_cluster, restart_node
from trio_kv.view import parse_view

from .helpers import converged, get, keys_of, put


def _view(shards: dict[str, list[int]]) -> dict:
    return {"view": {s: [{"address": f"10.0.0.{i}:8081", "id": i} for i in ids]
                     for s, ids in shards.items()}}


# ---------------------------------------------------------------- engine and persister
async def _reopen(tmp_path, node_id: int = 1) -> Replica:
    replica = Replica(node_id, f"{node_id}.x")
    p = Persister(Storage(tmp_path, node_id), "batch")
    await p.open(replica, 128)
    await trio.to_thread.run_sync(p.storage.close)  # type: ignore[union-attr]
    return replica


async def test_values_tombstones_deps_clock_and_view_state_survive_a_reopen(tmp_path):
    replica = Replica(1, "1.a")
    p = Persister(Storage(tmp_path, 1), "batch")
    await p.open(replica, 128)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        old = parse_view(_view({"A": [1, 2]}))
        new = parse_view(_view({"A": [1], "B": [2, 3]}))
        replica.install_view(old)
        replica.write("x", "1", {}, 1000)
        replica.write("y", "2", {"x": Version(5, 1)}, 1000)
        replica.write("x", None, {}, 1000)  # tombstone
        replica.merge([("z", Entry(Version(99 << 16, 2), "3", {}))])
        pulls = replica.begin_change(old, new, True)  # a change under way, with pulls
        fencing = parse_view(_view({"A": [2], "B": [1, 3]}))
        replica.custody.fence(fencing, [(old, "A")], replica.view)
        p.state_dirty = True
        await p.commit(replica)
        nursery.cancel_scope.cancel()
    back = await _reopen(tmp_path)
    assert back.store.get("x").value is None and back.store.get("x").version.node == 1
    assert back.store.get("y").deps == {"x": Version(5, 1)}
    assert back.store.get("z").version == Version(99 << 16, 2)
    assert back.clock.last >= replica.clock.last
    assert back.view is not None and back.view.view_id == old.view_id and back.peers
    assert back.epoch == replica.epoch and back.epochs.target == replica.epochs.target
    assert snapshot.dump(back) == snapshot.dump(replica)
    assert set(back.custody.pulls) == {(p.member.id, p.debt.ident)
                                       for p in pulls}
    assert back.custody.fences and back.fence_for("x") is not None


async def test_group_commit_shares_fsyncs_and_always_does_not(tmp_path):
    for mode, expect_shared in (("batch", True), ("always", False)):
        replica = Replica(1, "1.a")
        p = Persister(Storage(tmp_path / mode, 1), mode)
        await p.open(replica, 128)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.run)

            async def writer(i: int, p: Persister = p, replica: Replica = replica) -> None:
                replica.write(f"k{i}", "v", {}, 1000)
                await p.commit(replica)

            async with trio.open_nursery() as writers:
                for i in range(50):
                    writers.start_soon(writer, i)
            nursery.cancel_scope.cancel()
        assert (p.commits < 50) == expect_shared, (mode, p.commits)
        assert len((await _reopen(tmp_path / mode)).store) == 50


async def test_damaged_truncated_and_foreign_files_are_refused_by_name(tmp_path):
    await _reopen(tmp_path / "ok")
    path = tmp_path / "ok" / "kv.sqlite"
    with pytest.raises(StorageError, match="belongs to node 1"):
        await _reopen(tmp_path / "ok", node_id=2)
    data = path.read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "kv.sqlite").write_bytes(data[:5000])
    with pytest.raises(StorageError, match=r"trunc/kv\.sqlite"):
        await _reopen(tmp_path / "trunc")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "kv.sqlite").write_bytes(b"")
    with pytest.raises(StorageError, match=r"empty/kv\.sqlite: empty"):
        await _reopen(tmp_path / "empty")
    (tmp_path / "alien").mkdir()
    sqlite3.connect(tmp_path / "alien" / "kv.sqlite").execute("CREATE TABLE t (a)").close()
    with pytest.raises(StorageError, match=r"alien/kv\.sqlite: not a trio-kv data file"):
        await _reopen(tmp_path / "alien")


def test_a_push_overtaken_by_a_newer_one_is_not_merged():
    """After a tombstone is collected, an older push still in the network must not bring
    the deleted value back (tombstones.py relies on this)."""
    view = parse_view(_view({"A": [1, 2]}))
    a, b = Replica(1, "1.a"), Replica(2, "2.b")
    for r in (a, b):
        r.install_view(view)
    b.write("k", "old", {}, 1000)
    stale = b.batch_for(1)  # built now, delivered last
    a.on_sync(b.batch_for(1))
    b.on_sync(a.batch_for(2))
    a.write("k", None, {}, 2000)
    b.on_sync(a.batch_for(2))
    a.on_sync_reply(2, b.on_sync(a.batch_for(2))[0])
    a.on_sync(b.batch_for(1))  # b's own push: claims a's stream past the tombstone
    a.store.remove("k")  # collected
    assert stale is not None
    _reply, changed = a.on_sync(stale)
    assert changed == [] and a.store.get("k") is None


def test_pulled_report_roundtrips_through_snapshot():
    old = parse_view(_view({"A": [1, 2]}))
    new = parse_view(_view({"A": [2], "B": [1, 3]}))
    r = Replica(3, "3.a")
    pulls = r.begin_change(old, new, False)
    assert pulls
    r.custody.pulled(pulls[0], Report(old, "A"))
    back = Replica(3, "3.b")
    snapshot.restore(back, snapshot.dump(r), 128)
    assert snapshot.dump(back) == snapshot.dump(r)


# ---------------------------------------------------------------- clusters
async def test_restarted_nodes_keep_data_view_and_epoch_without_a_new_put_view(
    autojump_clock, tmp_path
):
    async with open_cluster({"A": 2, "B": 2}, data_root=str(tmp_path)) as cluster:
        assert cluster.nursery is not None
        meta: dict = {}
        async with cluster.client(1) as c:
            for i in range(40):
                meta = await put(c, f"k{i}", f"v{i}", meta)
            r = await c.request("DELETE", "/data/k0", json={"causal-metadata": meta})
            assert r.status_code == 200
        epochs = {i: n.replica.epoch for i, n in cluster.nodes.items()}
        for i in list(cluster.nodes):  # the whole cluster goes down, then comes back
            cluster.scopes[i].cancel()
        for i in list(cluster.nodes):
            await restart_node(cluster, cluster.nursery, i)
        for i, node in cluster.nodes.items():
            assert node.replica.view is not None and node.replica.epoch == epochs[i]
        async with cluster.client(3) as c:
            for i in range(1, 40):
                r = await get(c, f"k{i}", meta)
                assert r.status_code == 200 and r.json()["value"] == f"v{i}", r.text
            assert (await get(c, "k0", meta)).status_code == 404
        a = await converged(cluster, [1, 2])
        b = await converged(cluster, [3, 4])
        assert len(a) + len(b) == 39


async def test_clock_never_reissues_a_version_after_a_restart_with_a_clock_gone_back(
    autojump_clock, tmp_path
):
    async with open_cluster({"A": 1}, data_root=str(tmp_path)) as cluster:
        assert cluster.nursery is not None
        async with cluster.client(1) as c:
            await put(c, "x", "before")
        first = cluster.nodes[1].replica.store.get("x").version
        node = await restart_node(cluster, cluster.nursery, 1)
        real = node.wall_ms
        node.wall_ms = lambda: real() - 3_600_000  # an hour back
        async with cluster.client(1) as c:
            second = await put(c, "x", "after")
            assert node.replica.store.get("x").version > first
            assert (await get(c, "x", second)).json()["value"] == "after"


async def test_wiped_node_is_refilled_by_its_peers(autojump_clock, tmp_path):
    async with open_cluster({"A": 3}, data_root=str(tmp_path)) as cluster:
        assert cluster.nursery is not None
        async with cluster.client(1) as c:
            for i in range(30):
                await put(c, f"k{i}", f"v{i}")
        await converged(cluster, [1, 2, 3])
        node = await restart_node(cluster, cluster.nursery, 3, wipe=True)
        assert node.replica.view is None and len(node.replica.store) == 0
        await cluster.put_view(to=[3])  # a wiped node does not know its view
        assert len(await converged(cluster, [1, 2, 3])) == 30
        node = await restart_node(cluster, cluster.nursery, 3)  # and it is durable again
        assert len(node.replica.store) == 30


async def test_restart_in_the_middle_of_a_view_change_resumes_it(autojump_clock, tmp_path):
    config = Config(view_change_deadline=30.0)
    async with open_cluster({"A": 2}, config=config, spare=1,
                            data_root=str(tmp_path)) as cluster:
        assert cluster.nursery is not None
        data = {}
        meta: dict = {}
        async with cluster.client(1) as c:
            for i in range(40):
                data[f"k{i}"] = f"v{i}"
                meta = await put(c, f"k{i}", f"v{i}", meta)
        await converged(cluster, [1, 2])
        cluster.network.cut(*cluster.address_of(3, 2))  # node 3 cannot pull from 2 yet

        async def change() -> None:
            await cluster.put_view({"A": [1], "B": [2, 3]}, to=[3])

        cluster.nursery.start_soon(change)
        with trio.fail_after(5):
            while cluster.nodes[3].replica.custody.target is None:
                await trio.sleep(0.1)
        await trio.sleep(1)
        node = await restart_node(cluster, cluster.nursery, 3)  # crash mid-change
        assert node.replica.custody.target is not None
        assert node.replica.custody.pulls, "its pulls were persisted and are resumed"
        cluster.network.heal()
        await cluster.put_view({"A": [1], "B": [2, 3]}, to=[1, 2, 3])
        cluster.shards = {"A": [1], "B": [2, 3]}
        b = await converged(cluster, [2, 3], within=30)
        a = await converged(cluster, [1])
        assert {**a, **b} == data
        for key in keys_of(cluster, "B", 3):
            async with cluster.client(3) as c:
                r = await get(c, key, meta)
                assert r.status_code in (200, 404), r.text


async def test_a_collected_tombstone_never_comes_back(autojump_clock, tmp_path):
    """Partition, delete, collect, heal: the replica that held the old value does not bring
    it back, not even after both restart."""
    config = Config(tombstone_grace=0.0, tombstone_interval=0.5)
    async with open_cluster({"A": 3}, config=config, data_root=str(tmp_path)) as cluster:
        assert cluster.nursery is not None
        async with cluster.client(1) as c:
            meta = await put(c, "gone", "old")
            await converged(cluster, [1, 2, 3])
            cluster.network.isolate(cluster.addresses[3])
            r = await c.request("DELETE", "/data/gone", json={"causal-metadata": meta})
            assert r.status_code == 200
            meta = r.json()["causal-metadata"]
            await trio.sleep(5)
            assert cluster.nodes[1].replica.store.get("gone") is not None, \
                "not collected while a replica may still hold the old value"
            cluster.network.heal()
            with trio.fail_after(30):
                while any(n.replica.store.get("gone") is not None
                          for n in cluster.nodes.values()):
                    await trio.sleep(0.5)
            assert sum(n.core.tombstones_collected for n in cluster.nodes.values()) == 3
            for i in (1, 2, 3):
                await restart_node(cluster, cluster.nursery, i)
            await trio.sleep(10)
            for i in (1, 2, 3):
                async with cluster.client(i) as ci:
                    assert (await get(ci, "gone", meta)).status_code == 404
                assert cluster.nodes[i].replica.store.get("gone") is None
            assert (await converged(cluster, [1, 2, 3])) == {}


async def test_memory_only_nodes_still_restart_empty(autojump_clock, tmp_path):
    config = dataclasses.replace(Config(), durability="none", data_dir=str(tmp_path / "x"))
    async with open_cluster({"A": 1}, config=config) as cluster:
        assert cluster.nursery is not None
        async with cluster.client(1) as c:
            await put(c, "x", "1")
        node = await restart_node(cluster, cluster.nursery, 1)
        assert node.replica.view is None and not (tmp_path / "x").exists()


async def test_a_commit_that_hangs_stops_the_writer_loudly(tmp_path):
    """A stuck disk (an fsync that never returns) must not hold acks forever: past
    max_commit_seconds the commit fails, its waiter learns it, and the writer stops."""
    import threading

    replica = Replica(1, "1.a")
    p = Persister(Storage(tmp_path, 1), "batch", max_commit_seconds=0.3)
    await p.open(replica, 128)
    release = threading.Event()
    real_commit = p.storage.commit  # type: ignore[union-attr]

    def stuck_commit(*args):
        release.wait(10)
        return real_commit(*args)

    p.storage.commit = stuck_commit  # type: ignore[union-attr,method-assign]
    failures: list[BaseException] = []

    async def writer() -> None:
        try:
            await p.run()
        except PersistFailed as exc:
            failures.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            replica.write("k", "v", {}, 1000)
            with pytest.raises(PersistFailed, match="max_commit_seconds"):
                await p.commit(replica)
    assert failures and p.closed and p.stopped.is_set()
    release.set()
