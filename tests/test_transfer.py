"""What a view change ships (issue 13): pull pages read from the ring-ordered index, skip what
the puller holds and end on an empty page; handoffs offer versions before values; a 2x2 ->
4x2 change sends each moved key once per new replica; a first view installs without waiting
out a retry period."""

from __future__ import annotations

import random

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_kv import transfer
from trio_kv.clock import Version
from trio_kv.handoff import in_scopes
from trio_kv.messages import OfferReply, dumps
from trio_kv.replica import Replica, ReplicaLimits
from trio_kv.ring import key_hash
from trio_kv.store import Entry, Store
from trio_kv.testing import open_cluster
from trio_kv.view import Member, View, ranges_within

from .helpers import get, put


def _view(n: int) -> View:
    return View({f"s{i + 1}": (Member(i + 1, f"h{i + 1}:1"),) for i in range(n)})


V2, V4 = _view(2), _view(4)
WITHIN = [(V2, "s1"), (V4, "s3")]  # keys s1 held that s3 now owns


def _replica(keys: list[str], page: int = 1000) -> Replica:
    r = Replica(1, "o", ReplicaLimits(page_entries=page))
    for i, k in enumerate(keys):
        r.store.put(k, Entry(Version(10 + i, 1), f"v{i}", {}))
    return r


def _ring_order(keys: list[str]) -> list[str]:
    return [k for _h, k in sorted((key_hash(k), k) for k in keys)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=400),
       st.integers(0, 300))
def test_index_walk_is_the_filtered_ring_order(ops, cursor_at):
    """Writes and removes in any order: a walk is exactly the live keys of the ranges, in
    ring order, after the cursor (no duplicates after a key is removed and written again)."""
    store = Store()
    for add, i in ops:
        if add:
            store.put(f"k{i}", Entry(Version(len(store.entries) + 1, 1), "v", {}))
        else:
            store.remove(f"k{i}")
    ranges = ranges_within(WITHIN)
    expect = _ring_order([k for k in store.entries if in_scopes(k, WITHIN)])
    assert list(store.walk(ranges)) == expect
    cursor = f"k{cursor_at}"
    pos = (key_hash(cursor), cursor)
    assert list(store.walk(ranges, cursor)) == [k for k in expect if (key_hash(k), k) > pos]


def test_foreign_keys_are_those_another_shard_owns():
    keys = [f"f{i}" for i in range(3000)]
    r = _replica(keys)
    foreign = transfer.foreign_keys(r, V4)  # node 1 is s1's member
    expect: dict[str, list[str]] = {}
    for k in keys:
        if V4.shard_for(k) != "s1":
            expect.setdefault(V4.shard_for(k), []).append(k)
    assert {s: sorted(ks) for s, ks in foreign.items()} == {
        s: sorted(ks) for s, ks in expect.items()
    }


def test_pages_skip_what_the_puller_holds_and_end_empty():
    keys = [f"p{i}" for i in range(2000)]
    r = _replica(keys, page=100)
    scoped = _ring_order([k for k in keys if in_scopes(k, WITHIN)])
    got: list[str] = []
    after, pages = "", 0
    while True:
        page, nxt = transfer.pull_page(r, WITHIN, after, 100)
        pages += 1
        if nxt is None:
            assert page == [], "the last page (with the report) carries no entries"
            break
        assert page and len(page) <= 100
        got += [k for k, _ in page]
        after = nxt
    assert got == scoped and pages == len(scoped) // 100 + 1 + (len(scoped) % 100 > 0)
    # limit 0: fences only; nothing sent, same cursor, not the last page
    assert transfer.pull_page(r, WITHIN, "", 0) == ([], "")
    # the puller holds the first half (one key at an older version, one newer): only the
    # rest, and the older one, are sent
    held = [(k, r.store.entries[k].version) for k in scoped[:50]]
    held[3] = (held[3][0], Version(1, 1))
    held[4] = (held[4][0], Version(10**6, 9))
    page, nxt = transfer.pull_page(r, WITHIN, "", 100, known=held, complete=False)
    assert [k for k, _ in page] == [scoped[3]] and nxt == scoped[49]
    page, nxt = transfer.pull_page(r, WITHIN, "", 100, known=held, complete=True)
    assert [k for k, _ in page] == [scoped[3], *scoped[50:149]]
    # what the puller reports it holds comes from the same walk
    puller = Replica(2, "p")
    puller.merge([(k, r.store.entries[k]) for k in scoped[:10]])
    known, complete = transfer.known_after(puller, WITHIN, "", 5, 1 << 20)
    assert [k for k, _ in known] == scoped[:5] and not complete
    known, complete = transfer.known_after(puller, WITHIN, scoped[4], 100, 1 << 20)
    assert [k for k, _ in known] == scoped[5:10] and complete


