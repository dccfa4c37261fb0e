"""The core on its own: inputs in, decisions out, no trio and no network.

These drive one ``Core`` by hand (the way the shell and the simulator do) and read the
decisions it makes: where a forwarded write goes after each kind of failure, what a retry
gets from a node that restarted, how a refused batch shrinks."""

from __future__ import annotations

import random
from typing import Any

from trio_kv.clock import Version
from trio_kv.config import Config
from trio_kv.core import Answer, Call, Core, Failed, Output, Request, Respond
from trio_kv.core.forwarding import RETRY_HEADER, WRITE_ID_HEADER
from trio_kv.messages import dumps, loads
from trio_kv.view import View, parse_view

WALL = 1_700_000_000_000


def two_shards(*, a: list[int], b: list[int]) -> View:
    return parse_view({"view": {
        "A": [{"address": f"10.0.0.{i}:8081", "id": i} for i in a],
        "B": [{"address": f"10.0.0.{i}:8081", "id": i} for i in b],
    }})


def calls(outputs: list[Output]) -> list[Call]:
    return [o for o in outputs if isinstance(o, Call)]


def replies(outputs: list[Output]) -> dict[int, Any]:
    return {o.rid: o.reply for o in outputs if isinstance(o, Respond)}


def serving(node_id: int, view: View, now: float = 0.0, **config: Any) -> Core:
    """A core that installed ``view`` (every peer says it has no view yet: a fresh cluster)."""
    core = Core(Config(node_id=node_id, **config), f"{node_id}.x", random.Random(1))
    out = core.put_view(1, view, now, WALL)
    fresh = dumps({"view": None, "epoch": 0})
    while 1 not in replies(out):
        pending = calls(out)
        assert pending, out
        out = []
        for call in pending:
            if call.path == "/view":
                out += core.call_done(call.cid, Answer(200, fresh), now, WALL)
            else:  # a fresh peer hands over nothing, and owes nothing
                assert call.path == "/internal/pull"
                peer = int(call.address.split(":")[0].rsplit(".", 1)[1])
                page = {"entries": [], "next": None, "from": peer, "epoch": 0, "view_id": "",
                        "report": {"view": None, "shard": None, "debts": []}}
                out += core.call_done(call.cid, Answer(200, dumps(page)), now, WALL)
    assert replies(out)[1].status == 200
    return core


def advance(core: Core, until: float) -> list[Output]:
    """Tick every timer due up to ``until``; what they decided."""
    out: list[Output] = []
    while (wake := core.next_wake()) is not None and wake <= until:
        out += core.tick(wake, WALL)
    return out


def key_on(view: View, shard: str) -> str:
    return next(f"k{i}" for i in range(1000) if view.shard_for(f"k{i}") == shard)


def test_an_ambiguous_write_failure_sticks_to_its_replica_and_marks_the_retry() -> None:
    view = two_shards(a=[1], b=[2, 3])
    core = serving(1, view)
    key = key_on(view, "B")
    out = core.request(7, Request("PUT", key, {}, "v"), 1.0, WALL)
    (first,) = calls(out)
    headers = dict(first.headers)
    assert first.lane == "forward" and WRITE_ID_HEADER in headers and RETRY_HEADER not in headers
    # the answer was lost: it may have been applied there
    out = core.call_done(first.cid, Failed("no answer"), 6.0, WALL)
    assert not calls(out)  # the network gets a moment first
    (again,) = [c for c in calls(advance(core, 6.0 + core.config.retry_interval))
                if c.lane == "forward"]
    assert again.address == first.address, "a write that may have arrived is never sent elsewhere"
    assert dict(again.headers)[WRITE_ID_HEADER] == headers[WRITE_ID_HEADER]
    assert dict(again.headers)[RETRY_HEADER] == "1"


def test_a_write_never_sent_fails_over_at_once() -> None:
    view = two_shards(a=[1], b=[2, 3])
    core = serving(1, view)
    out = core.request(7, Request("PUT", key_on(view, "B"), {}, "v"), 1.0, WALL)
    (first,) = calls(out)
    out = core.call_done(first.cid, Failed("refused", not_sent=True), 1.1, WALL)
    (second,) = calls(out)
    assert second.address != first.address and RETRY_HEADER not in dict(second.headers)


