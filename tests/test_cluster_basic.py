import trio

from trio_kv.testing import open_cluster

from .helpers import converged, get, put


async def test_write_replicates_within_shard(autojump_clock):
    async with open_cluster({"A": 3}) as cluster:
        async with cluster.client(1) as c:
            meta = await put(c, "x", "1")
        assert meta == {"deps": {"x": meta["deps"]["x"]}}
        assert await converged(cluster, [1, 2, 3]) == {"x": "1"}
        async with cluster.client(3) as c:
            r = await get(c, "x")
            assert r.json()["value"] == "1"
            # once on every replica the dependency is stable and pruned from the token
            assert r.json()["causal-metadata"] == {}
        with trio.fail_after(5):
            async with cluster.client(1) as c:
                r = await get(c, "x", meta)
                assert r.json()["causal-metadata"] == {}
