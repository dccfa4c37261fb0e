"""The view-change procedure: the coordinator's state machine.

Views are applied one at a time, in the order they arrive (at most ``MAX_QUEUED`` waiting).  A
change is a ``Phase``: learn the previous view (a node with none), take custody of the new range
(pulls), hand off what we no longer own, all within ``view_change_deadline``; then install.
Between views, unfinished pulls and unacknowledged handoffs are retried in ``retry`` phases
every ``handoff_retry_interval``, which a new view interrupts.  While fenced, the fencing
shards' members are probed every ``fence_probe_interval`` until they serve our view.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .. import transfer
from ..handoff import DebtId, Pull
from ..messages import Digests, Handoff, OfferReply, PullPage, PullRequest, Whoami, WireError
from ..view import Member, View
from .events import Reply, Respond
from .kernel import Timer
from .transfers import HandoffTask, Learn, PullTask, Task, view_status_of

if TYPE_CHECKING:
    from .core import Core

MAX_QUEUED = 16  # views waiting for the coordinator; more get 503
RESUMED = 0  # the request id of a change resumed after a restart (no client waits for it)


@dataclass
class ChangeProgress:
    """What the current (or last) view change did; shown by ``GET /view``."""

    state: str = "idle"  # idle | changing | pending (done, but some handoffs not acknowledged)
    view_id: str = ""
    keys_sent: int = 0
    bytes_sent: int = 0
    keys_received: int = 0
    bytes_received: int = 0
    keys_remaining: int = 0
    peers_pending: list[int] = field(default_factory=list)
    pulls_pending: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(eq=False)
class Phase:
    kind: str  # "change" | "retry"
    view: View
    started: float
    rids: list[int] = field(default_factory=list)  # PUT /view requests answered at its end
    tasks: list[Task] = field(default_factory=list)
    deadline: Timer | None = None
    starting: int = 0  # tasks are being started: it is not done even if none is left yet
    # Pulls of one debt go to its members one at a time (the next once one finished or
    # failed), so a later one sends only what the earlier ones did not (``known``).
    held: dict[DebtId, list[PullTask]] = field(default_factory=dict)
    running: dict[DebtId, int] = field(default_factory=dict)


class ViewChanges:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.progress = ChangeProgress()
        self.queue: deque[tuple[int, View]] = deque()
        self.phase: Phase | None = None
        self.retry: Timer | None = None
        self.waiting: dict[int, Timer] = {}  # PUT /view requests not yet answered
        self.probing = 0

    @property
    def changing(self) -> bool:
        """Data requests wait while a change is in progress."""
        return self.phase is not None and self.phase.kind == "change"

    def start(self) -> None:
        self.core.k.after(self.core.config.fence_probe_interval, self._probe)

    def recovered(self) -> None:
        """After a restart from a data directory: serve its view, retry what is pending, and
        resume a change that was under way (nobody waits for its answer)."""
        core = self.core
        view, target = core.replica.view, core.replica.custody.target
        if view is not None:
            core.view_installed()
            self._finish_progress()
            self._next()
        if target is not None and (view is None or target.view_id != view.view_id):
            core.k.log(logging.INFO,
                       f"node {core.node_id}: resuming the change to view {target.view_id}")
            self.put_view(RESUMED, target)

    # ------------------------------------------------------------ PUT /view
    def put_view(self, rid: int, view: View) -> None:
        k, cfg = self.core.k, self.core.config
        if len(self.queue) >= MAX_QUEUED:
            k.emit(Respond(rid, Reply(503, {"error": "too many views waiting to be applied"})))
            return
        self.queue.append((rid, view))
        self.waiting[rid] = k.after(cfg.put_view_timeout, lambda: self._answer(rid, (
            f"the view change is still in progress after {cfg.put_view_timeout:g}s "
            "(put_view_timeout); it goes on, and GET /view shows its progress")))
        if self.phase is not None and self.phase.kind == "retry":
            self._end_retry()  # what is unfinished stays pending and goes on under the new view
        self._next()

    def abandon(self, rid: int) -> None:
        timer = self.waiting.pop(rid, None)
        if timer is not None:
            timer.cancel()

    def _answer(self, rid: int, failure: str | None) -> None:
        timer = self.waiting.pop(rid, None)
        if timer is None:
            return
        timer.cancel()
        self.core.k.emit(Respond(rid, Reply(
            503 if failure else 200, {"error": failure} if failure else None
        )))

    def _next(self) -> None:
        """The coordinator's loop: the next view, or a retry of what is pending."""
        if self.phase is not None:
            return
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        while self.queue:
            rid, view = self.queue.popleft()
            current = self.core.replica.view
            if current is None or current.view_id != view.view_id:
                return self._begin_change(rid, view)
            self._answer(rid, None)
        if self.progress.state == "pending":
            self.retry = self.core.k.after(
                self.core.config.handoff_retry_interval, self._begin_retry
            )

    # ------------------------------------------------------------ phases
    def _begin_change(self, rid: int, new: View) -> None:
        core = self.core
        old = core.replica.view
        phase = self.phase = Phase("change", new, core.k.now, [rid])
        self.progress = ChangeProgress(state="changing", view_id=new.view_id)
        core.k.log(logging.INFO, f"node {core.node_id}: changing to view {new.view_id}")
        phase.deadline = core.k.after(
            core.config.view_change_deadline, lambda: self._end_change(phase)
        )
        if old is None:
            learn = Learn(lambda t: self._learned(phase, t), new=new)
            phase.tasks.append(learn)
            learn.begin(core)
        else:
            self._custody(phase, old, held_data=True)

    def _learned(self, phase: Phase, task: Task) -> None:
        assert isinstance(task, Learn)
        phase.tasks.remove(task)
        self._custody(phase, task.learned, held_data=False)

    def _custody(self, phase: Phase, old: View | None, held_data: bool) -> None:
        self.core.replica.begin_change(old, phase.view, held_data)
        self.core.state_changed()
        self._work(phase)

    def _work(self, phase: Phase) -> None:
        """New pulls, those of earlier changes still unfinished, and the handoffs."""
        phase.starting += 1
        self._start_pulls(phase, self.core.replica.custody.pending())
        foreign = transfer.foreign_keys(self.core.replica, phase.view)
        for shard in sorted(foreign):
            if phase is not self.phase:
                break
            task = HandoffTask(lambda t: self._task_ended(phase, t), view=phase.view,
                               shard=shard)
            phase.tasks.append(task)
            task.begin(self.core, foreign[shard])
        phase.starting -= 1
        self._maybe_done(phase)

    def _start_pulls(self, phase: Phase, pulls: list[Pull]) -> None:
        phase.starting += 1
        for pull in pulls:
            if phase is not self.phase:
                break
            ident = pull.debt.ident
            task = PullTask(lambda t: self._task_ended(phase, t), pull=pull, view=phase.view)
            if phase.running.get(ident):
                task.held = True
                phase.held.setdefault(ident, []).append(task)
            else:
                phase.running[ident] = 1
                task.on_stall = self._stalled(phase)
            phase.tasks.append(task)
            task.begin(self.core)
        phase.starting -= 1
        self.progress.pulls_pending = self.core.replica.custody.pending_members()

    def _stalled(self, phase: Phase) -> Callable[[PullTask], None]:
        def stalled(task: PullTask) -> None:
            assert task.pull is not None
            self._release(phase, task.pull.debt.ident)

        return stalled

    def _release(self, phase: Phase, ident: DebtId) -> None:
        """A pull of debt ``ident`` finished or failed: the next one held goes on."""
        phase.running[ident] = max(0, phase.running.get(ident, 0) - 1)
        waiting = phase.held.get(ident, [])
        while waiting and phase is self.phase:
            task = waiting.pop(0)
            if not task.ended:
                phase.running[ident] += 1
                task.release(self.core, self._stalled(phase))
                break
        if not waiting:
            phase.held.pop(ident, None)

    def _task_ended(self, phase: Phase, task: Task) -> None:
        if task in phase.tasks:
            phase.tasks.remove(task)
        if isinstance(task, PullTask):
            self.core.state_changed()  # a debt settled, or more are owed
            if task.on_stall is not None and task.pull is not None:
                self._release(phase, task.pull.debt.ident)
        if isinstance(task, PullTask) and task.started:
            self._start_pulls(phase, task.started)
            self.core.notify()
        self._maybe_done(phase)

    def _maybe_done(self, phase: Phase) -> None:
        if phase is self.phase and not phase.tasks and not phase.starting:
            if phase.kind == "change":
                self._end_change(phase)
            else:
                self._end_retry()

    def _stop(self, phase: Phase) -> None:
        if phase.deadline is not None:
            phase.deadline.cancel()
        for task in list(phase.tasks):
            task.cancel(self.core)
        phase.tasks.clear()
        self.phase = None

    def _end_change(self, phase: Phase) -> None:
        """Done, or past the deadline: install anyway; what is unfinished stays pending."""
        if phase is not self.phase:
            return
        core = self.core
        learning = [t for t in phase.tasks if isinstance(t, Learn)]
        self._stop(phase)
        if learning:  # the deadline came while still asking: custody from what we know
            core.replica.begin_change(learning[0].learned, phase.view, False)
        core.replica.install_view(phase.view)
        core.stats.view_changes += 1
        self.progress.seconds = round(core.k.now - phase.started, 3)
        self._finish_progress()
        core.view_installed()
        core.k.log(logging.INFO,
                   f"node {core.node_id}: serving view {phase.view.view_id} ({self.progress})")
        for rid in phase.rids:
            self._answer(rid, None)
        self._next()

    def _begin_retry(self) -> None:
        self.retry = None
        view = self.core.replica.view
        if self.phase is not None or view is None:
            return
        phase = self.phase = Phase("retry", view, self.core.k.now)
        phase.deadline = self.core.k.after(self.core.config.view_change_deadline, self._end_retry)
        self._work(phase)

    def _end_retry(self) -> None:
        if self.phase is None or self.phase.kind != "retry":
            return
        self._stop(self.phase)
        self._finish_progress()
        self._next()

    def _finish_progress(self) -> None:
        replica = self.core.replica
        view = replica.view
        foreign = transfer.foreign_keys(replica, view) if view else {}
        remaining = sum(len(keys) for keys in foreign.values())
        self.progress.keys_remaining = remaining
        self.progress.pulls_pending = replica.custody.pending_members()
        pending = remaining or self.progress.pulls_pending
        self.progress.state = "pending" if pending else "idle"

    # ------------------------------------------------------------ fence probes
    def _probe(self) -> None:
        """While fenced, ask the fencing shards' members which view they serve, to lift the
        fence once they serve ours (they may never contact us otherwise)."""
        core = self.core
        fences = core.replica.custody.fences
        waiting = sorted({m for f in fences for m in f.waiting_on})
        members: dict[int, Member] = {}
        for f in fences:
            for m in waiting:
                member = f.view.member(m)
                if member is not None:
                    members.setdefault(m, member)
        if not members:
            core.k.after(core.config.fence_probe_interval, self._probe)
            return
        self.probing = len(members)
        for m in sorted(members):
            member = members[m]
            core.k.call(member.address, "GET", "/view", None, core.config.connect_timeout,
                        lambda outcome, i=m: self._probed(i, outcome))  # type: ignore[misc]

    def _probed(self, member: int, outcome: Any) -> None:
        core = self.core
        status = view_status_of(core, outcome)
        if (
            status is not None and status.view is not None and not status.changing
            and core.replica.peer_serves(member, status.view.view_id)
        ):
            core.notify()  # fenced keys are ours again: push them, wake their readers
            core.state_changed()
        self.probing -= 1
        if self.probing == 0:
            core.k.after(core.config.fence_probe_interval, self._probe)

    # ------------------------------------------------------------ peer messages
    def whoami(self) -> Whoami:
        """Who sends a view-change message, and on which view and epoch."""
        view = self.core.replica.view
        return Whoami(self.core.node_id, self.core.replica.epoch, view.view_id if view else "")

    def on_pull(self, raw: Any) -> dict[str, Any]:
        core = self.core
        replica = core.replica
        request = PullRequest.from_wire(raw, core.wire_rules())
        view, sender = request.view, request.sender
        refusal = transfer.pull_refusal(replica, sender.node, view, request.within)
        if refusal is not None:
            raise WireError(f"pull refused: {refusal}")
        if replica.stale_puller(view.view_id, sender.epoch):
            return PullPage(self.whoami(), [], None, None, stale=True).to_wire()
        core.observe_epoch(sender.node, sender.epoch, view.view_id)
        replica.custody.fence(view, list(request.within), replica.view)
        core.state_changed()  # a restart must not serve fenced keys again
        entries, nxt = transfer.pull_page(
            replica, request.within, request.after, request.limit, request.max_bytes,
            request.known, request.complete,
        )
        report = replica.custody.report() if nxt is None else None
        core.stats.pull_entries_served += len(entries)
        core.notify()  # a fence moves keys away: parked requests follow them
        self._pulled_by(sender.node, last=report is not None)
        return PullPage(self.whoami(), entries, nxt, report).to_wire()

    def _pulled_by(self, member: int, last: bool) -> None:
        """``member`` pulls from us, so it has begun a change: a pull of ours it refused
        (it knew no view yet) is retried now.  After its last page it holds what we served
        (it asks for that page only once it merged the others): handoffs waiting for it
        offer those keys again."""
        phase = self.phase
        for task in list(phase.tasks) if phase is not None else []:
            if isinstance(task, PullTask) and task.pull and task.pull.member.id == member:
                task.nudge(self.core)
            elif last and isinstance(task, HandoffTask):
                task.pulled_all(self.core, member)

    def on_handoff(self, raw: Any) -> dict[str, Any]:
        core = self.core
        handoff = Handoff.from_wire(raw, core.wire_rules())
        sender = handoff.sender
        core.observe_epoch(sender.node, sender.epoch, sender.view_id)
        if handoff.offer is not None:
            return self._offered(handoff, handoff.offer)
        if core.replica.merge(handoff.entries):
            core.notify()
        self.progress.keys_received += len(handoff.entries)
        return {"ok": True, "received": len(handoff.entries)}

    def _offered(self, handoff: Handoff, offer: Digests) -> dict[str, Any]:
        """Which offered keys we lack; with ``patient``, those we will pull from the sender
        ourselves (a pull of ours covers them, or we are still learning which to make) are
        left to that pull.  Saying we hold a version lets the sender drop it, so the answer
        waits until what we hold is durable."""
        replica = self.core.replica
        sender = handoff.sender.node
        learning = self.phase is not None and any(isinstance(t, Learn) for t in self.phase.tasks)
        pulls = [p for p in replica.custody.pulls.values() if p.member.id == sender]
        send: list[int] = []
        later: list[int] = []
        for i, (key, version) in enumerate(offer):
            entry = replica.store.get(key)
            if entry is not None and entry.version >= version:
                continue
            if handoff.patient and (learning or any(p.debt.covers(key) for p in pulls)):
                later.append(i)
            else:
                send.append(i)
        if len(send) + len(later) < len(offer):
            self.core.durable_answer()
        return OfferReply(send, later).to_wire()

    def view_status(self) -> dict[str, Any]:
        replica = self.core.replica
        view = replica.view
        return {
            "view": view.to_json() if view else None,
            "id": self.core.node_id,
            "shard": replica.shard,
            "epoch": replica.epoch,
            "newer_view_seen": asdict(newer) if (newer := replica.epochs.newer_view) else None,
            "view_id": view.view_id if view else None,
            "keys": len(replica.store),
            "fenced_to": [
                {"view_id": f.view.view_id, "shards": [s for _v, s in f.owners()],
                 "waiting_on": sorted(f.waiting_on)}
                for f in replica.custody.fences
            ],
            "awaiting": [
                {"view_id": d.source[0].view_id, "shard": d.source[1]}
                for d in replica.custody.debts.values()
            ],
            "change": asdict(self.progress),
            "shipped": {"pull": self.core.stats.pull_entries_served,
                        "handoff": self.core.stats.handoff_entries_sent},
            "digests": {"offered": self.core.stats.handoff_digests_sent,
                        "known": self.core.stats.pull_digests_sent},
        }
