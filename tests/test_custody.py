"""Core tests of custody across view changes (trio_kv/handoff.py): who a node pulls from, when
it may serve a key, and how unsettled debts survive further changes and pass to new owners."""

from __future__ import annotations

from trio_kv.handoff import Custody, Debt, Report
from trio_kv.view import View, parse_view, shards_within


def _view(shards: dict[str, list[int]]) -> View:
    return parse_view(
        {"view": {s: [{"address": f"10.0.0.{i}:8081", "id": i} for i in ids]
                  for s, ids in shards.items()}}
    )


KEYS = [f"k{i}" for i in range(2000)]


def _key_in(view: View, shard: str, *also: tuple[View, str]) -> str:
    return next(k for k in KEYS if view.shard_for(k) == shard
                and all(v.shard_for(k) == s for v, s in also))


def _sources(pulls) -> set[tuple[int, str]]:
    return {(p.member.id, p.debt.source[1]) for p in pulls}


def _from(pulls, member: int):
    return next(p for p in pulls if p.member.id == member)


def test_shards_within_matches_keys():
    old, new = _view({"A": [1], "B": [2]}), _view({"A": [1], "B": [2], "C": [3]})
    for shard in "AB":
        found = {new.shard_for(k) for k in KEYS if old.shard_for(k) == shard}
        assert shards_within(new, [(old, shard)]) == found
    assert shards_within(new, [(new, "C"), (old, "A"), (new, "A")]) == set()


def test_an_identical_view_needs_no_pulls():
    v = _view({"A": [1, 2], "B": [3]})
    custody = Custody(1)
    assert custody.begin(v, _view({"B": [3], "A": [2, 1]}), held_data=True) == []
    assert not custody.awaiting(None)


def test_a_node_pulls_only_the_old_shards_of_its_new_range():
    old = _view({"A": [1, 2], "B": [3, 4]})
    new = _view({"A": [1], "B": [3, 4], "C": [2]})  # node 2 moves from A to C
    custody = Custody(2)
    pulls = custody.begin(old, new, held_data=True)
    # it held A's keys itself: it owes only B's members; A's node 1 is pulled only to be
    # fenced (it serves C's former A keys until it installs the new view)
    assert _sources(pulls) == {(3, "B"), (4, "B"), (1, "A")}
    assert set(custody.debts) == {_from(pulls, 3).debt.ident}
    moved = _key_in(new, "C", (old, "B"))
    assert custody.awaiting(moved)
    assert not custody.awaiting(_key_in(new, "C", (old, "A")))
    assert not custody.awaiting(_key_in(new, "A"))  # not ours: nothing to wait for
    # one member of B handing over is enough to serve B's former keys
    assert custody.pulled(_from(pulls, 3), Report(old, "B")) == []
    assert not custody.awaiting(moved)
    # until every old owner was pulled from (and so fenced), writes stay out of "stable"
    assert custody.unfenced(moved)
    custody.pulled(_from(pulls, 4), Report(old, "B"))
    assert not custody.unfenced(moved) and custody.pending() == [_from(pulls, 1)]


def test_a_fresh_node_pulls_its_shard_from_its_peers():
    new = _view({"A": [1, 2]})
    custody = Custody(2)
    pulls = custody.begin(None, new, held_data=False)
    assert _sources(pulls) == {(1, "A")}
    custody.pulled(pulls[0], Report(None, None))  # a fresh cluster: nothing to take
    assert not custody.awaiting(None) and custody.pulls == {}


def test_an_unsettled_debt_survives_the_next_view_change():
    """Seed 215 of the randomized test: A={2,6} -> A={1,2,3} (1 and 3 cannot reach 2 or 6, so
    1 installs owing A's keys) -> A={1,2}: 1 keeps its shard, so it pulls nothing for the new
    change, but it still owes what it never got from {2,6}."""
    v1 = _view({"A": [2, 6], "B": [3, 4], "C": [1, 5]})
    v2 = _view({"A": [1, 2, 3], "B": [4, 5]})
    v3 = _view({"A": [1, 2], "B": [3, 4]})
    custody = Custody(1)
    custody.begin(v1, v2, held_data=True)
    key = _key_in(v2, "A", (v1, "A"))
    assert custody.awaiting(key)
    custody.begin(v2, v3, held_data=True)
    assert custody.awaiting(key)
    assert {p.member.id for p in custody.pending()} >= {2, 6}


