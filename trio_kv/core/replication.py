"""Replication scheduling: one sender per peer of our shard pushes our stream.

At once on news, but under load pushes to one peer are at least ``replication_linger`` apart
(writes batch themselves) and go with the node's first input after that, the node waking for
one only a linger later (a wake-up costs more than the push); a push with no entries (it
only reports how far we have seen every stream: what the peer learns stability from) only
``replication_report_interval`` after the last push (every push reports), since under load
every push a peer receives would otherwise call for one back; one call in flight per peer;
an idle peer gets a heartbeat every ``heartbeat_interval``; a failed push is retried after
``retry_interval`` (jittered); a batch a peer refuses as too large is halved, never resent
unchanged.  Senders are replaced whenever a view is installed (claims follow the keyspace).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..messages import SyncBatch, SyncReply, WireError, dumps, loads
from ..tombstones import collect, horizon
from ..view import Member
from .events import Answer, Failed, Outcome
from .kernel import Timer

if TYPE_CHECKING:
    from .core import Core


@dataclass(eq=False)
class Sender:
    peer: Member
    max_bytes: int  # halved while the peer refuses our batches as too large
    last_push: float = -math.inf  # when the last call went
    reporting: bool = False  # waiting to send a report: news with nothing to ship waits too
    checked: tuple[int, int] = (0, 0)  # (the peer's claim, our position): nothing to ship
    news: bool = False  # data changed since this sender last looked
    idle: bool = False
    cid: int | None = None
    timer: Timer | None = None
    stopped: bool = False
    crashes: int = 0  # in a row: the restart backs off


class Replication:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.senders: dict[int, Sender] = {}

    def start(self) -> None:
        self.core.k.after(0.0, self._collect)

    def _collect(self) -> None:
        """Every ``tombstone_interval``: forget the deletes ``tombstones.collectable`` allows
        (every replica has them, no custody pending, older than ``tombstone_grace``)."""
        core, cfg = self.core, self.core.config
        grace_ms, now = int(cfg.tombstone_grace * 1000), core.k.wall_ms
        replica = core.replica
        replica.collect_horizon = max(replica.collect_horizon, horizon(now, grace_ms))
        settled = not core.changes.changing and core.changes.progress.state == "idle"
        keys = collect(replica, now, grace_ms, settled)
        if keys:
            core.tombstones_collected += len(keys)
            core.k.log(logging.DEBUG, f"node {core.node_id}: collected {len(keys)} tombstones")
            core.notify()  # persisted with the next commit
        core.k.after(cfg.tombstone_interval, self._collect)

    def restart(self) -> None:
        """New senders for the peers of the view just installed."""
        for s in self.senders.values():
            self._stop(s)
        self.senders = {
            p.id: Sender(p, self.core.config.batch_bytes) for p in self.core.replica.peers
        }
        for s in self.senders.values():
            self._top(s)

    def _stop(self, s: Sender) -> None:
        s.stopped = True
        self.core.k.cancel(s.cid)
        if s.timer is not None:
            s.timer.cancel()

    def on_news(self) -> None:
        replica = self.core.replica
        for s in self.senders.values():
            s.news = True
            if s.reporting:
                claim = replica.claims.get(s.peer.id, 0)
                after = s.checked[1] if s.checked[0] == claim else claim
                if not replica.to_ship(s.peer.id, after):
                    s.checked = (claim, replica.store.head)
                    continue  # nothing to ship yet, only more to report: the timer stands
            if s.idle:
                s.idle = False
                if s.timer is not None:
                    s.timer.cancel()
                self._top(s)

    def _top(self, s: Sender) -> None:
        """Push again: after the linger, counting as news only changes made from now on."""
        k = self.core.k
        s.news, s.idle, s.timer, s.reporting = False, False, None, False
        linger = self.core.config.replication_linger
        at = s.last_push + linger
        if at > k.now:  # pushed from the first input after the linger, or a linger later
            s.timer = k.at(at, lambda: self._push(s), slack=linger)
        else:
            self._push(s)

    def _report(self, s: Sender) -> None:
        s.idle = s.reporting = False
        self._push(s)

    def _wait(self, s: Sender, delay: float, idle: bool = False) -> None:
        s.idle = idle
        s.timer = self.core.k.after(delay, lambda: self._top(s))

    def _push(self, s: Sender) -> None:
        """Build and send the next batch.  A failure here (a bug, or data we did not
        foresee) is counted and logged, and the sender starts over after a backoff, while
        the node keeps serving."""
        core = self.core
        s.timer, s.news = None, False  # the batch covers every change so far
        try:
            batch = core.replica.batch_for(s.peer.id, s.max_bytes)
        except Exception:
            s.crashes += 1
            core.k.failed(f"node {core.node_id}: the sender to {s.peer.id}")
            return self._wait(s, core.backoff(s.crashes))
        if batch is None:
            s.stopped = True
            return
        if not batch.entries:
            at = s.last_push + core.config.replication_report_interval
            if at > core.k.now:  # every push reports: one within the interval did
                s.idle = s.reporting = True  # entries to ship cut the wait short
                s.checked = (core.replica.claims.get(s.peer.id, 0), batch.upto)
                s.timer = core.k.at(at, lambda: self._report(s))
                return
        s.last_push = core.k.now
        s.cid = core.k.call(
            s.peer.address, "POST", "/internal/sync", dumps(batch.to_wire()),
            core.config.peer_timeout, lambda outcome: self._answered(s, batch, outcome),
        )

    def _answered(self, s: Sender, batch: SyncBatch, outcome: Outcome) -> None:
        try:
            self._after_push(s, batch, outcome)
        except Exception:
            s.crashes += 1
            self.core.k.failed(f"node {self.core.node_id}: the sender to {s.peer.id}")
            self._wait(s, self.core.backoff(s.crashes))

    def _after_push(self, s: Sender, batch: SyncBatch, outcome: Outcome) -> None:
        core, cfg = self.core, self.core.config
        s.cid = None
        retry = cfg.retry_interval * core.k.jitter(0.5, 1.5)
        reply = _sync_reply(outcome)
        if not isinstance(reply, SyncReply):
            s.max_bytes = self._after_refusal(reply, s.max_bytes, len(batch.entries), s.peer.id)
            return self._wait(s, retry)
        s.crashes = 0
        core.observe_epoch(s.peer.id, reply.epoch, reply.view_id)
        if core.replica.on_sync_reply(s.peer.id, reply):
            core.claims_advanced()
        core.stats.synced("sent", len(batch.entries))
        if not reply.accepted:
            return self._wait(s, retry)
        if core.replica.has_news_for(s.peer.id) and batch.upto > batch.after:
            return self._top(s)
        if s.news:
            return self._top(s)
        self._wait(s, cfg.heartbeat_interval * core.k.jitter(0.8, 1.2), idle=True)

    def _after_refusal(self, failed: Failed, max_bytes: int, entries: int, peer: int) -> int:
        """Log a failed push; the batch bytes to use next (halved after a 413)."""
        k, me = self.core.k, self.core.node_id
        if failed.too_large:
            if entries <= 1:
                k.log(logging.ERROR, f"node {me}: peer {peer} refuses one entry as too large: "
                      "its max_peer_message_bytes is below ours")
                return max_bytes
            k.log(logging.WARNING,
                  f"node {me}: peer {peer} refused a batch as too large; halving it")
            return max(1, max_bytes // 2)
        k.log(logging.DEBUG, f"node {me}: call to {peer} failed: {failed.reason}")
        return max_bytes

    # ------------------------------------------------------------ receiving
    def on_sync(self, raw: Any) -> dict[str, Any]:
        core = self.core
        batch = SyncBatch.from_wire(raw, core.wire_rules())
        core.observe_epoch(batch.sender, batch.epoch, batch.view_id)
        claimed = core.replica.claims.get(batch.sender, 0)
        reply, changed = core.replica.on_sync(batch)
        core.stats.synced("received", len(batch.entries))
        if core.replica.claims.get(batch.sender, 0) > claimed:
            core.claims_advanced()
        if changed:
            core.notify()
        return reply.to_wire()


def _sync_reply(outcome: Outcome) -> SyncReply | Failed:
    if isinstance(outcome, Failed):
        return outcome
    if outcome.status != 200:
        return Failed(f"/internal/sync answered {outcome.status}: {outcome.body[:200]!r}",
                      too_large=outcome.status == 413)
    try:
        return SyncReply.from_wire(loads(outcome.body))
    except (WireError, ValueError) as exc:
        return Failed(f"malformed sync reply: {exc}")


def answer_json(outcome: Outcome, path: str) -> Any:
    """The decoded JSON of a 200 answer; a ``Failed`` for anything else."""
    if isinstance(outcome, Failed):
        return outcome
    assert isinstance(outcome, Answer)
    if outcome.status != 200:
        return Failed(f"{path} answered {outcome.status}: {outcome.body[:200]!r}",
                      too_large=outcome.status == 413)
    try:
        return loads(outcome.body)
    except ValueError:
        return Failed(f"{path} answered malformed JSON")