def test_a_retry_reaching_a_young_incarnation_is_answered_unknown_not_applied() -> None:
    """The simulator's find: a node that restarted lost its write-id answers, so a retry of a
    write its previous incarnation applied would be applied again, later, and could overwrite
    a write made in between."""
    view = two_shards(a=[1, 2], b=[3])
    young = serving(1, view, now=100.0)
    key = key_on(view, "A")
    retry = Request("PUT", key, {}, "v", hops=1, write_id="3.x.1", retry=True)
    reply = replies(young.request(5, retry, 101.0, WALL))[5]
    assert reply.status == 503 and reply.payload["outcome"] == "unknown"
    assert young.replica.store.get(key) is None
    # long after its start, a retry it has no answer for never reached an earlier incarnation
    reply = replies(young.request(6, retry, 100.0 + young.config.wait_deadline, WALL))[6]
    assert reply.status == 200 and young.replica.store.get(key) is not None


def test_a_write_id_answers_its_retry_without_applying_it_twice() -> None:
    view = two_shards(a=[1, 2], b=[3])
    core = serving(1, view)
    key = key_on(view, "A")
    req = Request("PUT", key, {}, "v", hops=1, write_id="3.x.1")
    first = replies(core.request(5, req, 40.0, WALL))[5]
    version = core.replica.store.get(key).version
    retry = Request("PUT", key, {}, "v", hops=1, write_id="3.x.1", retry=True)
    assert replies(core.request(6, retry, 41.0, WALL + 5))[6] == first
    assert core.replica.store.get(key).version == version
    other = Request("PUT", key, {}, "w", hops=1, write_id="3.x.1")  # same id, another write
    assert replies(core.request(7, other, 42.0, WALL + 9))[7].status == 200
    assert core.replica.store.get(key).value == "w"


def test_a_batch_refused_as_too_large_is_halved_never_resent_unchanged() -> None:
    view = two_shards(a=[1, 2], b=[3])
    core = serving(1, view, batch_bytes=1 << 20)
    for i, key in enumerate(k for k in (f"k{j}" for j in range(40)) if view.shard_for(k) == "A"):
        assert replies(core.request(100 + i, Request("PUT", key, {}, "v"), 0.0, WALL))
    pushes = [c for c in calls(core.resync(0.0, WALL)) if c.path == "/internal/sync"]
    assert pushes, "a sender starts with the view"
    sizes = []
    push = pushes[0]
    for _ in range(3):
        sizes.append(core.replication.senders[2].max_bytes)
        out = core.call_done(push.cid, Answer(413, b'{"error": "too large"}'), 1.0, WALL)
        out += advance(core, core.k.now + 1.0)
        push = next(c for c in calls(out) if c.path == "/internal/sync")
    assert sizes == [1 << 20, 1 << 19, 1 << 18]


def test_a_read_parks_until_its_dependency_arrives_and_then_answers() -> None:
    view = two_shards(a=[1, 2], b=[3])
    core = serving(1, view)
    key = key_on(view, "A")
    needed = {key: (WALL * 65536 + 5 << 0, 2)}
    from trio_kv.clock import Version

    deps = {key: Version(*needed[key])}
    out = core.request(9, Request("GET", key, deps), 1.0, WALL)
    assert 9 not in replies(out) and core.waiting() == 1
    batch = {"sender": 2, "origin": "2.y", "view_id": view.view_id, "epoch": core.replica.epoch,
             "after": 0, "upto": 1, "entries": [[key, "v", needed[key][0], 2, None]],
             "seen": {}, "positions": [1]}
    answer, out = core.on_sync(batch, 2.0, WALL)
    assert loads(dumps(answer))["accepted"] is True
    assert replies(out)[9].payload["value"] == "v" and core.waiting() == 0


