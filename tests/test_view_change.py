"""View changes under client traffic (in-process, autojump clock): nothing acknowledged is
lost, shards partition the key set exactly, and tokens from before a change stay valid."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import trio

from trio_kv.config import Config
from trio_kv.testing import Cluster, add_node, open_cluster

from .helpers import get, keys_of, pending, put


class Traffic:
    """One sequential client writing (and overwriting) keys through the given nodes."""

    def __init__(self, cluster: Cluster, node_ids: list[int], keyspace: int = 200) -> None:
        self.cluster = cluster
        self.node_ids = node_ids
        self.keyspace = keyspace
        self.acked: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        self.writes = 0

    async def run(self, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        rnd = random.Random(7)
        clients = {i: self.cluster.client(i) for i in self.node_ids}
        task_status.started()
        try:
            while not stop.is_set():
                n = self.writes
                self.writes += 1
                key, value = f"t{n % self.keyspace}", f"v{n}"
                c = clients[rnd.choice(self.node_ids)]
                r = await c.put(f"/data/{key}", json={"value": value, "causal-metadata": self.meta})
                if r.status_code == 200:
                    self.acked[key] = value
                    self.meta = r.json()["causal-metadata"]
                await trio.sleep(0.01)
        finally:
            for c in clients.values():
                await c.aclose()


async def preload(cluster: Cluster, count: int, via: int = 1) -> tuple[dict[str, str], dict]:
    data = {f"p{i}": f"pre{i}" for i in range(count)}
    meta: dict = {}
    async with cluster.client(via) as c:
        for k, v in data.items():
            meta = await put(c, k, v, meta)
    return data, meta


async def all_idle(cluster: Cluster, within: float = 30.0) -> None:
    """Poll (test clock) until no node has a view change or handoff outstanding."""
    with trio.fail_after(within):
        while any(n.progress.state != "idle" for n in cluster.nodes.values()):
            await trio.sleep(0.5)


async def check(cluster: Cluster, expected: dict[str, str], meta: dict) -> None:
    """Every expected key reads back its value from every node of the view (with the token),
    and the shards' GET /data lists partition the key set exactly."""
    members = [i for ids in cluster.shards.values() for i in ids]
    for i in members:
        async with cluster.client(i) as c:
            for key, value in expected.items():
                r = await get(c, key, meta)
                assert r.status_code == 200, (i, key, r.text)
                assert r.json()["value"] == value, (i, key)
    seen: dict[str, str] = {}
    for _, ids in cluster.shards.items():
        async with cluster.client(ids[0]) as c:
            r = await c.request("GET", "/data", json={"causal-metadata": meta})
            assert r.status_code == 200
            shard_items = r.json()["items"]
        assert not set(shard_items) & set(seen), "a key is listed by two shards"
        seen.update(shard_items)
    assert seen == expected


async def change_under_traffic(
    cluster: Cluster, new: dict[str, list[int]], expected: dict[str, str], traffic_nodes: list[int]
) -> Traffic:
    traffic = Traffic(cluster, traffic_nodes)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(traffic.run, stop)
        await trio.sleep(0.5)
        await cluster.put_view(new, to=list(cluster.nodes))
        await trio.sleep(0.5)
        stop.set()
    assert traffic.writes > 20 and len(traffic.acked) > 10
    expected.update(traffic.acked)
    return traffic


async def test_grow_1_2_4_and_shrink_back_under_traffic(autojump_clock):
    async with open_cluster({"A": 2}, spare=6) as cluster:
        expected, old_meta = await preload(cluster, 300)
        shapes = [
            {"A": [1, 2], "B": [3, 4]},
            {"A": [1, 2], "B": [3, 4], "C": [5, 6], "D": [7, 8]},
            {"A": [1, 2], "B": [3, 4]},
            {"A": [1, 2]},
        ]
        meta = old_meta
        for shape in shapes:
            traffic = await change_under_traffic(cluster, shape, expected, [1, 2])
            from trio_kv.metadata import merge_deps, parse_metadata, render_metadata

            meta = render_metadata(merge_deps(parse_metadata(meta), parse_metadata(traffic.meta)))
            await check(cluster, expected, meta)
            # the token from before any change still gets causal reads
            async with cluster.client(shape["A"][0]) as c:
                assert (await get(c, "p0", old_meta)).json()["value"] == "pre0"


async def test_merge_two_shards_and_move_a_node(autojump_clock):
    async with open_cluster({"A": 2, "B": 2, "C": 2}) as cluster:
        expected, _meta = await preload(cluster, 300)
        await change_under_traffic(cluster, {"A": [1, 2, 3, 4], "C": [5, 6]}, expected, [1, 5])
        await check(cluster, expected, {})
        # node 4 moves from A to C
        await change_under_traffic(cluster, {"A": [1, 2, 3], "C": [4, 5, 6]}, expected, [1, 5])
        await check(cluster, expected, {})
        assert cluster.nodes[4].replica.shard == "C"
        c_keys = {k for k in expected if cluster.nodes[4].replica.view.shard_for(k) == "C"}
        assert set(cluster.nodes[4].replica.store.entries) == c_keys