async def test_an_offer_is_answered_with_what_the_receiver_lacks(autojump_clock):
    async with open_cluster({"A": 2}) as cluster:
        async with cluster.client(1) as c:
            await put(c, "have", "x")
            held = cluster.nodes[1].replica.store.get("have")
        assert held is not None
        whoami = {"from": 2, "epoch": cluster.nodes[2].replica.epoch,
                  "view_id": cluster.nodes[2].replica.view.view_id}  # type: ignore[union-attr]
        offer = [["have", held.version.hlc, held.version.node],  # same version: held
                 ["have", held.version.hlc + 5, 2],  # newer: send
                 ["lack", 5, 2]]  # absent: send
        async with cluster.client(1, secret=True) as c:
            r = await c.post("/internal/handoff", content=dumps(
                {"offer": offer, "patient": True, **whoami}))
            assert r.status_code == 200, r.text
            assert OfferReply.from_wire(r.json(), 3) == OfferReply([1, 2], [])
            r = await c.post("/internal/handoff", content=dumps(
                {"offer": [["k", "not a timestamp", 1]], **whoami}))
            assert r.status_code == 400  # validated at the edge


async def test_2x2_to_4x2_ships_each_moved_key_once_per_new_replica(autojump_clock):
    async with open_cluster({"A": 2, "B": 2}, spare=4) as cluster:
        data = {f"m{i}": f"val{i}" for i in range(400)}
        meta: dict = {}
        async with cluster.client(1) as c:
            for k, v in data.items():
                meta = await put(c, k, v, meta)
        await trio.sleep(2)  # replicas converge (the bench waits too)
        old = {k: cluster.nodes[1].replica.view.shard_for(k) for k in data}  # type: ignore
        shipped = {i: n.stats.pull_entries_served + n.stats.handoff_entries_sent
                   for i, n in cluster.nodes.items()}
        new = {"A": [1, 2], "B": [3, 4], "C": [5, 6], "D": [7, 8]}
        await cluster.put_view(new, to=list(cluster.nodes))
        view = cluster.nodes[1].replica.view
        assert view is not None
        moved = sum(1 for k in data if view.shard_for(k) != old[k])
        sent = sum(n.stats.pull_entries_served + n.stats.handoff_entries_sent - shipped[i]
                   for i, n in cluster.nodes.items())
        assert moved > 100 and sent == moved * 2, (moved, sent)
        for node_id in random.Random(1).sample(sorted(cluster.nodes), 4):
            async with cluster.client(node_id) as c:
                for k, v in data.items():
                    r = await get(c, k, meta)
                    assert r.status_code == 200 and r.json()["value"] == v, (node_id, k)
        for node_id in (5, 6, 7, 8):  # each new replica holds exactly its shard's keys
            replica = cluster.nodes[node_id].replica
            assert set(replica.store.entries) == {
                k for k in data if view.shard_for(k) == replica.shard
            }


async def test_first_view_does_not_wait_out_a_refused_pull(autojump_clock):
    """Fresh nodes given their first view a few ms apart: a pull refused by a node still
    learning the previous view is retried as soon as that node pulls in turn, not after a
    retry period (0.1-0.3 s before)."""
    async with open_cluster({"A": 3}, send_view=False) as cluster:
        t0 = trio.current_time()
        done: dict[int, float] = {}

        async def one(node_id: int, delay: float) -> None:
            await trio.sleep(delay)
            await cluster.put_view(to=[node_id])
            done[node_id] = trio.current_time() - t0

        async with trio.open_nursery() as nursery:
            for node_id, delay in ((1, 0.0), (2, 0.005), (3, 0.01)):
                nursery.start_soon(one, node_id, delay)
        retry = cluster.config.retry_interval
        assert max(done.values()) < 0.01 + retry / 2, done
