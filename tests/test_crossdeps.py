"""Cross-shard pruning (``core/crossdeps.py``): values' dependencies on other shards' keys are
dropped once their owning shard says they are stable, so ``GET /data`` tokens stay bounded;
never without that word (a cut-off owner leaves them in place).  In-process clusters on the
autojump clock."""

from __future__ import annotations

import json
from typing import Any

import trio

from trio_kv.config import Config
from trio_kv.messages import StableQuery
from trio_kv.testing import Cluster, open_cluster, restart_node

from .helpers import converged, keys_of, put

SHARDS = {"A": 2, "B": 2, "C": 2}
BOUND = Config().max_token_deps


def foreign_deps(cluster: Cluster, node_id: int) -> dict[str, set[str]]:
    """Per local key of ``node_id``'s shard: the other shards' keys its stored value depends
    on."""
    replica = cluster.nodes[node_id].replica
    out: dict[str, set[str]] = {}
    for key, entry in replica.store.entries.items():
        if replica.owns(key) and (keys := replica.foreign(entry)):
            out[key] = set(keys)
    return out


async def listing_within_bound(cluster: Cluster, node_id: int, within: float) -> dict[str, Any]:
    """Poll ``GET /data`` (on the test clock) until it answers 200 with a token under the
    bound; its body."""
    async with cluster.client(node_id) as c:
        with trio.fail_after(within):
            while True:
                r = await c.get("/data")
                if r.status_code == 200:
                    deps = r.json()["causal-metadata"].get("deps", {})
                    if len(deps) <= BOUND:
                        return dict(r.json())
                await trio.sleep(0.5)


async def test_a_listing_token_stays_bounded_once_owners_prove_cross_shard_deps_stable(
    autojump_clock,
):
    """One session writes 600 keys over three shards through one node, passing its token on
    each time: every value keeps the other shards' keys it followed.  Each shard's listing
    merges all of them (well over max_token_deps before this existed, a 503 for ever); once
    the owners answered, the stored values hold no cross-shard dependency, and the listings
    answer 200 with small tokens."""
    async with open_cluster(SHARDS) as cluster:
        await write_across_shards(cluster, 600)
        nodes = [1, 3, 5]  # one replica of each shard
        for node_id in nodes:
            await listing_within_bound(cluster, node_id, within=30)
        await no_foreign_deps_left(cluster, list(cluster.nodes), within=30)
        dropped = sum(n.core.crossdeps.dropped for n in cluster.nodes.values())
        assert dropped > BOUND, "the values did depend on other shards' keys"
        listed: dict[str, str] = {}
        for node_id in cluster.nodes:
            body = await listing_within_bound(cluster, node_id, within=5)
            assert len(body["causal-metadata"].get("deps", {})) < 20
            listed.update(body["items"])
        assert len(listed) == 600


async def test_deps_on_an_unreachable_shard_are_never_dropped(autojump_clock):
    """Shard A cannot reach shard C (both its replicas cut from both of C's): A's values keep
    their dependencies on C's keys, and A's listing hands them on; deps on B's keys go.  Once
    healed, C says they are stable and they go too."""
    async with open_cluster(SHARDS) as cluster:
        cluster.network.partition(cluster.address_of(1, 2), cluster.address_of(5, 6))
        a_keys = keys_of(cluster, "A", 20, "a")
        b_keys = keys_of(cluster, "B", 20, "b")
        c_keys = keys_of(cluster, "C", 20, "c")
        meta: Any = None
        async with cluster.client(1) as on_a, cluster.client(3) as on_b, \
                cluster.client(5) as on_c:
            for a, b, c in zip(a_keys, b_keys, c_keys, strict=True):
                meta = await put(on_c, c, c, meta)  # written at C, directly (clients reach it)
                meta = await put(on_b, b, b, meta)
                meta = await put(on_a, a, a, meta)  # A stores "after c and b"
        c_set, b_set = set(c_keys), set(b_keys)
        # Give the pruning every chance: many rounds, many failed calls to C, answers from B.
        with trio.fail_after(30):
            while any(deps & b_set for deps in foreign_deps(cluster, 1).values()):
                await trio.sleep(0.5)
        await trio.sleep(10)
        for node_id in (1, 2):
            held = set().union(*foreign_deps(cluster, node_id).values())
            assert held & c_set, f"node {node_id} dropped deps its owner never proved stable"
            assert not held & b_set
        async with cluster.client(1) as on_a:
            r = await on_a.get("/data")
        assert r.status_code == 200, r.text
        listed = set(r.json()["causal-metadata"]["deps"])
        assert listed & c_set and not listed & b_set
        assert set(r.json()["items"]) == set(a_keys)
        cluster.network.heal()
        with trio.fail_after(30):
            while foreign_deps(cluster, 1) or foreign_deps(cluster, 2):
                await trio.sleep(0.5)
        async with cluster.client(1) as on_a:
            r = await on_a.get("/data")
        assert r.status_code == 200 and not set(r.json()["causal-metadata"].get("deps", {})) \
            & c_set


