"""Nodes with a view but no shard route every client request to the owners."""

from __future__ import annotations

import json

import trio

from trio_kv.testing import open_cluster

from .helpers import get, keys_of, put


async def test_a_node_outside_every_shard_routes_reads_writes_and_listings(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}, spare=1) as cluster:
        await cluster.put_view(to=[1, 2, 3, 4, 5])  # node 5 gets the view, in no shard
        router = cluster.nodes[5]
        assert router.replica.view is not None and router.replica.shard is None
        a_keys, b_keys = keys_of(cluster, "A", 3, "a"), keys_of(cluster, "B", 3, "b")
        meta: dict = {}
        async with cluster.client(5) as c:
            for key in a_keys + b_keys:
                meta = await put(c, key, f"v-{key}", meta)
            for key in a_keys + b_keys:
                r = await get(c, key, meta)
                assert r.status_code == 200 and r.json()["value"] == f"v-{key}"
            r = await c.request("DELETE", f"/data/{a_keys[0]}", json={"causal-metadata": meta})
            assert r.status_code == 200
            meta = r.json()["causal-metadata"]
            r = await get(c, a_keys[0], meta)
            assert r.status_code == 404
            # GET /data at a router lists every shard, waiting on each for the session's past
            r = await c.request("GET", "/data", json={"causal-metadata": meta})
            assert r.status_code == 200
            expected = {k: f"v-{k}" for k in a_keys[1:] + b_keys}
            assert r.json()["items"] == expected
            # and pages through them in key order
            seen: dict[str, str] = {}
            after = ""
            while True:
                r = await c.get("/data", params={"limit": 2, "after": after},
                                headers={"x-causal-metadata": json.dumps(meta)})
                assert r.status_code == 200, r.text
                page = r.json()
                assert len(page["items"]) <= 2 and list(page["items"]) == sorted(page["items"])
                seen.update(page["items"])
                if page["next"] is None:
                    break
                after = page["next"]
            assert seen == expected
        assert not router.replica.store.entries  # it stored nothing itself
        async with cluster.client(1) as c1:
            assert (await get(c1, a_keys[1], meta)).json()["value"] == f"v-{a_keys[1]}"


async def test_a_router_whose_owners_are_down_answers_503_in_time(autojump_clock):
    async with open_cluster({"A": 1}, spare=1) as cluster:
        await cluster.put_view(to=[1, 2])
        cluster.network.down.add(cluster.addresses[1])
        async with cluster.client(2) as c:
            with trio.fail_after(cluster.config.wait_deadline + 5):
                r = await c.put("/data/x", json={"value": "1"})
            assert r.status_code == 503 and "unreachable" in r.json()["error"]
            r = await c.get("/data")
            assert r.status_code == 503 and r.json()["error"]
