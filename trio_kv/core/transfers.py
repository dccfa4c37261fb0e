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
from ..messages import Handoff, PeerViewStatus, PullPage, PullRequest, Whoami, WireError, dumps
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
    """Fetch the keys of one debt from one old owner, page by page, retrying until done."""

    pull: Pull | None = None
    view: View | None = None
    cursor: str = ""
    failures: int = 0
    max_bytes: int = 0
    started: list[Pull] = field(default_factory=list)  # pulls its report added

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
        request = PullRequest(
            view, pull.debt.within, self.cursor, cfg.handoff_batch_entries,
            Whoami(core.node_id, core.replica.epoch_for(view), view.view_id), self.max_bytes,
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
            self.timer = core.k.after(core.backoff(self.failures), lambda: self._step(core))
            return
        self.failures = 0
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
        self._step(core)


class _Retry(Exception):
    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


@dataclass(eq=False)
class HandoffTask(Task):
    """Hand the keys we hold but do not own under ``view`` to every replica of ``shard``;
    drop our copy of a batch only once every one of them acknowledged it."""

    view: View | None = None
    shard: str = ""
    batches: Iterator[Entries] | None = None
    todo: list[Entries] = field(default_factory=list)
    entries: Entries = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    split: bool = False
    failures: int = 0

    def begin(self, core: Core, keys: list[str]) -> None:
        self.batches = transfer.handoff_batches(core.replica, keys)
        self._next(core)

    def _receivers(self) -> tuple[Member, ...]:
        assert self.view is not None
        return self.view.shards[self.shard]

    def _next(self, core: Core) -> None:
        if not self.todo:
            assert self.batches is not None
            batch = next(self.batches, None)
            if batch is None:
                return self.end()
            self.todo = [batch]
        self.entries = self.todo.pop()
        self.acked, self.failures = set(), 0
        self._round(core)

    def _round(self, core: Core) -> None:
        self.timer, self.split = None, False
        payload = dumps(Handoff(core.changes.whoami(), self.entries).to_wire())
        for member in self._receivers():
            if member.id not in self.acked:
                core.stats.handoff_entries_sent += len(self.entries)
                self.call(core, core.k.call(
                    member.address, "POST", "/internal/handoff", payload,
                    core.config.peer_timeout,
                    lambda outcome, m=member: self._acked(core, m, outcome),  # type: ignore[misc]
                ))

    def _acked(self, core: Core, member: Member, outcome: Outcome) -> None:
        last = self.answered()
        progress = core.changes.progress
        raw = answer_json(outcome, "/internal/handoff")
        if isinstance(raw, Failed):
            if raw.too_large and len(self.entries) > 1:
                self.split = True
            else:
                core.k.log(logging.ERROR if raw.too_large else logging.INFO,
                           f"handoff to {member.id} failed, retrying: {raw.reason}")
                if member.id not in progress.peers_pending:
                    progress.peers_pending.append(member.id)
        else:
            self.acked.add(member.id)
            if member.id in progress.peers_pending:
                progress.peers_pending.remove(member.id)
            progress.keys_sent += len(self.entries)
            progress.bytes_sent += sum(e.size for _, e in self.entries)
        if not last:
            return
        if self.split:
            half = len(self.entries) // 2
            self.todo += [self.entries[half:], self.entries[:half]]
            return self._next(core)
        if len(self.acked) == len(self._receivers()):
            # Every receiver holds these versions; a key changed here since stays for the
            # next round of handoff.
            assert self.view is not None
            transfer.drop_if_unchanged(core.replica, self.entries, self.view)
            return self._next(core)
        self.failures += 1
        self.timer = core.k.after(core.backoff(self.failures), lambda: self._round(core))