async def test_replace_every_node(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}, spare=4) as cluster:
        expected, _meta = await preload(cluster, 300)
        await change_under_traffic(cluster, {"X": [5, 6], "Y": [7, 8]}, expected, [5, 7])
        await check(cluster, expected, {})
        for old in (1, 2, 3, 4):
            async with cluster.client(old) as c:  # removed nodes route to the new owners
                r = await c.get("/data/p1")
                assert r.status_code == 200 and r.json()["value"] == expected["p1"]
            assert len(cluster.nodes[old].replica.store) == 0, "removed nodes hand off all"


async def test_same_view_twice_moves_nothing(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}) as cluster:
        await preload(cluster, 100)
        before = {i: n.progress.keys_sent for i, n in cluster.nodes.items()}
        await cluster.put_view()
        assert {i: n.progress.keys_sent for i, n in cluster.nodes.items()} == before


async def test_progress_is_reported(autojump_clock):
    async with open_cluster({"A": 2}, spare=2) as cluster:
        await preload(cluster, 200)
        await cluster.put_view({"A": [1, 2], "B": [3, 4]}, to=list(cluster.nodes))
        async with cluster.client(1) as c:
            change = (await c.get("/view")).json()["change"]
        assert change["state"] == "idle" and change["keys_sent"] > 0
        assert change["keys_remaining"] == 0 and change["peers_pending"] == []


async def test_receiver_cut_mid_transfer_loses_nothing(autojump_clock):
    config = dataclasses.replace(Config(), handoff_batch_entries=20)
    async with open_cluster({"A": 2}, spare=2, config=config) as cluster:
        expected, meta = await preload(cluster, 300)
        new = {"A": [1, 2], "B": [3, 4]}
        cluster.network.delays = {a: 0.05 for a in cluster.addresses.values()}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.put_view, new, [1, 2, 3, 4])
            stats = cluster.nodes[1].stats  # sent by pull pages or handoffs (to 3 and 4)
            with trio.fail_after(5):
                while stats.pull_entries_served + stats.handoff_entries_sent == 0:
                    await trio.sleep(0.01)
            assert stats.pull_entries_served + stats.handoff_entries_sent < 300, "mid-way"
            cluster.network.isolate(cluster.addresses[4])  # a receiver vanishes mid-transfer
            await trio.sleep(20)
            status = cluster.nodes[1].view_status()["change"]
            assert status["state"] in ("changing", "pending")
            cluster.network.heal()
        await all_idle(cluster)
        await check(cluster, expected, meta)


async def test_sender_cut_mid_transfer_loses_nothing(autojump_clock):
    config = dataclasses.replace(Config(), handoff_batch_entries=20)
    async with open_cluster({"A": 2, "B": 2}, config=config) as cluster:
        expected, meta = await preload(cluster, 300)
        cluster.network.delays = {a: 0.05 for a in cluster.addresses.values()}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.put_view, {"A": [1, 2, 3, 4]}, [1, 2, 3, 4])
            await trio.sleep(0.3)
            assert 0 < cluster.nodes[1].progress.keys_received < 150, "mid-transfer"
            cluster.network.isolate(cluster.addresses[3])  # an old owner of B's keys
            await trio.sleep(20)
            cluster.network.heal()
        await all_idle(cluster)
        await check(cluster, expected, meta)


async def test_node_that_misses_the_view_hands_off_when_it_learns_it(autojump_clock):
    async with open_cluster({"A": 2, "B": 1}) as cluster:
        kb = keys_of(cluster, "B", 50, prefix="b")
        async with cluster.client(3) as c:
            meta: dict = {}
            for k in kb:
                meta = await put(c, k, "only-on-3", meta)
        expected, _ = await preload(cluster, 100)
        expected.update({k: "only-on-3" for k in kb})
        # node 3 is unreachable while 1 and 2 take over B's keys
        cluster.network.isolate(cluster.addresses[3])
        with trio.fail_after(30):
            await cluster.put_view({"A": [1, 2]}, to=[1, 2])
        async with cluster.client(1) as c:
            status = (await c.get("/view")).json()["change"]
            assert status["state"] == "pending" and status["pulls_pending"] == [3]
            # its keys are not lost; they are unreachable, so causal reads wait, not lie
            assert (await get(c, kb[0], meta)).status_code == 503
        cluster.network.heal()
        # it comes back, pulls complete in the background; later it also learns the view
        await all_idle(cluster)
        await cluster.put_view({"A": [1, 2]}, to=[3])
        cluster.shards = {"A": [1, 2]}
        await check(cluster, expected, meta)


