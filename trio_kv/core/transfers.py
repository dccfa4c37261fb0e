"""The tasks of a view change, as state machines: learning the previous view, custody pulls
(page by page), handoff batches (acknowledged by every receiver, split when too large), and
fence probes.  Each reports to its ``Phase`` when it is done."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import transfer
from ..handoff import Pull
from ..messages import (
    Handoff,
    OfferReply,
    PeerViewStatus,
    PullPage,
    PullRequest,
    Whoami,
    WireError,
    dumps,
)
from ..store import Entry
from ..view import Member, View
from .events import Failed, Outcome
from .kernel import Timer
from .replication import answer_json

if TYPE_CHECKING:
    from .core import Core

Entries = list[tuple[str, Entry]]


def view_status_of(core: Core, outcome: Outcome) -> PeerViewStatus | None:
    """What a peer's ``GET /view`` answer says (None: no answer, or not one we understand)."""
    raw = answer_json(outcome, "/view")
    if isinstance(raw, Failed):
        return None
    try:
        return PeerViewStatus.from_wire(raw, core.wire_rules())
    except (WireError, KeyError, TypeError) as exc:
        core.k.log(logging.DEBUG, f"node {core.node_id}: a view status is malformed: {exc}")
        return None


@dataclass(eq=False)
class Task:
    """Something a phase waits for; ``cids``/``timer`` are cancelled with it."""

    on_end: Callable[[Task], None]
    cids: set[int] = field(default_factory=set)
    waiting: int = 0  # calls of the current round not yet answered
    timer: Timer | None = None
    ended: bool = False

    def call(self, core: Core, cid: int) -> None:
        self.cids.add(cid)
        self.waiting += 1

    def answered(self) -> bool:
        """One call of the round answered; True when it was the last."""
        self.waiting -= 1
        if self.waiting == 0:
            self.cids.clear()
        return self.waiting == 0

    def cancel(self, core: Core) -> None:
        self.ended = True
        for cid in sorted(self.cids):
            core.k.cancel(cid)
        self.cids.clear()
        self.waiting = 0
        if self.timer is not None:
            self.timer.cancel()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_end(self)


@dataclass(eq=False)
class Learn(Task):
    """A node with no view asks the new view's members for theirs; see ``ViewChanges``."""

    new: View | None = None
    silent: set[int] = field(default_factory=set)
    found: list[tuple[int, View]] = field(default_factory=list)
    failures: int = 0
    until: float = 0.0
    learned: View | None = None

    def begin(self, core: Core) -> None:
        assert self.new is not None
        self.silent = {m.id for m in self.new.members() if m.id != core.node_id}
        self.until = core.k.now + core.config.view_change_deadline / 2
        self._round(core)

    def _round(self, core: Core) -> None:
        self.timer = None
        assert self.new is not None
        asked = [m for m in self.new.members() if m.id in self.silent]
        if not asked:
            return self._finish(core)
        for member in asked:
            self.call(core, core.k.call(
                member.address, "GET", "/view", None, core.config.connect_timeout,
                lambda outcome, m=member: self._heard(core, m, outcome),  # type: ignore[misc]
            ))

    def _heard(self, core: Core, member: Member, outcome: Outcome) -> None:
        last = self.answered()
        status = view_status_of(core, outcome)
        if status is not None:
            self.silent.discard(member.id)
            assert self.new is not None
            if status.view is not None and status.view.view_id != self.new.view_id:
                self.found.append((status.epoch, status.view))
        if not last:
            return
        if self.found or not self.silent or core.k.now >= self.until:
            return self._finish(core)
        self.failures += 1
        self.timer = core.k.after(
            min(core.backoff(self.failures), max(0.0, self.until - core.k.now)),
            lambda: self._round(core),
        )

    def give_up(self, core: Core) -> None:
        self.cancel(core)
        self.ended = False
        self._finish(core)

    def _finish(self, core: Core) -> None:
        if not self.found:
            if self.silent:
                core.k.log(logging.WARNING, (
                    f"node {core.node_id}: members {sorted(self.silent)} did not say which view "
                    "they serve; taking the cluster to be fresh"))
        else:
            epoch, view = max(self.found, key=lambda f: f[0])
            core.k.log(logging.INFO, f"node {core.node_id}: learned previous view "
                       f"{view.view_id} (epoch {epoch}) from peers")
            self.learned = view
        self.end()