def test_a_copy_of_a_write_still_in_hand_is_answered_with_it_not_handled_twice() -> None:
    """Simulator, staggered views, seed 274: two copies of one forwarded write reached a node
    that forwarded each on its own (under new write ids); one was applied again later, over
    a write the client made after the first was acknowledged."""
    view = two_shards(a=[1], b=[2, 3])
    core = serving(1, view)
    req = Request("PUT", key_on(view, "B"), {}, "v", hops=1, write_id="9.x.1")
    first = calls(core.request(5, req, 1.0, WALL))
    assert len(first) == 1
    assert calls(core.request(6, req, 1.01, WALL)) == [], "the copy is not forwarded again"
    out = core.call_done(first[0].cid, Answer(200, b'{"causal-metadata": {}}'), 1.02, WALL)
    assert set(replies(out)) == {5, 6}


def stable_queries(outputs: list[Output]) -> list[Call]:
    return [c for c in calls(outputs) if c.path == "/internal/stable"]


def test_cross_shard_deps_are_asked_of_the_owner_failed_over_and_dropped_on_its_word() -> None:
    """A value on shard A depending on a key of shard B: the core asks a replica of B which
    dependencies are stable, moves to B's other replica when that one fails, keeps what B
    does not confirm (asking again later) and drops what it does."""
    view = two_shards(a=[1], b=[2, 3])
    core = serving(1, view)
    mine, theirs = key_on(view, "A"), key_on(view, "B")
    other = next(f"x{i}" for i in range(1000) if view.shard_for(f"x{i}") == "B")
    dep, dep2 = Version(WALL << 16, 2), Version((WALL << 16) + 1, 3)
    out = core.request(7, Request("PUT", mine, {theirs: dep, other: dep2}, "v"), 1.0, WALL)
    assert replies(out)[7].status == 200
    assert set(core.replica.store.get(mine).deps) == {theirs, other}  # type: ignore[union-attr]
    (first,) = stable_queries(out + advance(core, 1.2))
    assert first.lane == "peer"
    asked = loads(first.body or b"")
    assert asked["from"] == 1 and sorted(k for k, *_ in asked["deps"]) == sorted([theirs, other])
    # that replica is unreachable: the next query goes to B's other replica, after a backoff
    out = core.call_done(first.cid, Failed("no route", not_sent=True), 1.3, WALL)
    assert not stable_queries(out)
    (second,) = stable_queries(advance(core, 3.0))
    assert second.address != first.address
    # a malformed answer is a failed call: nothing dropped
    core.call_done(second.cid, Answer(200, dumps({"stable": [True]})), 3.1, WALL)
    assert len(core.replica.store.get(mine).deps) == 2  # type: ignore[union-attr]
    (third,) = stable_queries(advance(core, 5.0))
    flags = [k == theirs for k, *_ in loads(third.body or b"")["deps"]]
    core.call_done(third.cid, Answer(200, dumps({"stable": flags})), 5.1, WALL)
    assert core.replica.store.get(mine).deps == {other: dep2}  # type: ignore[union-attr]
    assert core.crossdeps.dropped == 1 and mine in core.crossdeps.queue
    # what was not confirmed is asked about again, alone
    (fourth,) = stable_queries(advance(core, 12.0))
    assert [k for k, *_ in loads(fourth.body or b"")["deps"]] == [other]
    core.call_done(fourth.cid, Answer(200, dumps({"stable": [True]})), 12.1, WALL)
    assert core.replica.store.get(mine).deps == {}  # type: ignore[union-attr]
    assert not core.crossdeps.queue
    assert not stable_queries(advance(core, 30.0))  # nothing left to ask


def test_a_node_answers_stable_only_for_its_own_keys_on_every_replica() -> None:
    view = two_shards(a=[1], b=[2, 3])
    core = serving(1, view)
    mine, theirs = key_on(view, "A"), key_on(view, "B")
    out = core.request(7, Request("PUT", mine, {}, "v"), 1.0, WALL)
    version = core.replica.store.get(mine).version  # type: ignore[union-attr]
    query = {"from": 2, "deps": [[mine, version.hlc, version.node],
                                 [mine, version.hlc + 1, version.node],
                                 [theirs, version.hlc, 2]]}
    answer, out = core.on_stable(query, 1.1, WALL)
    assert answer == {"stable": [True, False, False]}
    assert not calls(out)