def test_a_source_that_owes_passes_its_debt_on():
    """A -> B -> C where B never got A's keys: C pulling from B must not take B's word for them."""
    v1 = _view({"A": [1, 2], "B": [3, 4], "C": [5, 6]})
    v2 = _view({"A": [3, 4], "B": [1, 2], "C": [5, 6]})  # shards swap members
    v3 = _view({"A": [5, 6], "B": [1, 2], "C": [3, 4]})
    key = _key_in(v1, "A")
    b = Custody(3)
    b.begin(v1, v2, held_data=True)  # 3 now owns A's keys: owes (v1, A)
    assert b.awaiting(key)
    c = Custody(5)
    pulls = c.begin(v2, v3, held_data=True)
    again = c.pulled(_from(pulls, 3), b.report())
    assert c.awaiting(key)  # not settled by 3's word: it is pulled from A's members of v1
    assert _sources(again) == {(1, "A"), (2, "A")}
    # 1 moved on to B: it handed A's keys to v2's A members and may have dropped them since
    # 3 was pulled, so A of v2 is owed again, in a new round (the shell backs off)
    third = c.pulled(_from(again, 1), Report(v2, "B"))
    assert c.awaiting(key)
    assert _sources(third) == {(3, "A")} and third[0].round == 2
    assert {p.member.id for p in c.pending()} >= {3, 4}
    # 4's pull began before A of v2 was owed again: it cannot settle it, it starts over
    restarted = c.pulled(_from(pulls, 4), Report(v2, "A"))
    assert [p.round for p in restarted] == [2] and c.awaiting(key)
    # 3 has its keys by now and owes nothing: settled
    c.pulled(third[0], Report(v2, "A"))
    assert not c.awaiting(key)


def test_a_source_on_another_view_vouches_only_for_its_range_there():
    v1 = _view({"A": [1, 2], "B": [3, 4]})
    v2 = _view({"A": [1, 2], "B": [3, 4], "C": [5, 6]})
    custody = Custody(5)
    pulls = custody.begin(v1, v2, held_data=False)
    # node 1 serves some other view, where some of those keys are shard D's: it vouches for
    # its own range there only, D's members are owed the rest
    other = _view({"A": [1], "D": [2]})
    assert shards_within(other, [(v1, "A"), (v2, "C")]) == {"A", "D"}
    again = custody.pulled(_from(pulls, 1), Report(other, "A"))
    assert _sources(again) == {(2, "D")}
    assert custody.awaiting(_key_in(v2, "C", (v1, "A"), (other, "D")))
    assert not custody.awaiting(_key_in(v2, "C", (v1, "A"), (other, "A")))


def test_fences_become_debts_when_their_keys_come_back():
    v1 = _view({"A": [1, 2], "B": [3, 4]})
    v2 = _view({"A": [1, 2], "B": [3, 4], "C": [5, 6]})
    custody = Custody(1)
    custody.begin(None, v1, held_data=False)
    custody.pulled(custody.pending()[0], Report(v1, "A"))  # fresh: 2 has nothing
    assert not custody.awaiting(None)
    # 5 and 6, on v2, pulled C's keys that came from A: forward them there
    custody.fence(v2, [(v1, "A"), (v2, "C")], v1)
    key = _key_in(v2, "C", (v1, "A"))
    assert custody.fence_for(key) is v2
    assert custody.report().debts  # whoever pulls from us learns C's owners may have more
    # we skip v2 and install a view where we own those keys again: C's owners are owed
    v3 = _view({"A": [1, 2], "B": [3, 4]})
    custody.installed(v3)
    assert custody.fences == [] and custody.awaiting(key)
    assert {d.source[1] for d in custody.debts.values()} == {"C"}


def test_a_cycle_of_debts_waits_for_a_source_to_settle_then_ends():
    """1 owes v2's A (whose member 2 it cannot reach) and 2 owes v1's A: the keys wait, pulled
    in rounds, until one of them settles; then the chain ends."""
    v1 = _view({"A": [1], "B": [4]})
    v2 = _view({"A": [2], "B": [4]})
    c = Custody(3)
    new = _view({"A": [3], "B": [4]})
    pulls = c.begin(v1, new, held_data=False)
    rounds = 0
    while pulls:
        pull = pulls.pop()
        view = pull.debt.source[0]
        other = v2 if view is v1 else v1
        owes = ((other, "A"),) if rounds < 6 else ()  # the seventh answer owes nothing
        pulls += c.pulled(pull, Report(view, "A", owes))
        rounds += 1
        assert c.awaiting(None) == bool(pulls)
    assert rounds == 7 and not c.debts and not c.pulls


def test_debt_identity_and_cover():
    v1 = _view({"A": [1], "B": [2]})
    v2 = _view({"A": [1], "B": [2], "C": [3]})
    debt = Debt((v1, "A"), (v2, "C"))
    key = _key_in(v2, "C", (v1, "A"))
    assert debt.covers(key) and not debt.covers(_key_in(v2, "C", (v1, "B")))
    assert debt.ident == Debt((_view({"A": [1], "B": [2]}), "A"), (v2, "C")).ident


