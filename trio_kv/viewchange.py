"""View changes, the shell side: the coordinator, pulls, handoffs and fence probes.

A mixin of ``Node``: it carries out what the replica's custody (``handoff.py``) decides, over
peer calls bounded by cancel scopes, retrying with backoff.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from .config import Config
from .handoff import Pull
from .messages import (
    Handoff,
    PeerViewStatus,
    PullPage,
    PullRequest,
    Whoami,
    WireError,
    WireRules,
)
from .persist import Persister
from .replica import Replica
from .stats import NodeStats
from .store import Entry
from .transport import PeerClient, PeerUnavailable
from .view import Member, View

log = logging.getLogger("trio_kv.node")


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


@dataclass
class _ViewRequest:
    view: View
    done: trio.Event = field(default_factory=trio.Event)
    failure: str = ""  # the change failed (a bug, logged): the operator should send it again


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class ViewChanges:
    """The view-change half of a node (see ``Node`` for the attributes it shares)."""

    config: Config
    node_id: int
    replica: Replica
    sync_client: PeerClient
    progress: ChangeProgress
    stats: NodeStats
    _installs: int
    _ready: trio.Event
    _view_installed: trio.Event
    _view_requested: trio.Event
    _view_send: trio.MemorySendChannel[_ViewRequest]
    _view_recv: trio.MemoryReceiveChannel[_ViewRequest]
    task_failures: int
    persist: Persister

    def _notify(self) -> None:
        raise NotImplementedError

    async def durable(self) -> None:
        raise NotImplementedError

    def wire_rules(self) -> WireRules:
        raise NotImplementedError

    async def _supervise(self, name: str, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        raise NotImplementedError

    async def put_view(self, view: View) -> str | None:
        """Hand the view to the coordinator (which outlives this request) and await it, for
        ``put_view_timeout`` at most.  None once served; else why not (yet)."""
        request = _ViewRequest(view)
        self._view_requested.set()
        with trio.move_on_after(self.config.put_view_timeout):
            await self._view_send.send(request)
            await request.done.wait()
            return request.failure or None
        return (
            f"the view change is still in progress after {self.config.put_view_timeout:g}s "
            "(put_view_timeout); it goes on, and GET /view shows its progress"
        )

    def view_status(self) -> dict[str, Any]:
        view = self.replica.view
        return {
            "view": view.to_json() if view else None,
            "id": self.node_id,
            "shard": self.replica.shard,
            "epoch": self.replica.epoch,
            "newer_view_seen": asdict(newer) if (newer := self.replica.newer_view) else None,
            "view_id": view.view_id if view else None,
            "keys": len(self.replica.store),
            "fenced_to": [
                {"view_id": f.view.view_id, "shards": [s for _v, s in f.owners()],
                 "waiting_on": sorted(f.waiting_on)}
                for f in self.replica.custody.fences
            ],
            "awaiting": [
                {"view_id": d.source[0].view_id, "shard": d.source[1]}
                for d in self.replica.custody.debts.values()
            ],
            "change": asdict(self.progress),
            "storage": self.persist.stats(),
        }

    async def _coordinator(self) -> None:
        """Applies views one at a time; between views, retries unacknowledged handoffs."""
        cfg = self.config
        while True:
            request: _ViewRequest | None = None
            if self.progress.state == "pending":
                with trio.move_on_after(cfg.handoff_retry_interval):
                    request = await self._view_recv.receive()
                if request is None:
                    await self._retry_pending()
                    continue
            else:
                request = await self._view_recv.receive()
            self._view_requested = trio.Event()
            current = self.replica.view
            try:
                if current is None or current.view_id != request.view.view_id:
                    await self._change_view(request.view)
            except Exception:
                log.exception("node %s: view change to %s failed", self.node_id,
                              request.view.view_id)
                self.task_failures += 1
                request.failure = "the view change failed on this node (see its log); send it again"
            finally:
                request.done.set()

    async def _retry_pending(self) -> None:
        """Unfinished pulls and unacknowledged handoffs, again, for a while; a view request
        interrupts them (what is unfinished stays pending and goes on under the new view)."""
        view = self.replica.view
        assert view is not None
        with trio.move_on_after(self.config.view_change_deadline) as scope:
            async with trio.open_nursery() as watcher:
                watcher.start_soon(_cancel_when, self._view_requested, scope)
                async with trio.open_nursery() as nursery:
                    self._start_pulls(nursery, self.replica.custody.pending(), view)
                    nursery.start_soon(self._hand_off, view)
                watcher.cancel_scope.cancel()
        self._finish_progress()

    async def _change_view(self, new: View) -> None:
        cfg = self.config
        old = self.replica.view
        started = trio.current_time()
        self._ready = trio.Event()
        self.progress = ChangeProgress(state="changing", view_id=new.view_id)
        log.info("node %s: changing to view %s", self.node_id, new.view_id)
        try:
            with trio.move_on_after(cfg.view_change_deadline):
                async with trio.open_nursery() as nursery:
                    held_data = old is not None
                    if old is None:
                        old = await self._learn_previous_view(new)
                    self.replica.begin_change(old, new, held_data)
                    self.persist.state_dirty = True
                    await self.durable()  # a restart from here on resumes this change
                    # new pulls, and those of earlier changes still unfinished
                    self._start_pulls(nursery, self.replica.custody.pending(), new)
                    nursery.start_soon(self._hand_off, new)
            self.replica.install_view(new)
            self.persist.state_dirty = True
            with trio.CancelScope(shield=True):
                await self.durable()  # a restart rejoins this view, no PUT /view needed
            self._installs += 1
            self.stats.view_changes += 1
            self._view_installed.set()
            self._view_installed = trio.Event()
        finally:
            self._ready.set()
            self.progress.seconds = round(trio.current_time() - started, 3)
            self._finish_progress()
            self._notify()
        log.info("node %s: serving view %s (%s)", self.node_id, new.view_id, self.progress)

    async def _fence_watch(self) -> None:
        """While fenced, ask the fencing shards' members which view they serve, to lift the
        fence once they serve ours (they may never contact us otherwise)."""
        cfg = self.config
        while True:
            await trio.sleep(cfg.fence_probe_interval)
            waiting = {m for f in self.replica.custody.fences for m in f.waiting_on}
            members = {f.view.member(m) for f in self.replica.custody.fences for m in waiting}
            for member in members - {None}:
                assert member is not None
                status = await self._view_of(member)
                if status is not None and status.view is not None and not status.changing:
                    self.replica.peer_serves(member.id, status.view.view_id)
                    self.persist.state_dirty = True

    async def _view_of(self, member: Member) -> PeerViewStatus | None:
        """The view ``member`` says it serves (None: no answer, or not one we understand)."""
        try:
            resp = await self.sync_client.request(
                member.address, "GET", "/view", timeout=self.config.connect_timeout
            )
            if resp.status != 200:
                return None
            return PeerViewStatus.from_wire(resp.json(), self.wire_rules())
        except (PeerUnavailable, ValueError) as exc:  # WireError and JSON errors included
            log.debug("node %s: view of %s unknown: %s", self.node_id, member.id, exc)
            return None

    def _backoff(self, failures: int) -> float:
        """Exponential, jittered, capped: retries keep trying without flooding a sick peer."""
        cfg = self.config
        base: float = min(cfg.handoff_retry_interval, cfg.gossip_interval * 2.0 ** (failures - 1))
        return base * random.uniform(0.5, 1.5)

    async def _learn_previous_view(self, new: View) -> View | None:
        """A node with no view asks the new view's members for theirs: if some still serve an
        older view, that is where the keys we now own live, and we pull them from its owners.

        The different view with the highest epoch wins.  Only when every member answered
        (none with a different view) is the cluster taken to be fresh: a member that did not
        answer may be an old owner cut off from us, so we ask again, for up to half the
        change deadline (then we go on, and say so).
        """
        cfg = self.config
        found: list[tuple[int, View]] = []
        silent: set[int] = set()

        async def ask(member: Member) -> None:
            status = await self._view_of(member)
            if status is None:
                return
            silent.discard(member.id)
            if status.view is not None and status.view.view_id != new.view_id:
                found.append((status.epoch, status.view))

        others = [m for m in new.members() if m.id != self.node_id]
        silent.update(m.id for m in others)
        failures = 0
        with trio.move_on_after(cfg.view_change_deadline / 2):
            while True:
                async with trio.open_nursery() as nursery:
                    for member in others:
                        if member.id in silent:
                            nursery.start_soon(ask, member)
                if found or not silent:
                    break
                failures += 1
                await trio.sleep(self._backoff(failures))
        if not found:
            if silent:
                log.warning("node %s: members %s did not say which view they serve; taking the "
                            "cluster to be fresh", self.node_id, sorted(silent))
            return None
        epoch, view = max(found, key=lambda f: f[0])
        log.info("node %s: learned previous view %s (epoch %s) from peers", self.node_id,
                 view.view_id, epoch)
        return view

    def _finish_progress(self) -> None:
        view = self.replica.view
        remaining = (
            sum(len(ks) for ks in self.replica.foreign_keys(view).values()) if view else 0
        )
        self.progress.keys_remaining = remaining
        self.progress.pulls_pending = self.replica.custody.pending_members()
        pending = remaining or self.progress.pulls_pending
        self.progress.state = "pending" if pending else "idle"

    def _start_pulls(self, nursery: trio.Nursery, pulls: list[Pull], view: View) -> None:
        for pull in pulls:
            name = f"pull from {pull.member.id}"
            nursery.start_soon(self._supervise, name, self._pull, pull, view, nursery)
        self.progress.pulls_pending = self.replica.custody.pending_members()

    async def _pull(self, pull: Pull, view: View, nursery: trio.Nursery) -> None:
        """Fetch the keys of one debt from one old owner, page by page, retrying until done.

        One member is enough to serve the debt's keys; the others are still pulled (which
        also fences them), since they may hold writes the first did not.  What the member
        could not vouch for becomes new pulls.
        """
        cfg = self.config
        source, debt = pull.member, pull.debt
        cursor = ""
        failures = 0
        max_bytes = cfg.handoff_batch_bytes  # halved while the source's answers are too large
        if pull.round > 1:  # owed again: its sources were still settling; give them a moment
            await trio.sleep(self._backoff(pull.round - 1))
        while self.replica.custody.pulls.get((source.id, debt.ident)) is pull:
            request = PullRequest(
                view, debt.within, cursor, cfg.handoff_batch_entries,
                Whoami(self.node_id, self.replica.epoch_for(view), view.view_id), max_bytes,
            )
            try:
                raw = await self.sync_client.post_json(
                    source.address, "/internal/pull", request.to_wire(), cfg.peer_timeout
                )
                page = PullPage.from_wire(raw, self.wire_rules())
                self._observe_epoch(source.id, page.sender.epoch, page.sender.view_id)
                if page.stale:
                    raise WireError(f"it serves a newer view ({page.sender})")
            except (PeerUnavailable, WireError) as exc:
                log.info("pull from %s failed, retrying: %s", source.id, exc)
                if isinstance(exc, PeerUnavailable) and exc.too_large:
                    max_bytes = max(1, max_bytes // 2)
                failures += 1
                await trio.sleep(self._backoff(failures))
                continue
            failures = 0
            self.replica.merge(page.entries)
            await self.durable()  # what settles a debt is on disk before the debt is settled
            self.progress.keys_received += len(page.entries)
            self.progress.bytes_received += sum(e.size for _, e in page.entries)
            self._notify()
            if page.report is not None:
                started = self.replica.pulled(pull, page.report)
                self.persist.state_dirty = True
                await self.durable()
                self._start_pulls(nursery, started, view)
                self._notify()
                return
            assert page.next is not None
            cursor = page.next

    def on_pull(self, raw: Any) -> dict[str, Any]:
        request = PullRequest.from_wire(raw, self.wire_rules())
        view, sender = request.view, request.sender
        refusal = self.replica.pull_refusal(sender.node, view, request.within)
        if refusal is not None:
            raise WireError(f"pull refused: {refusal}")
        if self.replica.stale_puller(view.view_id, sender.epoch):
            return PullPage(self._whoami(), [], None, None, stale=True).to_wire()
        self._observe_epoch(sender.node, sender.epoch, view.view_id)
        self.replica.fence(view, list(request.within))
        self.persist.state_dirty = True  # a restart must not serve fenced keys again
        entries, nxt = self.replica.pull_page(
            request.within, request.after, request.limit, request.max_bytes
        )
        report = self.replica.custody.report() if nxt is None else None
        return PullPage(self._whoami(), entries, nxt, report).to_wire()

    def _whoami(self) -> Whoami:
        """Who sends a view-change message, and on which view and epoch."""
        view = self.replica.view
        return Whoami(self.node_id, self.replica.epoch, view.view_id if view else "")

    def _observe_epoch(self, peer: int, epoch: int, view_id: str) -> None:
        """Note a peer's view epoch."""
        before = self.replica.newer_view
        self.replica.observe_epoch(peer, epoch, view_id)
        newer = self.replica.newer_view
        if newer is not None and newer != before:
            log.info(
                "node %s: node %s serves view %s at epoch %s, newer than ours (epoch %s); "
                "this node may not have been sent the latest view", self.node_id, newer.peer,
                newer.view_id, newer.epoch, self.replica.epoch,
            )

    def on_handoff(self, raw: Any) -> dict[str, Any]:
        handoff = Handoff.from_wire(raw, self.wire_rules())
        sender = handoff.sender
        self._observe_epoch(sender.node, sender.epoch, sender.view_id)
        if self.replica.merge(handoff.entries):
            self._notify()
        self.progress.keys_received += len(handoff.entries)
        return {"ok": True, "received": len(handoff.entries)}

    async def _hand_off(self, view: View) -> None:
        """Send every key we hold but do not own under ``view`` to all replicas of its new
        shard; drop our copy of a batch only once every one of them acknowledged it."""
        foreign = self.replica.foreign_keys(view)
        async with trio.open_nursery() as nursery:
            for shard, keys in foreign.items():
                nursery.start_soon(
                    self._supervise, f"handoff to shard {shard}", self._hand_off_shard, view,
                    shard, keys,
                )

    async def _hand_off_shard(self, view: View, shard: str, keys: list[str]) -> None:
        """Batches bounded in entries and encoded bytes; a batch a receiver refuses as too
        large is split in two, never sent again unchanged."""
        for batch in self.replica.handoff_batches(keys):
            todo = [batch]
            while todo:
                entries = todo.pop()
                if await self._hand_off_batch(view.shards[shard], entries):
                    half = len(entries) // 2
                    todo += [entries[half:], entries[:half]]
                    continue
                # Every receiver holds these versions; a key changed here since stays for the
                # next round of handoff.
                self.replica.drop_if_unchanged(entries, view)
                await self.durable()

    async def _hand_off_batch(
        self, receivers: tuple[Member, ...], entries: list[tuple[str, Entry]]
    ) -> bool:
        """Until every receiver acknowledged ``entries``; True (unsent) to have them split."""
        cfg = self.config
        payload = Handoff(self._whoami(), entries).to_wire()
        acked: set[int] = set()
        failures = 0
        while len(acked) < len(receivers):
            for member in receivers:
                if member.id in acked:
                    continue
                try:
                    await self.sync_client.post_json(
                        member.address, "/internal/handoff", payload, cfg.peer_timeout
                    )
                except PeerUnavailable as exc:
                    if exc.too_large and len(entries) > 1:
                        return True
                    log.log(
                        logging.ERROR if exc.too_large else logging.INFO,
                        "handoff to %s failed, retrying: %s", member.id, exc,
                    )
                    if member.id not in self.progress.peers_pending:
                        self.progress.peers_pending.append(member.id)
                    continue
                acked.add(member.id)
                if member.id in self.progress.peers_pending:
                    self.progress.peers_pending.remove(member.id)
                self.progress.keys_sent += len(entries)
                self.progress.bytes_sent += sum(e.size for _, e in entries)
            if len(acked) < len(receivers):
                failures += 1
                await trio.sleep(self._backoff(failures))
        return False
