"""In-process cluster tests: causality, partitions, convergence (autojump clock)."""

from __future__ import annotations

import json

import trio

from trio_kv.testing import open_cluster

from .helpers import converged, get, keys_of, pending, put


async def test_causal_chain_waits_across_partition_then_answers(autojump_clock):
    async with open_cluster({"S": 2}) as cluster:
        a, b = cluster.address_of(1, 2)
        cluster.network.cut(a, b)
        async with cluster.client(1) as on_a, cluster.client(2) as on_b:
            await put(on_a, "x", "x1")  # client 1 writes x on A
            r = await get(on_a, "x")  # client 2 reads x on A ...
            assert r.json()["value"] == "x1"
            meta2 = await put(on_b, "y", "y1", r.json()["causal-metadata"])  # ... writes y on B
            assert "x" in meta2["deps"]
            r = await get(on_b, "y")  # client 3 reads y on B
            assert r.json()["value"] == "y1"
            meta3 = r.json()["causal-metadata"]
            assert "x" in meta3["deps"], "the value's dependencies travel with it"
            result: dict[str, object] = {}
            done = trio.Event()

            async def read_x() -> None:
                resp = await get(on_b, "x", meta3)
                result["status"], result["body"] = resp.status_code, resp.json()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_x)
                assert await pending(done, 10.0), "read of x must wait while A-B is cut"
                cluster.network.heal()
                with trio.fail_after(5):
                    await done.wait()
            assert result["status"] == 200 and result["body"]["value"] == "x1"


async def test_wait_is_bounded_by_the_deadline(autojump_clock):
    async with open_cluster({"S": 2}) as cluster:
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_a, cluster.client(2) as on_b:
            meta = await put(on_a, "x", "1")
            start = trio.current_time()
            r = await get(on_b, "x", meta)
            assert r.status_code == 503
            assert "causal dependencies not yet available" in r.json()["error"]
            assert 29 <= trio.current_time() - start <= 35
            assert r.json()["causal-metadata"] == meta


async def test_both_sides_of_a_partition_accept_writes_and_converge(autojump_clock):
    async with open_cluster({"S": 3}) as cluster:
        n1, n2, n3 = cluster.address_of(1, 2, 3)
        cluster.network.partition([n1], [n2, n3])
        async with cluster.client(1) as left, cluster.client(3) as right:
            await put(left, "k", "left")
            await put(right, "k", "right")
            await put(left, "only-left", "1")
            await put(right, "only-right", "2")
            assert (await get(left, "k")).json()["value"] == "left"
            assert (await get(right, "k")).json()["value"] == "right"
        cluster.network.heal()
        final = await converged(cluster, [1, 2, 3], within=10)
        assert final["only-left"] == "1" and final["only-right"] == "2"
        assert final["k"] in ("left", "right")


async def test_far_side_of_partition_answers_404_without_dependency(autojump_clock):
    async with open_cluster({"S": 2}) as cluster:
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_a, cluster.client(2) as on_b:
            await put(on_a, "x", "1")
            with trio.fail_after(1):
                r = await get(on_b, "x")
            assert r.status_code == 404
            assert r.json()["causal-metadata"] == {}
            assert "error" in r.json()


async def test_no_false_dependencies(autojump_clock):
    """A client that read key a on replica 1 reads key c on a replica cut from 1 at once."""
    async with (
        open_cluster({"S": 3}) as cluster,
        cluster.client(1) as on_1,
        cluster.client(2) as on_2,
    ):
        await put(on_1, "c", "c-old")
        await converged(cluster, [1, 2, 3])
        cluster.network.cut(*cluster.address_of(1, 2))
        await put(on_1, "a", "a1")  # not on replica 2
        meta = (await get(on_1, "a")).json()["causal-metadata"]
        assert "a" in meta["deps"]
        with trio.fail_after(0.5):
            r = await get(on_2, "c", meta)
        assert r.status_code == 200 and r.json()["value"] == "c-old"


async def test_get_all_waits_for_dependencies_in_its_shard(autojump_clock):
    async with open_cluster({"S": 2}) as cluster:
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_a, cluster.client(2) as on_b:
            meta = await put(on_a, "x", "1")
            done = trio.Event()
            got: dict[str, object] = {}

            async def list_all() -> None:
                r = await on_b.request("GET", "/data", json={"causal-metadata": meta})
                got.update(r.json())
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(list_all)
                assert await pending(done, 5)
                cluster.network.heal()
            assert got["items"] == {"x": "1"}


async def test_metadata_by_header(autojump_clock):
    async with open_cluster({"S": 2}) as cluster:
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_a, cluster.client(2) as on_b:
            meta = await put(on_a, "x", "1")
            with trio.move_on_after(3) as scope:
                await on_b.get("/data/x", headers={"X-Causal-Metadata": json.dumps(meta)})
            assert scope.cancelled_caught, "the header's dependency makes the read wait"
            cluster.network.heal()
            r = await on_b.get("/data/x", headers={"X-Causal-Metadata": json.dumps(meta)})
            assert r.status_code == 200 and r.json()["value"] == "1"
            r = await on_b.get("/data/x", headers={"X-Causal-Metadata": "[1,2]"})
            assert r.status_code == 400