def test_a_pull_refused_by_a_member_that_pulled_from_us_meanwhile_is_retried_at_once() -> None:
    """Fresh nodes given their first view moments apart: our pull reaches a member before it
    has the view (refused), and that member's own pull reaches us before its refusal does.
    Its pull says it has begun the change, so the refusal is retried at once, not after a
    retry period."""
    view = parse_view({"view": {"A": [
        {"address": f"10.0.0.{i}:8081", "id": i} for i in (1, 2, 3)]}})
    fresh = dumps({"view": None, "epoch": 0})

    def learn(core: Core) -> list[Call]:
        """Put the view; answer every peer's ``/view`` as a fresh node would; its pulls."""
        out = core.put_view(1, view, 0.0, WALL)
        pulls = []
        while out:
            pending, out = calls(out), []
            for call in pending:
                if call.path == "/view":
                    out += core.call_done(call.cid, Answer(200, fresh), 0.0, WALL)
                else:
                    pulls.append(call)
        return pulls

    one = Core(Config(node_id=1), "1.x", random.Random(1))
    to_three = [c for c in learn(one) if c.address.startswith("10.0.0.3:")]
    assert [c.path for c in to_three] == ["/internal/pull"]  # in flight
    three = Core(Config(node_id=3), "3.x", random.Random(3))
    from_three = [c for c in learn(three) if c.address.startswith("10.0.0.1:")]
    answer, _ = one.on_pull(loads(from_three[0].body), 0.001, WALL)  # it pulls from us
    assert "entries" in answer
    refused = dumps({"error": "pull refused: it comes from a node in no view we know"})
    out = one.call_done(to_three[0].cid, Answer(400, refused), 0.002, WALL)
    assert [(c.address, c.path) for c in calls(out)] == [("10.0.0.3:8081", "/internal/pull")]


def test_each_node_forwards_to_its_own_preferred_replica_and_fails_over_from_it() -> None:
    """Reads and writes from one node go to one replica of a shard (its frames share
    wake-ups there, and a session finds its writes); other nodes prefer others."""
    view = two_shards(a=[1, 4, 5, 6, 7], b=[2, 3])
    key = key_on(view, "B")
    chosen = {}
    for node in (1, 4, 5, 6, 7):
        core = serving(node, view)
        targets = {c.address for rid in range(10) for c in calls(
            core.request(rid, Request("GET" if rid % 2 else "PUT", key, {}, "v"), 1.0, WALL))}
        assert len(targets) == 1, "one node sticks to one replica"
        chosen[node] = targets.pop()
    assert set(chosen.values()) == {"10.0.0.2:8081", "10.0.0.3:8081"}, "nodes spread"
    core = serving(1, view)
    (first,) = calls(core.request(50, Request("GET", key, {}), 1.0, WALL))
    (second,) = calls(core.call_done(first.cid, Failed("refused", not_sent=True), 1.1, WALL))
    assert second.address != first.address
    (later,) = calls(core.request(51, Request("GET", key, {}), 1.2, WALL))
    assert later.address == second.address, "a replica that failed is tried last for a while"


