"""Cross-shard pruning: learn from each owning shard which dependencies on its keys are
stable, and drop them from the values stored here.

A write stores its writer's token as the value's causal past, and a node can prove stable
only dependencies on its own shard's keys (``Replica.prune``).  Dependencies on other shards'
keys therefore stayed in stored values, and ``GET /data``, whose token is the union of its
values' pasts, grew with the number of values until it met the token bound (503, for ever).

* A cursor walks the replica's stream.  A key is in the stream once, at its latest change,
  so every entry that lands here (a local write, a merged push, a pull page, a handoff)
  passes under it once: entries holding dependencies on other shards' keys join a queue of
  at most ``crossdeps_queue`` keys.  When the queue is full the cursor stops and resumes once
  answers make room: nothing is lost, only delayed.  A view install and a restart start the
  cursor again from 0 (the keyspace changed; dropped dependencies were not persisted).
* Per owning shard at most one query is in flight (``StableQuery`` to ``/internal/stable``):
  for each key depended on, the highest version any queued value needs, at most
  ``stable_query_deps`` keys and ``batch_bytes`` bytes, to one replica of that shard.  A failed
  call moves on to the shard's next replica after a backoff (failover).
* The replica answers with what its own ``prune`` would drop (``Replica.answer_stable``).
  Dependencies at or below a stable version are dropped from the queued values; a value
  still holding some is asked about again after a backoff up to ``heartbeat_interval`` (the
  owner learns stability from replication, idle replicas at least that often).

A dependency is dropped only on its owning shard's word, so one on a shard we cannot reach
stays, in the values and in listings over them (which may then meet the token bound).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..clock import Version
from ..messages import StableQuery, StableReply, WireError, dumps
from ..metadata import Deps
from ..store import Entry
from .events import Failed, Outcome
from .kernel import Timer
from .replication import answer_json

if TYPE_CHECKING:
    from .core import Core

PATH = "/internal/stable"


@dataclass(eq=False)
class Waiting:
    """A queued local key: when it may be asked about next, how many answers left some of its
    dependencies unproven, and those dependencies by owning shard (cached for the ``deps``
    dict they were computed from: a new entry, or dropped dependencies, bring a new dict)."""

    due: float
    tries: int = 0
    deps: Deps | None = None
    shards: dict[str, list[str]] = field(default_factory=dict)


@dataclass(eq=False)
class Owner:
    """Queries to one owning shard: which replica is asked, one call in flight."""

    turn: int  # index (mod the shard's size) of the replica asked next
    cid: int | None = None
    due: float = 0.0  # after a failed call: not before this
    failures: int = 0  # in a row


class CrossDeps:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.queue: dict[str, Waiting] = {}  # local keys, in the order they were queued
        self.cursor = 0  # stream position up to which entries were looked at
        self.owners: dict[str, Owner] = {}
        self.timer: Timer | None = None
        self.dropped = 0  # dependencies dropped from stored values (metrics, tests)
        self.queries = 0  # queries answered by an owner
        self.full = 0  # rounds in which the queue was full

    # ------------------------------------------------------------ scheduling
    def on_news(self) -> None:
        """Data changed: new entries to look at."""
        if self.core.replica.store.head > self.cursor:
            self._arm(self.core.config.crossdeps_interval)

    def restart(self) -> None:
        """A view was installed (or loaded): look at every entry again under it."""
        self.cursor = 0
        for waiting in self.queue.values():
            waiting.deps = None  # the ring changed: group again
        self._arm(self.core.config.crossdeps_interval)

    def _arm(self, delay: float) -> None:
        k = self.core.k
        at = k.now + max(0.0, delay)
        if self.timer is not None and not self.timer.cancelled:
            if self.timer.at <= at:
                return
            self.timer.cancel()
        self.timer = k.at(at, self._round)

    def _round(self) -> None:
        self.timer = None
        core, replica = self.core, self.core.replica
        view, shard = replica.view, replica.shard
        if view is None or shard is None or core.changes.changing:
            return  # nothing of ours to prune, or a view is coming: its install restarts us
        self._scan()
        cfg, now = core.config, core.k.now
        asks: dict[str, dict[str, Version]] = {}
        sizes: dict[str, int] = {}
        covered: dict[str, list[str]] = {}
        closed = {s for s, o in self.owners.items() if o.cid is not None or o.due > now}
        # when to look again: the earliest key or failed owner due, or at once if full
        nxt = min((o.due for o in self.owners.values() if o.cid is None and o.due > now),
                  default=math.inf)
        others = set(view.shards) - {shard}
        for key in list(self.queue):
            if others <= closed:
                break  # every query is full or waits: their answers (or backoffs) re-arm us
            waiting = self.queue[key]
            if waiting.due > now:
                nxt = min(nxt, waiting.due)
                continue
            entry = replica.store.get(key)
            by_shard = self._grouped(waiting, entry) if entry and replica.owns(key) else {}
            if entry is None or not by_shard:
                del self.queue[key]
                continue
            for owner, keys in by_shard.items():
                if owner in closed:
                    continue  # asked when its call ends (that re-arms), or after its backoff
                ask = asks.setdefault(owner, {})
                new = [k for k in keys if k not in ask]
                size = sum(len(dumps(k)) + 48 for k in new)
                if ask and (len(ask) + len(new) > cfg.stable_query_deps
                            or sizes.get(owner, 0) + size > cfg.batch_bytes):
                    closed.add(owner)  # this query is full; the rest go in the next one
                    continue
                for k in keys:
                    if k not in ask or entry.deps[k] > ask[k]:
                        ask[k] = entry.deps[k]
                sizes[owner] = sizes.get(owner, 0) + size
                covered.setdefault(owner, []).append(key)
        for owner in sorted(asks):
            self._ask(owner, asks[owner], covered[owner])
        if self.cursor < replica.store.head:
            nxt = now
        if nxt < math.inf:
            self._arm(max(cfg.crossdeps_interval, nxt - now))

    def _grouped(self, waiting: Waiting, entry: Entry) -> dict[str, list[str]]:
        """``entry``'s dependencies on other shards' keys, by owning shard."""
        if waiting.deps is not entry.deps:
            view = self.core.replica.view
            assert view is not None
            waiting.shards = {}
            for k in self.core.replica.foreign(entry):
                waiting.shards.setdefault(view.shard_for(k), []).append(k)
            waiting.deps = entry.deps
        return waiting.shards

    def _scan(self) -> None:
        """Queue the entries changed since the cursor that depend on other shards' keys; at
        most ``stable_query_deps`` entries looked at per round (a long store, after a restart
        or an install, is walked over several rounds without holding up the node)."""
        core, replica = self.core, self.core.replica
        cfg, now = core.config, core.k.now
        budget = cfg.stable_query_deps
        for seq, key, entry in replica.store.since(self.cursor):
            if budget <= 0:
                return
            budget -= 1
            if replica.owns(key) and replica.foreign(entry):
                waiting = self.queue.get(key)
                if waiting is not None:
                    waiting.due, waiting.tries = now, 0  # a new version: ask at once
                elif len(self.queue) >= cfg.crossdeps_queue:
                    self.full += 1
                    return  # full: resume here once answers make room
                else:
                    self.queue[key] = Waiting(now)
            self.cursor = seq
        self.cursor = max(self.cursor, replica.store.head)

    # ------------------------------------------------------------ asking
    def _ask(self, shard: str, ask: dict[str, Version], covered: list[str]) -> None:
        core = self.core
        view = core.replica.view
        assert view is not None
        members = view.shards[shard]
        owner = self.owners.get(shard)
        if owner is None:  # replicas spread the load: each node starts at another one
            owner = self.owners[shard] = Owner(turn=core.node_id)
        member = members[owner.turn % len(members)]
        query = StableQuery(core.node_id, sorted(ask.items()))
        owner.cid = core.k.call(
            member.address, "POST", PATH, dumps(query.to_wire()), core.config.peer_timeout,
            lambda outcome: self._answered(shard, owner, query, covered, outcome),
        )

    def _answered(
        self, shard: str, owner: Owner, query: StableQuery, covered: list[str],
        outcome: Outcome,
    ) -> None:
        core, replica, cfg = self.core, self.core.replica, self.core.config
        owner.cid = None
        now = core.k.now
        reply = _stable_reply(outcome, len(query.deps))
        if isinstance(reply, Failed):
            owner.failures += 1
            owner.turn += 1  # fail over to the shard's next replica
            owner.due = now + core.backoff(owner.failures)
            core.k.log(logging.DEBUG, f"node {core.node_id}: asking shard {shard} which "
                       f"dependencies are stable failed: {reply.reason}")
            self._arm(owner.due - now)
            return
        owner.failures = 0
        self.queries += 1
        stable = {k: v for (k, v), yes in zip(query.deps, reply.stable, strict=True) if yes}
        dropped = 0
        view = replica.view
        for key in covered:
            waiting = self.queue.get(key)
            if waiting is None:
                continue
            dropped += replica.drop_deps(key, stable) if stable else 0
            entry = replica.store.get(key)
            rest = self._grouped(waiting, entry) if entry is not None and view else {}
            if not rest:
                del self.queue[key]
            elif shard in rest:
                waiting.tries += 1
                pause = cfg.crossdeps_interval * 2.0 ** (waiting.tries - 1)
                waiting.due = now + min(cfg.heartbeat_interval, pause) * core.k.jitter(0.8, 1.2)
        if dropped:
            self.dropped += dropped
            core.claims_advanced()  # a listing waiting for a smaller token looks again
        self._arm(cfg.crossdeps_interval)

    # ------------------------------------------------------------ answering
    def on_query(self, raw: Any) -> dict[str, Any]:
        """Another shard asks which of these dependencies on our keys are stable here."""
        core = self.core
        query = StableQuery.from_wire(raw, core.wire_rules(), core.config.stable_query_deps)
        if core.changes.changing:  # serving no view for now, as for client requests: ask later
            return StableReply([False] * len(query.deps)).to_wire()
        return StableReply(core.replica.answer_stable(query.deps)).to_wire()


def _stable_reply(outcome: Outcome, asked: int) -> StableReply | Failed:
    body = answer_json(outcome, PATH)
    if isinstance(body, Failed):
        return body
    try:
        return StableReply.from_wire(body, asked)
    except WireError as exc:
        return Failed(f"malformed answer from {PATH}: {exc}")