async def test_deletes_replicate_and_never_resurrect(autojump_clock):
    async with (
        open_cluster({"S": 3}) as cluster,
        cluster.client(1) as on_1,
        cluster.client(2) as on_2,
    ):
        await put(on_1, "k", "v1")
        await converged(cluster, [1, 2, 3])
        cluster.network.isolate(cluster.addresses[1])
        r = await on_1.request("DELETE", "/data/k")
        assert r.status_code == 200
        meta = r.json()["causal-metadata"]
        assert (await get(on_1, "k")).status_code == 404
        assert (await get(on_2, "k")).json()["value"] == "v1"  # not there yet
        cluster.network.heal()
        assert "k" not in await converged(cluster, [1, 2, 3])
        r = await get(on_2, "k", meta)
        assert r.status_code == 404
        assert (await on_2.request("DELETE", "/data/k")).status_code == 404
        # an old version arriving again changes nothing (anti-entropy re-ships it)
        for node in cluster.nodes.values():
            node.resync()  # forces a full re-exchange
        await trio.sleep(3)
        assert "k" not in await converged(cluster, [1, 2, 3])
        await put(on_2, "k", "v2", meta)  # a write after the delete brings it back
        assert (await converged(cluster, [1, 2, 3]))["k"] == "v2"


async def test_delete_of_a_missing_key_is_404(autojump_clock):
    async with open_cluster({"S": 1}) as cluster, cluster.client(1) as c:
        r = await c.delete("/data/nope")
        assert r.status_code == 404 and "error" in r.json()


async def test_metadata_stays_flat_over_10000_distinct_writes(autojump_clock):
    """The token holds only writes still in flight: its size does not grow with the keys."""
    async with open_cluster({"S": 3}) as cluster, cluster.client(1) as c:
        meta: dict = {}
        sizes = []
        for i in range(10_000):
            meta = await put(c, f"key-{i}", "v", meta)
            sizes.append(len(json.dumps(meta)))
        first, second = max(sizes[:5000]), max(sizes[5000:])
        assert second <= 2 * first + 256, (first, second)  # flat, not growing
        assert max(sizes) < 4096, max(sizes)  # a linger window of writes, never the store
        await trio.sleep(1)  # writes stop; replication settles
        r = await get(c, "key-0", meta)
        assert r.json()["causal-metadata"] == {}


async def test_cross_shard_causality_through_forwarding(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}) as cluster:
        ka = keys_of(cluster, "A")[0]
        kb = keys_of(cluster, "B")[0]
        _n1, n2, _n3, _n4 = cluster.address_of(1, 2, 3, 4)
        # replica 2 of shard A is cut from everyone but clients
        cluster.network.isolate(n2)
        async with cluster.client(3) as on_3, cluster.client(4) as on_4, \
                cluster.client(2) as on_2:
            meta = await put(on_3, ka, "a1")  # forwarded to A (node 1: 2 is unreachable)
            assert ka in meta["deps"]
            meta_b = await put(on_4, kb, "b1", meta)  # B's write depends on A's
            r = await get(on_3, kb, {"deps": {kb: meta_b["deps"][kb]}})  # a second client
            assert r.status_code == 200
            meta3 = r.json()["causal-metadata"]
            assert ka in meta3["deps"], "B's value carries its dependency on A's key"
            done = trio.Event()

            async def read() -> None:
                resp = await get(on_2, ka, meta3)
                assert resp.json()["value"] == "a1"
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                assert await pending(done, 5)
                cluster.network.heal()


async def test_forwarding_fails_over_and_503_when_shard_unreachable(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}) as cluster:
        kb = keys_of(cluster, "B", 5)
        async with cluster.client(1) as on_1:
            cluster.network.down.add(cluster.addresses[3])
            meta: dict = {}
            for key in kb:
                with trio.fail_after(2):
                    meta = await put(on_1, key, "v", meta)
                    assert (await get(on_1, key, meta)).json()["value"] == "v"
            cluster.network.cut(cluster.addresses[1], cluster.addresses[4])  # silent drop
            start = trio.current_time()
            r = await get(on_1, kb[0], meta)
            assert r.status_code == 503
            assert r.json()["error"].startswith("shard B unreachable")
            assert 29 <= trio.current_time() - start <= 31
            cluster.network.heal()  # the partition heals while a request is retrying
            cluster.network.down.clear()
            r = await get(on_1, kb[0], meta)
            assert r.status_code == 200 and r.json()["value"] == "v"


async def test_forwarded_request_retries_until_partition_heals(autojump_clock):
    async with open_cluster({"A": 1, "B": 1}) as cluster:
        kb = keys_of(cluster, "B")[0]
        cluster.network.cut(*cluster.address_of(1, 2))
        async with cluster.client(1) as on_1:
            done = trio.Event()

            async def write() -> None:
                await put(on_1, kb, "late")
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                assert await pending(done, 10)
                cluster.network.heal()
        assert (await converged(cluster, [2]))[kb] == "late"


async def test_restarted_empty_replica_never_misses_stable_writes(autojump_clock):
    from trio_kv.testing import restart_node

    async with open_cluster({"S": 3}) as cluster, cluster.client(1) as on_1:
        meta = await put(on_1, "x", "1")
        await converged(cluster, [1, 2, 3])
        meta = (await get(on_1, "x", meta)).json()["causal-metadata"]
        assert meta == {}, "stable everywhere: the token no longer mentions x"
        assert cluster.nursery is not None
        await restart_node(cluster, cluster.nursery, 3)  # memory lost, new incarnation
        cluster.network.isolate(cluster.addresses[3])
        with trio.fail_after(20):
            await cluster.put_view(to=[3])  # completes, reporting the pull as pending
        async with cluster.client(3) as on_3:
            assert (await on_3.get("/view")).json()["change"]["state"] == "pending"
            r = await get(on_3, "x", meta)
            assert r.status_code == 503, "must not answer 404 for a write the client saw"
            cluster.network.heal()
            r = await get(on_3, "x", meta)
            assert r.status_code == 200 and r.json()["value"] == "1"
        assert (await converged(cluster, [1, 2, 3]))["x"] == "1"