@dataclass(eq=False)
class PullTask(Task):
    """Fetch the keys of one debt from one old owner, page by page, retrying until done.

    A ``held`` pull (another member of the debt's shard is being pulled) first asks for an
    empty page, which fences its member at once, then waits for ``release``: it then asks
    only for what the pulls before it did not bring."""

    pull: Pull | None = None
    view: View | None = None
    cursor: str = ""
    failures: int = 0
    max_bytes: int = 0
    started: list[Pull] = field(default_factory=list)  # pulls its report added
    on_stall: Callable[[PullTask], None] | None = None  # called once, at its first failure
    held: bool = False
    paused: bool = False  # held, and its member fenced: waits for ``release``
    nudged: bool = False  # its member pulled from us while our page was in flight

    def begin(self, core: Core) -> None:
        assert self.pull is not None
        self.max_bytes = core.config.handoff_batch_bytes
        if self.pull.round > 1:  # owed again: its sources were still settling
            self.timer = core.k.after(core.backoff(self.pull.round - 1), lambda: self._step(core))
        else:
            self._step(core)

    def _step(self, core: Core) -> None:
        pull, view, cfg = self.pull, self.view, core.config
        assert pull is not None and view is not None
        self.timer = None
        if core.replica.custody.pulls.get((pull.member.id, pull.debt.ident)) is not pull:
            return self.end()
        # What we hold there already (pulled from another member, or handed to us) is not
        # sent again.
        known, complete = transfer.known_after(
            core.replica, pull.debt.within, self.cursor, cfg.handoff_batch_entries,
            self.max_bytes // 2,
        ) if not self.held else ([], False)
        core.stats.pull_digests_sent += len(known)
        request = PullRequest(
            view, pull.debt.within, self.cursor, 0 if self.held else cfg.handoff_batch_entries,
            Whoami(core.node_id, core.replica.epoch_for(view), view.view_id), self.max_bytes,
            known, complete,
        )
        self.call(core, core.k.call(
            pull.member.address, "POST", "/internal/pull", dumps(request.to_wire()),
            cfg.peer_timeout, lambda outcome: self._page(core, outcome),
        ))

    def _page(self, core: Core, outcome: Outcome) -> None:
        pull = self.pull
        assert pull is not None
        self.answered()
        raw = answer_json(outcome, "/internal/pull")
        try:
            if isinstance(raw, Failed):
                raise _Retry(raw.reason, raw.too_large)
            page = PullPage.from_wire(raw, core.wire_rules())
            core.observe_epoch(pull.member.id, page.sender.epoch, page.sender.view_id)
            if page.stale:
                raise _Retry(f"it serves a newer view ({page.sender})")
        except (_Retry, WireError, KeyError, TypeError) as exc:
            core.k.log(logging.INFO, f"pull from {pull.member.id} failed, retrying: {exc}")
            if isinstance(exc, _Retry) and exc.too_large:
                self.max_bytes = max(1, self.max_bytes // 2)
            self.failures += 1
            nudged, self.nudged = self.nudged, False  # refused by a member that has since
            if not nudged:  # begun the change: retried at once, below
                self.timer = core.k.after(core.backoff(self.failures), lambda: self._step(core))
            if self.on_stall is not None:
                stalled, self.on_stall = self.on_stall, None
                stalled(self)
            if nudged and not self.ended:
                self._step(core)
            return
        self.failures, self.nudged = 0, False
        core.replica.custody.answered(pull)
        core.replica.merge(page.entries)
        progress = core.changes.progress
        progress.keys_received += len(page.entries)
        progress.bytes_received += sum(e.size for _, e in page.entries)
        core.notify()
        if page.report is not None:
            self.started = core.replica.custody.pulled(pull, page.report)
            return self.end()
        assert page.next is not None
        self.cursor = page.next
        if self.held:
            self.paused = True
            return
        self._step(core)

    def release(self, core: Core, on_stall: Callable[[PullTask], None]) -> None:
        """Its turn: pull what the pulls before it did not bring."""
        self.held, self.on_stall = False, on_stall
        if self.paused and not self.ended:
            self.paused = False
            self._step(core)

    def nudge(self, core: Core) -> None:
        """Its member just pulled from us, so it has begun the change it refused our pull
        for (a node still learning the previous view knows no view): retry now, or, if
        our page is still in flight, as soon as it is refused."""
        if self.ended:
            return
        if self.timer is not None and self.failures:
            self.timer.cancel()
            self._step(core)
        elif self.waiting:
            self.nudged = True


class _Retry(Exception):
    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


@dataclass(eq=False)
class Receiver:
    """One receiver's part of a handoff batch: what it has not yet said it holds."""

    member: Member
    later: Entries = field(default_factory=list)  # it pulls them from us itself
    queue: list[Entries] = field(default_factory=list)  # to send, in chunks (last first)
    calls: int = 0  # calls to it in flight
    retry: Timer | None = None  # after a failed call
    fallback: Timer | None = None  # stop waiting for it to pull ``later``
    failures: int = 0

    @property
    def done(self) -> bool:
        return not (self.later or self.queue or self.calls or self.retry)


@dataclass(eq=False)
class HandoffTask(Task):
    """Hand the keys we hold but do not own under ``view`` to every replica of ``shard``;
    drop our copy of a batch only once every one of them said it holds it.

    Each batch is *offered* first (keys and versions, no values): a receiver that holds a
    version already (pulled, or handed off by another old replica) needs nothing; values go
    only to those lacking them.  A receiver that will pull the keys from us answers ``later``:
    we offer them again once we served it the last page of a pull (``wake``), or, failing
    that, after ``handoff_later_wait`` (at most a quarter of the change's deadline), when it
    must take them or say it holds them."""

    view: View | None = None
    shard: str = ""
    batches: Iterator[Entries] | None = None
    entries: Entries = field(default_factory=list)
    receivers: dict[int, Receiver] = field(default_factory=dict)
    pulled: set[int] = field(default_factory=set)  # members served the last page of a pull

    def begin(self, core: Core, keys: list[str]) -> None:
        self.batches = transfer.handoff_batches(core.replica, keys)
        self._next(core)

    def cancel(self, core: Core) -> None:
        for r in self.receivers.values():
            for timer in (r.retry, r.fallback):
                if timer is not None:
                    timer.cancel()
        super().cancel(core)

    def _next(self, core: Core) -> None:
        assert self.batches is not None and self.view is not None
        batch = next(self.batches, None)
        if batch is None:
            return self.end()
        self.entries, self.cids = batch, set()
        self.receivers = {m.id: Receiver(m) for m in self.view.shards[self.shard]}
        for r in list(self.receivers.values()):
            self._offer(core, r, batch, patient=True)

    def _offer(self, core: Core, r: Receiver, entries: Entries, patient: bool) -> None:
        r.retry = None
        r.calls += 1
        offer = [(k, e.version) for k, e in entries]
        payload = dumps(Handoff(core.changes.whoami(), [], offer, patient).to_wire())
        core.stats.handoff_digests_sent += len(offer)
        self.call(core, core.k.call(
            r.member.address, "POST", "/internal/handoff", payload, core.config.peer_timeout,
            lambda outcome: self._offered(core, r, entries, patient, outcome),
        ))

    def _offered(
        self, core: Core, r: Receiver, entries: Entries, patient: bool, outcome: Outcome
    ) -> None:
        r.calls -= 1
        raw = answer_json(outcome, "/internal/handoff")
        try:
            if isinstance(raw, Failed):
                raise WireError(raw.reason)
            reply = OfferReply.from_wire(raw, len(entries))
        except (WireError, KeyError, TypeError) as exc:
            return self._failed(core, r, f"handoff offer to {r.member.id} failed: {exc}",
                                lambda: self._offer(core, r, entries, patient))
        r.failures = 0
        self._arrived(core, r)
        later = set(reply.later) - set(reply.send) if patient else set()
        send = [entries[i] for i in sorted(set(reply.send) | (set(reply.later) - later))]
        r.later = [entries[i] for i in sorted(later)]
        if send:
            r.queue.append(send)
            self._send(core, r)
        if r.later and r.member.id in self.pulled:
            self.wake(core, r.member.id)  # its last page went before this answer came
        elif r.later:
            cfg = core.config
            r.fallback = core.k.after(min(cfg.handoff_later_wait, cfg.view_change_deadline / 4),
                                   lambda: self.wake(core, r.member.id))
        self._maybe_next(core)

    def pulled_all(self, core: Core, member: int) -> None:
        """We served ``member`` the last page of a pull: it holds what we served."""
        self.pulled.add(member)
        self.wake(core, member)

    def wake(self, core: Core, member: int) -> None:
        """We served ``member`` the last page of a pull (or waited long enough): offer what
        it said it would pull again; now it holds it, or must take it."""
        r = self.receivers.get(member)
        if r is None or not r.later or self.ended:
            return
        if r.fallback is not None:
            r.fallback.cancel()
        entries, r.later = r.later, []
        self._offer(core, r, entries, patient=False)

    def _send(self, core: Core, r: Receiver) -> None:
        r.retry = None
        r.calls += 1
        chunk = r.queue[-1]
        payload = dumps(Handoff(core.changes.whoami(), chunk).to_wire())
        core.stats.handoff_entries_sent += len(chunk)
        self.call(core, core.k.call(
            r.member.address, "POST", "/internal/handoff", payload, core.config.peer_timeout,
            lambda outcome: self._sent(core, r, chunk, outcome),
        ))

    def _sent(self, core: Core, r: Receiver, chunk: Entries, outcome: Outcome) -> None:
        r.calls -= 1
        progress = core.changes.progress
        raw = answer_json(outcome, "/internal/handoff")
        if isinstance(raw, Failed):
            if raw.too_large and len(chunk) > 1:
                half = len(chunk) // 2
                r.queue[-1:] = [chunk[half:], chunk[:half]]
                return self._send(core, r)
            level = logging.ERROR if raw.too_large else logging.INFO
            return self._failed(core, r, f"handoff to {r.member.id} failed, retrying: "
                                f"{raw.reason}", lambda: self._send(core, r), level)
        r.failures = 0
        self._arrived(core, r)
        r.queue.pop()
        progress.bytes_sent += sum(e.size for _, e in chunk)
        if r.queue:
            return self._send(core, r)
        self._maybe_next(core)

    def _arrived(self, core: Core, r: Receiver) -> None:
        pending = core.changes.progress.peers_pending
        if r.member.id in pending:
            pending.remove(r.member.id)

    def _failed(
        self, core: Core, r: Receiver, why: str, again: Callable[[], None],
        level: int = logging.INFO,
    ) -> None:
        core.k.log(level, why)
        pending = core.changes.progress.peers_pending
        if r.member.id not in pending:
            pending.append(r.member.id)
        r.failures += 1
        r.retry = core.k.after(core.backoff(r.failures), again)

    def _maybe_next(self, core: Core) -> None:
        if self.ended or not all(r.done for r in self.receivers.values()):
            return
        # Every receiver holds these versions; a key changed here since stays for the next
        # round of handoff.
        assert self.view is not None
        core.changes.progress.keys_sent += len(self.entries) * len(self.receivers)
        transfer.drop_if_unchanged(core.replica, self.entries, self.view)
        self._next(core)