def test_under_load_a_push_with_no_entries_waits_for_the_report_interval() -> None:
    """Each push a replica merges gives it news to report (its version vector) but nothing to
    ship back; those reports are paced, while its own writes still go at once."""
    view = two_shards(a=[1, 2], b=[3])
    one, two = serving(1, view), serving(2, view)
    key = key_on(view, "A")
    every = two.config.replication_report_interval

    def pushes(out: list[Output]) -> list[Call]:
        return [c for c in calls(out) if c.path == "/internal/sync"]

    def deliver(sender: Core, receiver: Core, push: Call, now: float) -> list[Output]:
        """Hand one push to ``receiver`` and its answer back; what the receiver decided."""
        answer, out = receiver.on_sync(loads(push.body), now, WALL)
        sender.call_done(push.cid, Answer(200, dumps(answer)), now, WALL)
        return out + advance(receiver, now)

    now = 10.0
    # senders start afresh; the first exchange (a report each) goes at once
    first = [(one, two, p) for p in pushes(one.resync(now, WALL))]
    first += [(two, one, p) for p in pushes(two.resync(now, WALL))]
    assert len(first) == 2
    for sender, receiver, push in first:
        assert not pushes(deliver(sender, receiver, push, now))
    reports = 0
    for i in range(5):  # writes on node 1, each pushed to node 2 after the linger
        now += 0.03
        out = one.request(100 + i, Request("PUT", key, {}, f"v{i}"), now, WALL)
        (push,) = pushes(out + advance(one, now))
        assert loads(push.body)["entries"]
        for back in pushes(deliver(one, two, push, now)):
            assert not loads(back.body)["entries"]
            reports += 1
            deliver(two, one, back, now)
    assert reports == 1, f"one report per {every} s while pushes come every 30 ms"
    now += every
    (report,) = pushes(advance(two, now))  # then it goes
    out = two.request(200, Request("PUT", key, {}, "mine"), now, WALL)
    assert not pushes(out + advance(two, now + 1.0)), "one push in flight per peer"
    answer, _ = one.on_sync(loads(report.body), now, WALL)
    out = two.call_done(report.cid, Answer(200, dumps(answer)), now, WALL)
    (push,) = pushes(out + advance(two, now + two.config.replication_linger))
    assert loads(push.body)["entries"], "a write of its own is not held back"


def test_while_a_report_waits_merged_writes_leave_its_timer_alone() -> None:
    """A replica that only merges its peer's pushes has nothing to ship back: each push it
    merges leaves its report timer alone rather than arming a push of its own (a wake-up
    that would find nothing to send)."""
    view = two_shards(a=[1, 2], b=[3])
    one = serving(1, view)
    two = serving(2, view, replication_linger=0.08, replication_report_interval=0.13)
    key = key_on(view, "A")

    def exchange(sender: Core, receiver: Core, out: list[Output], now: float) -> int:
        """Deliver ``sender``'s pushes and the answers; how many there were."""
        pushes = [c for c in calls(out) if c.path == "/internal/sync"]
        for push in pushes:
            answer, _ = receiver.on_sync(loads(push.body), now, WALL)
            sender.call_done(push.cid, Answer(200, dumps(answer)), now, WALL)
        return len(pushes)

    assert exchange(one, two, one.resync(10.0, WALL), 10.0) == 1  # a report each
    assert exchange(two, one, two.resync(10.0, WALL), 10.0) == 1
    for rid, at in enumerate((10.02, 10.05)):  # news; its report waits (due at 10.13)
        out = one.request(rid, Request("PUT", key, {}, "a"), at, WALL) + advance(one, at)
        assert exchange(one, two, out, at) == 1
        assert not calls(advance(two, at))
    assert not calls(two.tick(10.09, WALL)), "its linger is over: nothing to ship back"
    report = two.replication.senders[1].timer
    assert report is not None and abs(report.at - 10.13) < 1e-9
    out = one.request(9, Request("PUT", key, {}, "b"), 10.1, WALL) + advance(one, 10.1)
    assert exchange(one, two, out, 10.1) == 1
    assert two.replication.senders[1].timer is report and not report.cancelled
    # a write of its own is something to ship: it goes at once, not when the report is due
    pushes = [c for c in calls(two.request(10, Request("PUT", key, {}, "c"), 10.11, WALL))
              if c.path == "/internal/sync"]
    assert [e[1] for p in pushes for e in loads(p.body)["entries"]] == ["c"]


def test_under_load_a_push_goes_with_the_first_input_after_its_linger() -> None:
    """The linger is slack: a node kept awake by requests pushes when the next one comes;
    only a quiet node wakes for the push, a linger later."""
    view = two_shards(a=[1, 2], b=[3])
    one = serving(1, view)
    key, linger = key_on(view, "A"), one.config.replication_linger
    ok = dumps({"origin": "2.x", "view_id": view.view_id, "seen": 0, "accepted": True,
                "epoch": 0})

    def pushed(out: list[Output]) -> list[Call]:
        return [c for c in calls(out) if c.path == "/internal/sync"]

    advance(one, 10.0)
    (push,) = pushed(one.resync(10.0, WALL))
    one.call_done(push.cid, Answer(200, ok), 10.0, WALL)
    assert not pushed(one.request(1, Request("PUT", key, {}, "a"), 10.001, WALL))
    assert not pushed(advance(one, 10.0 + 2 * linger - 0.001))
    (push,) = pushed(advance(one, 10.0 + 2 * linger + 1e-9))  # a quiet node wakes for it
    last = one.k.now
    one.call_done(push.cid, Answer(200, ok), last + 0.001, WALL)
    assert not pushed(one.request(2, Request("PUT", key, {}, "b"), last + 0.002, WALL))
    assert not pushed(one.request(3, Request("GET", key, {}), last + linger / 2, WALL))
    (push,) = pushed(one.request(4, Request("GET", key, {}), last + linger, WALL))
    assert loads(push.body)["entries"]


