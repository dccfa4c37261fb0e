"""Core (pure, synchronous) tests: clock laws, conflict resolution, ring balance, views."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_kv.clock import HybridClock, Version
from trio_kv.metadata import MetadataError, merge_deps, parse_metadata, render_metadata
from trio_kv.replica import Replica
from trio_kv.ring import Ring
from trio_kv.store import Entry, Store
from trio_kv.transfer import pull_refusal
from trio_kv.view import ViewError, parse_view, plan_moves

versions = st.builds(Version, st.integers(0, 1000), st.integers(0, 5))
deps_st = st.dictionaries(st.sampled_from(["k1", "k2", "k3", "k4"]), versions, max_size=4)


@given(deps_st, deps_st, deps_st)
def test_deps_merge_is_a_join(a, b, c):
    assert merge_deps(a, b) == merge_deps(b, a)
    assert merge_deps(merge_deps(a, b), c) == merge_deps(a, merge_deps(b, c))
    assert merge_deps(a, a) == a
    for key, version in merge_deps(a, b).items():
        assert version >= a.get(key, Version(0, 0)) and version >= b.get(key, Version(0, 0))


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2**40)), max_size=50))
def test_clock_is_strictly_monotonic_and_above_floors(steps):
    clock = HybridClock()
    last = 0
    for now_ms, floor in steps:
        t = clock.tick(now_ms, floor)
        assert t > last and t > floor
        last = t
        clock.observe(t - 5)
        assert clock.last == t


writes = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]), versions, st.one_of(st.none(), st.text(max_size=3))
    ),
    max_size=12,
)


@given(writes, st.randoms())
def test_conflict_resolution_is_order_independent(ws, rnd):
    def final(order):
        store = Store()
        for key, version, value in order:
            store.put(key, Entry(version, value, {}))
            store.put(key, Entry(version, value, {}))  # idempotent
        return {k: (e.version, e.value) for k, e in store.entries.items()}

    shuffled = list(ws)
    rnd.shuffle(shuffled)
    assert final(ws) == final(shuffled)


def test_stream_holds_each_key_once_at_its_latest_change():
    store = Store()
    store.put("a", Entry(Version(1, 1), "1", {}))
    store.put("b", Entry(Version(2, 1), "2", {}))
    store.put("a", Entry(Version(3, 1), "3", {}))
    assert [(k, e.value) for _, k, e in store.since(0)] == [("b", "2"), ("a", "3")]
    assert [k for _, k, _ in store.since(2)] == ["a"]
    assert not store.put("a", Entry(Version(2, 9), "old", {}))  # loses: no new position
    assert store.head == 3


def test_ring_balance_four_shards():
    ring = Ring(["s1", "s2", "s3", "s4"], vnodes=128)
    counts = {s: 0 for s in ["s1", "s2", "s3", "s4"]}
    for i in range(10_000):
        counts[ring.shard_for(f"key-{i}")] += 1
    mean = statistics.mean(counts.values())
    assert max(counts.values()) <= 1.3 * mean, counts


def _view(shards: dict[str, list[int]]):
    return parse_view(
        {"view": {s: [{"address": f"10.0.0.{i}:8081", "id": i} for i in ids]
                  for s, ids in shards.items()}}
    )


@pytest.mark.parametrize("change", ["add", "remove"])
def test_moves_for_one_shard_are_about_k_over_s(change):
    keys = [f"key-{i}" for i in range(10_000)]
    ratios = []
    for seed in range(5):
        names = [f"shard-{seed}-{j}" for j in range(4)]
        small = _view({n: [j + 1] for j, n in enumerate(names[:3])})
        big = _view({n: [j + 1] for j, n in enumerate(names)})
        old, new = (small, big) if change == "add" else (big, small)
        moved = sum(old.shard_for(k) != new.shard_for(k) for k in keys)
        ratios.append(moved / (len(keys) / 4))
        # the plan covers exactly the keys whose owner changed
        moves = plan_moves(old, new)
        from trio_kv.ring import key_hash

        planned = sum(any(m.start <= key_hash(k) < m.end for m in moves) for k in keys)
        assert planned == moved
    assert statistics.mean(ratios) <= 1.25, ratios


def test_plan_is_empty_for_identical_view_and_every_key_has_one_owner():
    v = _view({"A": [1, 2], "B": [3]})
    assert plan_moves(v, _view({"B": [3], "A": [2, 1]})) == []
    new = _view({"A": [1], "B": [3], "C": [2]})
    for key in (f"k{i}" for i in range(1000)):
        assert new.shard_for(key) in new.shards


@pytest.mark.parametrize(
    "body",
    [
        None, [], {"vieww": {}}, {"view": {}}, {"view": {"A": []}}, {"view": {"A": "x"}},
        {"view": {"A": [{"address": "h:1"}]}}, {"view": {"A": [{"id": 1}]}},
        {"view": {"A": [{"address": "h:1", "id": 1}, {"address": "h:2", "id": 1}]}},
        {"view": {"A": [{"address": "h:1", "id": 1}], "B": [{"address": "h:1", "id": 2}]}},
        {"view": {"A": [{"address": "nohost", "id": 1}]}},
        {"view": {"A": [{"address": "h:1", "id": "x"}]}},
        {"view": {"A": [{"address": "h:1", "id": True}]}},
        {"view": {"": [{"address": "h:1", "id": 1}]}},
    ],
)
def test_invalid_views_are_rejected(body):
    with pytest.raises(ViewError):
        parse_view(body)


def test_legacy_view_and_string_ids():
    v = parse_view({"view": [{"address": "h:1", "id": "1"}, {"address": "h:2", "id": 2}],
                    "causal-metadata": {"ignored": True}})
    assert list(v.shards) == ["shard1"] and [m.id for m in v.shards["shard1"]] == [1, 2]


@pytest.mark.parametrize(
    "raw", [[], "x", 3, {"deps": []}, {"deps": {"a": [1]}}, {"deps": {"a": ["1", 2]}},
            {"other": 1}, {"deps": {"a": [1, -2]}}, {"deps": {"a": [True, 1]}}],
)
def test_malformed_metadata_is_rejected(raw):
    with pytest.raises(MetadataError):
        parse_metadata(raw)


def test_metadata_round_trip():
    deps = {"a": Version(5, 1), "b": Version(7, 2)}
    assert parse_metadata(render_metadata(deps)) == deps
    assert parse_metadata(None) == parse_metadata({}) == {}


def _pair() -> tuple[Replica, Replica]:
    view = _view({"A": [1, 2]})
    a, b = Replica(1, "1.x"), Replica(2, "2.x")
    a.install_view(view)
    b.install_view(view)
    return a, b


def _exchange(src: Replica, dst: Replica, peer_id: int) -> None:
    batch = src.batch_for(peer_id)
    assert batch is not None
    reply, _ = dst.on_sync(batch)
    src.on_sync_reply(peer_id, reply)


def test_replica_deps_pruned_only_once_every_replica_has_the_write():
    a, b = _pair()
    token = a.write("x", "1", {}, now_ms=1000)
    assert "x" in token  # b has not got it yet
    assert b.unmet("x", token)
    _exchange(a, b, 2)
    assert not b.unmet("x", token)
    assert a.prune(token) == {}  # b confirmed it holds a's stream up to x
    # b relays nothing back to a (a is the source) yet b's claim on a stays correct
    _exchange(b, a, 1)
    assert a.store.get("x").value == "1"


def test_replica_concurrent_writes_converge_to_one_winner():
    a, b = _pair()
    a.write("k", "from-a", {}, now_ms=1000)
    b.write("k", "from-b", {}, now_ms=1000)
    for _ in range(2):
        _exchange(a, b, 2)
        _exchange(b, a, 1)
    assert a.store.get("k").value == b.store.get("k").value
    assert a.store.get("k").version == b.store.get("k").version


def test_write_after_reading_wins_even_with_a_slow_clock():
    a, b = _pair()
    token = a.write("k", "first", {}, now_ms=10_000)
    _exchange(a, b, 2)
    _, token = b.read("k", token)
    b.write("k", "second", token, now_ms=1)  # b's physical clock is far behind
    _exchange(b, a, 1)
    assert a.store.get("k").value == "second"


@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.sampled_from("abc"),
                          st.one_of(st.none(), st.text(max_size=2))), max_size=20),
       st.lists(st.sampled_from([(0, 1), (1, 0)]), max_size=20))
def test_replicas_converge_whatever_the_interleaving(ops, syncs):
    reps = _pair()
    now = itertools.count(1000)
    schedule = [("op", o) for o in ops] + [("sync", s) for s in syncs]
    random.Random(len(ops)).shuffle(schedule)
    for kind, item in schedule:
        if kind == "op":
            who, key, value = item
            reps[who].write(key, value, {}, next(now))
        else:
            src, dst = item
            _exchange(reps[src], reps[dst], dst + 1)
    for _ in range(3):
        _exchange(reps[0], reps[1], 2)
        _exchange(reps[1], reps[0], 1)
    state = [{k: (e.version, e.value) for k, e in r.store.entries.items()} for r in reps]
    assert state[0] == state[1]


# ------------------------------------------------------------------- the trust boundary (pure)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=300)), max_size=40),
       st.integers(1, 8), st.integers(64, 2000))
def test_batches_are_bounded_in_encoded_bytes_and_lose_nothing(items, max_entries, max_bytes):
    from trio_kv.messages import dumps as wire_dumps
    from trio_kv.messages import entries_to_wire
    from trio_kv.transfer import bounded

    entries = [(k, Entry(Version(i + 1, 1), v, {})) for i, (k, v) in enumerate(items)]
    batches = list(bounded(entries, max_entries, max_bytes))
    assert [e for b in batches for e in b] == entries
    for batch in batches:
        assert len(batch) <= max_entries
        encoded = len(wire_dumps(entries_to_wire(batch)))
        assert len(batch) == 1 or encoded <= max_bytes  # an entry larger than a batch goes alone


def test_token_rules_bound_clock_and_size():
    from trio_kv.metadata import TokenRules

    rules = TokenRules(max_deps=2, max_bytes=200, max_skew_ms=1000)
    now = 1_000_000
    ok = parse_metadata({"deps": {"a": [now << 16, 1]}}, rules, now)
    assert ok == {"a": Version(now << 16, 1)}
    for bad in (
        {"deps": {"a": [(now + 1001) << 16, 1]}},  # past the allowed skew
        {"deps": {"a": [2**63, 1]}},
        {"deps": {"a": [18446744073709551615, 1]}},
        {"deps": {"a": [1, -1]}},
        {"deps": {"a": [1, 2**53]}},
        {"deps": {"a": [1, 1], "b": [1, 1], "c": [1, 1]}},  # more than max_deps
        {"deps": {"x" * 300: [1, 1]}},  # more than max_bytes
        {"deps": {"": [1, 1]}},
    ):
        with pytest.raises(MetadataError):
            parse_metadata(bad, rules, now)


def test_a_write_whose_token_would_be_too_large_changes_nothing():
    from trio_kv.metadata import TokenRules
    from trio_kv.replica import ReplicaLimits

    view = parse_view({"view": {"A": [{"id": 1, "address": "h:1"}, {"id": 2, "address": "h:2"}]}})
    r = Replica(1, "1.x", ReplicaLimits(token=TokenRules(max_deps=2)))
    r.install_view(view)
    deps = {"a": Version(5, 2), "b": Version(6, 2)}  # unstable (peer 2 confirmed nothing)
    assert r.write("c", "v", deps, now_ms=1) is None
    assert r.store.get("c") is None and r.store.head == 0
    assert r.write("a", "v", deps, now_ms=1) is not None  # the key's own dep is replaced


def test_a_sync_claiming_more_than_we_sent_is_refused():
    from trio_kv.messages import SyncBatch, WireError

    view = parse_view({"view": {"A": [{"id": 1, "address": "h:1"}, {"id": 2, "address": "h:2"}]}})
    r = Replica(1, "1.x")
    r.install_view(view)
    r.write("k", "v", {}, now_ms=1)
    batch = SyncBatch(2, "2.y", view.view_id, 0, 0, [], {"1.x": 5}, [])
    with pytest.raises(WireError):
        r.on_sync(batch)
    assert r.claims.get(2, 0) == 0  # nothing believed
    r.on_sync(SyncBatch(2, "2.y", view.view_id, 0, 0, [], {"1.x": 1}, []))
    assert r.claims[2] == 1


def test_pulls_built_on_an_invented_or_readdressed_cluster_are_refused():
    body = {"A": [{"id": 1, "address": "h:1"}, {"id": 2, "address": "h:2"}]}
    view = parse_view({"view": body})
    r = Replica(1, "1.x")
    r.install_view(view)
    grown = parse_view({"view": {**body, "B": [{"id": 3, "address": "h:3"}]}})
    invented = parse_view({"view": {"A": [{"id": 91, "address": "evil:1"}]}})
    hijack = parse_view({"view": {"A": [{"id": 1, "address": "evil:1"},
                                        {"id": 2, "address": "evil:2"}]}})
    # a new node of a grown cluster pulls our keys: fine (its scopes name our view)
    assert pull_refusal(r, 3, grown, [(view, "A"), (grown, "B")]) is None
    assert pull_refusal(r, 91, invented, [(invented, "A")]) is not None
    assert pull_refusal(r, 1, hijack, [(view, "A"), (hijack, "A")]) is not None
    # a node outside our view (restarted outside the final view) settling a debt of an old
    # view we never lived: the pull is for our own view, so it can fence nothing elsewhere
    old = parse_view({"view": {"A": [{"id": 7, "address": "h:7"}]}})
    assert pull_refusal(r, 7, view, [(old, "A"), (view, "A")]) is None