async def test_forged_stability_queries_are_refused_and_change_nothing(autojump_clock):
    """``/internal/stable`` is guarded and validated like the other peer routes: no secret
    401, malformed / oversized / future-stamped 400; a valid one answers and changes
    nothing either."""
    cfg = Config(cluster_secret="s3cret", stable_query_deps=300)
    async with open_cluster({"A": 2, "B": 2}, config=cfg) as cluster:
        meta: Any = None
        async with cluster.client(1) as c:
            for i in range(30):
                meta = await put(c, f"k{i}", f"v{i}", meta)
        await converged(cluster, [1, 2])
        await converged(cluster, [3, 4])
        node = cluster.nodes[1]
        key = keys_of(cluster, "A", 1, "k")[0]
        version = node.replica.store.entries[key].version
        before = {i: {k: (e.version, e.value, dict(e.deps)) for k, e in
                      n.replica.store.entries.items()} for i, n in cluster.nodes.items()}
        now_hlc = version.hlc
        future = (now_hlc >> 16) + 86_400_000 << 16
        good = StableQuery(2, [(key, version)]).to_wire()
        bad: list[tuple[Any, int]] = [
            (b"not json", 400),
            ([1, 2], 400),
            ({"from": 2, "deps": "x"}, 400),
            ({"from": 2, "deps": []}, 400),
            ({"from": 2, "deps": [[key, version.hlc]]}, 400),
            ({"from": 2, "deps": [["", version.hlc, 1]]}, 400),
            ({"from": 2, "deps": [["k" * 2000, version.hlc, 1]]}, 400),
            ({"from": 2, "deps": [[key, future, 1]]}, 400),
            ({"from": 2, "deps": [[key, -1, 1]]}, 400),
            ({"from": 2, "deps": [[key, version.hlc, 2**60]]}, 400),
            ({"from": -1, "deps": [[key, version.hlc, 1]]}, 400),
            ({"from": 2, "deps": [[key, version.hlc, 1]] * 301}, 400),  # over stable_query_deps
        ]
        secret = {"x-kv-secret": "s3cret"}
        async with cluster.client(1) as c:
            r = await c.post("/internal/stable", json=good)
            assert r.status_code == 401, r.text
            for body, status in bad:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = await c.post("/internal/stable", content=content,
                                 headers={**secret, "content-type": "application/json"})
                assert r.status_code == status, (body, r.text)
                assert isinstance(r.json()["error"], str)
            with trio.fail_after(10):
                while True:
                    r = await c.post("/internal/stable", json=good, headers=secret)
                    assert r.status_code == 200, r.text
                    if r.json() == {"stable": [True]}:
                        break
                    await trio.sleep(0.2)
            # a key another shard owns is never "stable" here: only its owner may say so
            other = keys_of(cluster, "B", 1, "k")[0]
            foreign = cluster.nodes[3].replica.store.entries[other].version
            r = await c.post("/internal/stable", json=StableQuery(2, [(other, foreign)]).to_wire(),
                             headers=secret)
            assert r.json() == {"stable": [False]}
        after = {i: {k: (e.version, e.value, dict(e.deps)) for k, e in
                     n.replica.store.entries.items()} for i, n in cluster.nodes.items()}
        for i in cluster.nodes:  # the queries changed no value, version or key
            assert {k: v[:2] for k, v in after[i].items()} == {
                k: v[:2] for k, v in before[i].items()}
        assert all(n.task_failures == 0 for n in cluster.nodes.values())


async def write_across_shards(cluster: Cluster, count: int) -> None:
    """One session, ``count`` keys over every shard through node 1, its token passed on."""
    meta: Any = None
    async with cluster.client(1) as c:
        for i in range(count):
            meta = await put(c, f"key{i}", f"v{i}", meta)


async def no_foreign_deps_left(cluster: Cluster, node_ids: list[int], within: float) -> None:
    with trio.fail_after(within):
        while any(foreign_deps(cluster, i) for i in node_ids):
            await trio.sleep(0.5)


async def test_a_full_queue_delays_pruning_but_loses_none_of_it(autojump_clock):
    """``crossdeps_queue`` bounds the keys waiting for an answer; past it the stream cursor
    stops and resumes as answers make room, so every value is pruned in the end."""
    cfg = Config(crossdeps_queue=4, stable_query_deps=256)
    async with open_cluster(SHARDS, config=cfg) as cluster:
        await write_across_shards(cluster, 200)
        await no_foreign_deps_left(cluster, list(cluster.nodes), within=60)
        assert any(n.core.crossdeps.full for n in cluster.nodes.values())
        assert all(len(n.core.crossdeps.queue) <= 4 for n in cluster.nodes.values())


async def test_a_restarted_node_prunes_again_what_it_did_not_persist(autojump_clock, tmp_path):
    """Dropped dependencies are redundant, so they are not written to disk: a restarted node
    loads its values with their whole causal past, and its stream cursor, starting from 0,
    queues and prunes them again."""
    async with open_cluster(SHARDS, data_root=str(tmp_path)) as cluster:
        await write_across_shards(cluster, 120)
        await no_foreign_deps_left(cluster, list(cluster.nodes), within=30)
        assert cluster.nursery is not None
        node = await restart_node(cluster, cluster.nursery, 1)
        assert foreign_deps(cluster, 1), "loaded from disk with the dependencies written"
        await no_foreign_deps_left(cluster, [1], within=30)
        assert node.core.crossdeps.dropped > 0


async def test_metrics_count_the_dependencies_dropped(autojump_clock):
    async with open_cluster(SHARDS) as cluster:
        await write_across_shards(cluster, 60)
        await no_foreign_deps_left(cluster, list(cluster.nodes), within=30)
        total = 0
        for node_id in cluster.nodes:
            async with cluster.client(node_id) as c:
                text = (await c.get("/metrics")).text
            lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                         if line.startswith("trio_kv_crossdeps_"))
            assert float(lines["trio_kv_crossdeps_queued"]) == 0
            total += int(float(lines["trio_kv_crossdeps_dropped_total"]))
        assert total == sum(n.core.crossdeps.dropped for n in cluster.nodes.values()) > 0