async def test_views_in_any_order_never_lose_or_loop(autojump_clock):
    async with open_cluster({"A": 2}, spare=2) as cluster:
        expected, meta = await preload(cluster, 200)
        new = {"A": [1, 2], "B": [3, 4]}
        # node 3 learns first, node 1 last; traffic flows through every node meanwhile
        traffic = Traffic(cluster, [1, 2, 3, 4])
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(traffic.run, stop)
            for i in (3, 4, 2, 1):
                await cluster.put_view(new, to=[i])
                await trio.sleep(1)
            await trio.sleep(1)
            stop.set()
        expected.update(traffic.acked)
        cluster.shards = new
        await check(cluster, expected, meta)


async def test_added_node_with_no_view_accepts_handoff(autojump_clock):
    async with open_cluster({"A": 1}) as cluster:
        expected, meta = await preload(cluster, 100)
        async with trio.open_nursery() as nursery:
            add_node(cluster, nursery, 9, Config())
            await cluster.nodes[9].started.wait()
            await cluster.put_view({"A": [1], "B": [9]}, to=[1])  # 9 has no view yet
            assert len(cluster.nodes[9].replica.store) > 0
            await cluster.put_view({"A": [1], "B": [9]}, to=[9])
            await check(cluster, expected, meta)
            nursery.cancel_scope.cancel()



async def test_new_node_told_first_pulls_from_the_old_owners(autojump_clock):
    """A node with no view learns the previous view from its new peers and pulls before 200."""
    async with open_cluster({"A": 2}) as cluster:
        expected, meta = await preload(cluster, 200)
        async with trio.open_nursery() as nursery:
            add_node(cluster, nursery, 9, Config())
            await cluster.nodes[9].started.wait()
            new = {"A": [1, 2], "B": [9]}
            await cluster.put_view(new, to=[9])  # the old owners do not know yet
            view = cluster.nodes[9].replica.view
            owned = {k for k in expected if view.shard_for(k) == "B"}
            assert owned and set(cluster.nodes[9].replica.store.entries) == owned
            async with cluster.client(9) as c:
                for k in owned:
                    assert (await get(c, k)).json()["value"] == expected[k]
            # the old owners, still on the old view, were fenced by the pull: a write through
            # them lands on the new owner, so a read there (even token-less) sees it
            moved = sorted(owned)[0]
            async with cluster.client(1) as c1, cluster.client(9) as c9:
                await put(c1, moved, "after-pull")
                assert (await get(c9, moved)).json()["value"] == "after-pull"
            expected[moved] = "after-pull"
            await cluster.put_view(new, to=[1, 2])
            cluster.shards = new
            await check(cluster, expected, meta)
            nursery.cancel_scope.cancel()


async def test_waiting_read_follows_its_key_to_the_new_owner(autojump_clock):
    async with open_cluster({"A": 2}, spare=1) as cluster:
        new = {"A": [1, 2], "B": [3]}
        from trio_kv.view import parse_view

        ring = parse_view(cluster.view_body(new))
        key = next(f"m{i}" for i in range(1000) if ring.shard_for(f"m{i}") == "B")
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as c1, cluster.client(2) as c2:
            meta = await put(c1, key, "x1")  # only node 1 has it
            done = trio.Event()
            got: dict[str, Any] = {}

            async def read() -> None:
                r = await get(c2, key, meta)  # waits on node 2, which lacks it
                got["status"], got["body"] = r.status_code, r.json()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                assert await pending(done, 2)
                await cluster.put_view(new, to=[1, 2, 3])  # the key moves to node 3
                with trio.fail_after(10):
                    await done.wait()
            assert got["status"] == 200 and got["body"]["value"] == "x1"


async def test_a_handoff_still_owed_survives_the_next_view_change(autojump_clock):
    """Found by the randomized test (seed 215): node 3 joins A while cut off from A's old
    members, so it installs owing their keys; the next view keeps it in A, so that change
    pulls nothing.  The debt must outlive the change: until A's old members hand over, node 3
    answers 503 for their keys, never a stale 404, even for a token that no longer carries
    the write (it was pruned as stable on the old members)."""
    async with open_cluster({"A": 2}, spare=1) as cluster:
        async with cluster.client(1) as c1:
            meta = await put(c1, "k", "stable-on-1-and-2")
            with trio.fail_after(10):  # wait until the write is pruned from the token
                while "k" in meta.get("deps", {}):
                    meta = (await get(c1, "k", meta)).json()["causal-metadata"]
                    await trio.sleep(0.1)
        cluster.network.partition(cluster.address_of(1, 2), cluster.address_of(3))
        await cluster.put_view({"A": [1, 2, 3]}, to=[1, 2, 3])
        await cluster.put_view({"A": [2, 3]}, to=[1, 2, 3])
        async with cluster.client(3) as c3:
            status = (await c3.get("/view")).json()
            assert status["awaiting"] and status["change"]["pulls_pending"]
            r = await get(c3, "k", meta)
            assert r.status_code == 503, r.text
            cluster.network.heal()
            await all_idle(cluster)
            r = await get(c3, "k", meta)
            assert r.status_code == 200 and r.json()["value"] == "stable-on-1-and-2"
            assert (await c3.get("/view")).json()["awaiting"] == []