def test_epochs_order_installs_and_refuse_pulls_from_older_views():
    from trio_kv.replica import Replica

    v1, v2 = _view({"A": [1, 2]}), _view({"A": [1, 2], "B": [3]})
    a, b = Replica(1, "1.x"), Replica(3, "3.x")
    a.install_view(v1)
    b.install_view(v1)
    assert a.epoch == b.epoch == 1
    b.begin_change(v1, v2, held_data=True)
    b.install_view(v2)
    assert b.epoch == 2
    # a, still on v1, hears of v2: it reports a newer view, and a pull from v1 is stale for b
    a.observe_epoch(3, b.epoch, v2.view_id)
    assert a.epochs.newer_view is not None and a.epochs.newer_view.view_id == v2.view_id
    assert b.stale_puller(v1.view_id, a.epoch)
    # a node changing to a view after hearing of epoch 2 gets an epoch above it, so its
    # pulls are not stale to b, whatever the view
    a.begin_change(v1, _view({"A": [1], "B": [2, 3]}), held_data=True)
    assert a.epochs.change() == 3 and not b.stale_puller("other", a.epochs.change())
    # replicas of one view converge on the highest epoch any of them gave it
    c = Replica(2, "2.x")
    c.install_view(v2)
    c.observe_epoch(3, b.epoch, v2.view_id)
    assert c.epoch == b.epoch and c.epochs.newer_view is None


def test_members_leaving_our_shard_are_fenced_though_nothing_is_owed():
    """Seed 303 of the randomized test: A={1,2,3} -> A={1,2}.  Node 2 keeps A's keys, but
    node 3 serves them until it installs the new view; a write node 2 counts as stable with
    only node 1's confirmation must not be pruned while node 3 may still answer reads."""
    old, new = _view({"A": [1, 2, 3], "B": [4]}), _view({"A": [1, 2], "B": [3, 4]})
    custody = Custody(2)
    pulls = custody.begin(old, new, held_data=True)
    assert {p.member.id for p in pulls} == {3}
    key = _key_in(new, "A")
    assert not custody.awaiting(key)  # nothing owed: we hold A's keys
    assert custody.unfenced(key)  # but node 3 has not been fenced yet
    assert custody.pulled(pulls[0], Report(old, "A")) == []
    assert not custody.unfenced(key) and custody.pending() == []


def test_members_that_owe_their_own_shard_settle_it_together():
    """Staggered views: nodes 4 and 5 were put in B of a view only node 1 ever installed; each
    owes that shard itself, learned from the other.  Neither vouches alone, but both together
    hold everything B could have made stable (nothing, as neither confirmed a write there)."""
    never = _view({"A": [1, 2, 3], "B": [4, 5]})
    new = _view({"A": [1, 2], "B": [3, 4], "C": [5, 6]})
    custody = Custody(3)
    pulls = [p for p in custody.begin(never, new, held_data=False) if p.debt.source[1] == "B"]
    assert {p.member.id for p in pulls} == {4, 5}
    key = _key_in(new, "B", (never, "B"))
    owes_itself = ((never, "B"),)
    assert custody.pulled(_from(pulls, 4), Report(new, "B", owes_itself)) == []
    assert custody.awaiting(key)  # one of them is not enough
    assert custody.pulled(_from(pulls, 5), Report(new, "C", owes_itself)) == []
    assert not custody.awaiting(key)


def test_keys_a_lifted_fence_gives_back_are_pushed_again_before_they_count_as_stable():
    """Simulator, staggered views, seed 140: while fenced, a replica's pushes skip the fenced
    keys but cover their stream positions, so its peer confirms "seen up to n" without holding
    them.  Once the fence lifted, a write there counted as stable, was pruned from a token,
    and the peer that never got it served a stale read."""
    from trio_kv.clock import Version
    from trio_kv.messages import SyncReply
    from trio_kv.replica import Replica
    from trio_kv.store import Entry

    ours = _view({"A": [1, 2], "B": [3]})
    theirs = _view({"A": [1], "C": [2, 3]})
    a = Replica(1, "1.x")
    a.install_view(ours)
    key = _key_in(ours, "A", (theirs, "C"))
    a.store.put(key, Entry(Version(10, 1), "v", {}))
    a.custody.fence(theirs, [(theirs, "C")], a.view)  # node 2 (under `theirs`) pulled it from us
    batch = a.batch_for(2)
    assert batch is not None and batch.entries == [] and batch.upto == a.store.head
    a.on_sync_reply(2, SyncReply("2.y", ours.view_id, batch.upto, True, a.epoch))
    assert a.fence_for(key) is not None
    assert not a.peer_serves(2, ours.view_id)
    assert a.peer_serves(3, ours.view_id), "every owner under `theirs` now serves our view"
    assert a.fence_for(key) is None
    assert not a.stable(key, Version(10, 1)), "peer 2 never received it"
    again = a.batch_for(2)
    assert again is not None and [k for k, _ in again.entries] == [key]
