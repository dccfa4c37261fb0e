"""``Core``: one node's every protocol decision, as a pure state machine.

Inputs (each with ``now``, monotonic seconds, and ``wall_ms``, the node's wall clock):
``request`` (client data request), ``abandon`` (its client went away), ``put_view``,
``on_sync`` / ``on_pull`` / ``on_handoff`` / ``on_stable`` (peer messages, answered at once),
``call_done`` (the outcome of a ``Call`` it decided), ``tick`` (timers).  Each returns the decisions
(``events.Output``) it made.  No trio, no HTTP, no clock reads, no module-level randomness:
the same inputs give the same outputs, which is what lets ``trio_kv.sim`` replay a seed.

Like raft's ``Step``/``Tick``/``Ready``: the caller feeds inputs, then carries out what comes
out (persist, then send, then answer).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from ..config import Config
from ..messages import WireRules
from ..metadata import TokenRules
from ..replica import Replica, ReplicaLimits
from ..stats import NodeStats
from ..view import View
from .crossdeps import CrossDeps
from .events import Outcome, Output, Persist, Request
from .kernel import Kernel
from .replication import Replication
from .requests import Requests
from .viewchange import ViewChanges


class Core:
    def __init__(self, config: Config, origin: str, rng: random.Random) -> None:
        if config.node_id is None:
            raise ValueError("a node needs an id (--id or NODE_IDENTIFIER)")
        self.config = config
        self.node_id = config.node_id
        self.k = Kernel(rng)
        self.token_rules = TokenRules(
            config.max_token_deps, config.max_token_bytes, config.max_key_bytes,
            config.max_skew_ms,
        )
        self.replica = Replica(
            config.node_id, origin,
            ReplicaLimits(
                config.batch_entries, config.batch_bytes, config.handoff_batch_entries,
                config.handoff_batch_bytes, self.token_rules,
            ),
        )
        self.stats = NodeStats()  # counters /metrics reads
        self.installs = 0  # views installed so far
        self.tombstones_collected = 0
        self.born: float | None = None  # time of the first input: this incarnation began
        self._changed = False  # data changed since the waiters last looked
        self._stabler = False  # peers confirmed more of our stream: tokens shrink
        self._dirty = False  # data changed: to persist before what follows is sent
        self._dirty_state = False  # the view or custody changed: to persist too
        self.requests = Requests(self)
        self.replication = Replication(self)
        self.changes = ViewChanges(self)
        self.crossdeps = CrossDeps(self)
        self.changes.start()
        self.replication.start()

    # ================================================================ inputs
    def request(self, rid: int, req: Request, now: float, wall_ms: int) -> list[Output]:
        self._at(now, wall_ms)
        self.requests.start(rid, req)
        return self._ready()

    def abandon(self, rid: int, now: float, wall_ms: int) -> list[Output]:
        """The client of ``rid`` went away: forget it (and its calls)."""
        self._at(now, wall_ms)
        self.requests.abandon(rid)
        self.changes.abandon(rid)
        return self._ready()

    def put_view(self, rid: int, view: View, now: float, wall_ms: int) -> list[Output]:
        self._at(now, wall_ms)
        self.changes.put_view(rid, view)
        return self._ready()

    def on_sync(self, raw: Any, now: float, wall_ms: int) -> tuple[dict[str, Any], list[Output]]:
        self._at(now, wall_ms)
        return self.replication.on_sync(raw), self._ready()

    def on_pull(self, raw: Any, now: float, wall_ms: int) -> tuple[dict[str, Any], list[Output]]:
        self._at(now, wall_ms)
        return self.changes.on_pull(raw), self._ready()

    def on_handoff(
        self, raw: Any, now: float, wall_ms: int
    ) -> tuple[dict[str, Any], list[Output]]:
        self._at(now, wall_ms)
        return self.changes.on_handoff(raw), self._ready()

    def on_stable(
        self, raw: Any, now: float, wall_ms: int
    ) -> tuple[dict[str, Any], list[Output]]:
        """Another shard asks which dependencies on our keys are stable (changes nothing)."""
        self._at(now, wall_ms)
        return self.crossdeps.on_query(raw), self._ready()

    def call_done(self, cid: int, outcome: Outcome, now: float, wall_ms: int) -> list[Output]:
        self._at(now, wall_ms)
        self.k.done(cid, outcome)
        return self._ready()

    def tick(self, now: float, wall_ms: int) -> list[Output]:
        """Time passed: run the timers due (as every input does)."""
        self._at(now, wall_ms)
        return self._ready()

    def recovered(self, now: float, wall_ms: int) -> list[Output]:
        """The replica was loaded from a data directory (or there was none): serve the view
        it recorded, retry what was pending, resume a change that was under way."""
        self._at(now, wall_ms)
        self.changes.recovered()
        self.crossdeps.restart()  # what was dropped from values was not persisted
        return self._ready()

    def resync(self, now: float, wall_ms: int) -> list[Output]:
        """Reset every stream summary and re-exchange whole streams (as a view install does)."""
        self._at(now, wall_ms)
        if self.replica.view is not None:
            self.replica.install_view(self.replica.view)
            self.replication.restart()
            self.notify()
        return self._ready()

    # ================================================================ queries
    def next_wake(self) -> float | None:
        return self.k.next_wake()

    def view_status(self) -> dict[str, Any]:
        return self.changes.view_status()

    def uptime(self) -> float:
        """Seconds since this incarnation's first input."""
        return self.k.now - (self.born if self.born is not None else self.k.now)

    def waiting(self) -> int:
        """Client requests parked in a wait."""
        return self.requests.parked_count()

    # ================================================================ shared by the parts
    def _at(self, now: float, wall_ms: int) -> None:
        if self.born is None:
            self.born = now
        self.k.now = max(self.k.now, now)
        self.k.wall_ms = wall_ms

    def _ready(self) -> list[Output]:
        """Wake what waits on changes made by this input, then hand out the decisions."""
        self.k.fire_due()
        while self._changed or self._stabler:
            changed, self._changed, self._stabler = self._changed, False, False
            if changed:
                self.replication.on_news()
                self.crossdeps.on_news()
            self.requests.reevaluate()
        out = self.k.take()
        if self._dirty or self._dirty_state:
            out.insert(0, Persist(self._dirty_state))
            self._dirty = self._dirty_state = False
        return out

    def notify(self) -> None:
        """Data (or the view) changed: waiting readers and idle senders look again."""
        self._changed = self._dirty = True

    def durable_answer(self) -> None:
        """An answer is about to vouch for data held here: it waits for everything staged."""
        self._dirty = True

    def state_changed(self) -> None:
        """The view or custody changed (a restart must resume from it)."""
        self._dirty_state = True

    def claims_advanced(self) -> None:
        self._stabler = True

    def wire_rules(self) -> WireRules:
        cfg = self.config
        return WireRules(
            self.token_rules, cfg.max_value_bytes, self.token_rules.latest_hlc(self.k.wall_ms),
            cfg.vnodes, cfg.max_view_nodes,
        )

    def backoff(self, failures: int) -> float:
        """Exponential, jittered, capped: retries keep trying without flooding a sick peer."""
        cfg = self.config
        base: float = min(
            cfg.handoff_retry_interval, cfg.retry_interval * 2.0 ** (max(1, failures) - 1)
        )
        return base * self.k.jitter(0.5, 1.5)

    def observe_epoch(self, peer: int, epoch: int, view_id: str) -> None:
        before = self.replica.epochs.newer_view
        self.replica.observe_epoch(peer, epoch, view_id)
        newer = self.replica.epochs.newer_view
        if newer is not None and newer != before:
            self.k.log(logging.INFO, (
                f"node {self.node_id}: node {newer.peer} serves view {newer.view_id} at epoch "
                f"{newer.epoch}, newer than ours (epoch {self.replica.epoch}); this node may "
                "not have been sent the latest view"
            ))

    def view_installed(self) -> None:
        self.installs += 1
        self.state_changed()
        self.replication.restart()
        self.crossdeps.restart()
        self.notify()