def test_a_handoff_answered_later_by_a_member_already_done_pulling_is_offered_again_at_once(
) -> None:
    """The resharding bench's 3 s outlier: a new owner pulled its last page from us before
    our offer's answer ("later: I will pull those") came back.  The wake-up its last page
    gives had nothing to wake yet, so the offer waited out ``handoff_later_wait``.  Now the
    answer itself finds the member done and offers again at once."""
    old = parse_view({"view": {"A": [{"address": "10.0.0.1:8081", "id": 1}]}})
    new = two_shards(a=[1], b=[2])
    one = serving(1, old)
    moved = [k for k in (f"k{i}" for i in range(40)) if new.shard_for(k) == "B"]
    for i, key in enumerate(moved):
        one.request(100 + i, Request("PUT", key, {}, "v"), 1.0, WALL)
    two = Core(Config(node_id=2), "2.x", random.Random(2))
    cores = {"10.0.0.1:8081": one, "10.0.0.2:8081": two}
    held: list[tuple[Core, Call, dict[str, Any]]] = []  # offer answers held back
    pulls: list[Call] = []  # the member's pulls, held until we began the change too
    pulled_last = False

    def serve(target: Core, call: Call, now: float) -> tuple[dict[str, Any], list[Output]]:
        body = loads(call.body) if call.body else None
        if call.path == "/view":
            return target.view_status(), []
        handler = {"/internal/pull": target.on_pull, "/internal/handoff": target.on_handoff,
                   "/internal/sync": target.on_sync, "/internal/stable": target.on_stable}
        return handler[call.path](body, now, WALL)

    def pump(caller: Core, outputs: list[Output], now: float, hold_pulls: bool) -> None:
        nonlocal pulled_last
        for call in calls(outputs):
            if hold_pulls and caller is two and call.path == "/internal/pull":
                pulls.append(call)
                continue
            target = cores[call.address]
            answer, more = serve(target, call, now)
            if call.path == "/internal/pull" and answer.get("next") is None:
                pulled_last = True
            offer = call.path == "/internal/handoff" and "offer" in loads(call.body or b"{}")
            if offer and caller is one and not pulled_last:
                held.append((caller, call, answer))  # its answer comes after the last page
                continue
            pump(target, more, now, hold_pulls)
            pump(caller, caller.call_done(call.cid, Answer(200, dumps(answer)), now, WALL),
                 now, hold_pulls)

    now = 2.0
    pump(two, two.put_view(1, new, now, WALL), now, hold_pulls=True)
    pump(one, one.put_view(2, new, now, WALL), now, hold_pulls=True)
    assert pulls and held, "the member pulls from us; it answered our offer meanwhile"
    for call in pulls:  # now its pull goes through, to the last page
        answer, more = one.on_pull(loads(call.body or b""), now, WALL)
        pulled_last = pulled_last or answer.get("next") is None
        pump(one, more, now, hold_pulls=False)
        pump(two, two.call_done(call.cid, Answer(200, dumps(answer)), now, WALL), now,
             hold_pulls=False)
    assert pulled_last
    caller, call, answer = held.pop(0)
    assert answer["later"], "it said it would pull those itself"
    out = caller.call_done(call.cid, Answer(200, dumps(answer)), now, WALL)
    again = [c for c in calls(out) if c.path == "/internal/handoff"]
    assert again and not loads(again[0].body or b"")["patient"], "offered again at once"
