"""View changes, the shell side: the coordinator, pulls, handoffs and fence probes.

A mixin of ``Node``: it carries out what the replica's custody (``handoff.py``) decides, over
peer calls bounded by cancel scopes, retrying with backoff.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from .config import Config
from .handoff import Pull
from .messages import (
    WireError,
    entries_from_wire,
    entries_to_wire,
    report_from_wire,
    report_to_wire,
    scope_from_wire,
    scope_to_wire,
)
from .replica import Replica
from .stats import NodeStats
from .transport import PeerClient, PeerUnavailable
from .view import Member, View, ViewError, parse_view

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

    def _notify(self) -> None:
        raise NotImplementedError

    async def put_view(self, view: View) -> None:
        """Hand the view to the coordinator (which outlives this request) and await it."""
        request = _ViewRequest(view)
        self._view_requested.set()
        await self._view_send.send(request)
        await request.done.wait()

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
            if current is None or current.view_id != request.view.view_id:
                await self._change_view(request.view)
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
                    # new pulls, and those of earlier changes still unfinished
                    self._start_pulls(nursery, self.replica.custody.pending(), new)
                    nursery.start_soon(self._hand_off, new)
            self.replica.install_view(new)
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
                try:
                    resp = await self.sync_client.request(
                        member.address, "GET", "/view", timeout=cfg.connect_timeout
                    )
                    status = resp.json() if resp.status == 200 else {}
                    view_id = status.get("view_id")
                    change = status.get("change") or {}
                    if change.get("state") == "changing":
                        # still on its old view, moving to another: it serves neither yet
                        view_id = None
                except (PeerUnavailable, ValueError, AttributeError):
                    continue
                if isinstance(view_id, str):
                    self.replica.peer_serves(member.id, view_id)

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
            try:
                resp = await self.sync_client.request(
                    member.address, "GET", "/view", timeout=cfg.connect_timeout
                )
                status = resp.json() if resp.status == 200 else None
                if not isinstance(status, dict):
                    return
                silent.discard(member.id)
                if status.get("view"):
                    view = parse_view({"view": status["view"]}, cfg.vnodes)
                    if view.view_id != new.view_id:
                        found.append((int(status.get("epoch", 0)), view))
            except (PeerUnavailable, ValueError, AttributeError, TypeError):
                pass

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
            nursery.start_soon(self._pull, pull, view, nursery)
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
        within = [scope_to_wire(s) for s in debt.within]
        if pull.round > 1:  # owed again: its sources were still settling; give them a moment
            await trio.sleep(self._backoff(pull.round - 1))
        while self.replica.custody.pulls.get((source.id, debt.ident)) is pull:
            payload = {"view": view.to_json(), "within": within, "after": cursor,
                       "limit": cfg.handoff_batch_entries, "from": self.node_id,
                       "epoch": self.replica.epoch_for(view)}
            try:
                raw = await self.sync_client.post_json(
                    source.address, "/internal/pull", payload, cfg.peer_timeout
                )
                if stale := raw.get("stale"):
                    self._observe_epoch(source.id, stale.get("epoch"), stale.get("view_id"))
                    raise WireError(f"it serves a newer view ({stale})")
                entries = entries_from_wire(raw["entries"])
                nxt = raw["next"]
                report = None if nxt else report_from_wire(raw["report"], cfg.vnodes)
                self._observe_epoch(source.id, raw.get("epoch"), raw.get("view_id"))
            except (PeerUnavailable, WireError, KeyError, TypeError) as exc:
                log.info("pull from %s failed, retrying: %s", source.id, exc)
                failures += 1
                await trio.sleep(self._backoff(failures))
                continue
            failures = 0
            self.replica.merge(entries)
            self.progress.keys_received += len(entries)
            self.progress.bytes_received += sum(e.size for _, e in entries)
            self._notify()
            if report is not None:
                self._start_pulls(nursery, self.replica.pulled(pull, report), view)
                self._notify()
                return
            cursor = str(nxt)

    def on_pull(self, raw: Any) -> dict[str, Any]:
        vnodes = self.config.vnodes
        try:
            view = parse_view({"view": raw["view"]}, vnodes)
            within = [scope_from_wire(s, vnodes) for s in raw["within"]]
            after = str(raw["after"])
            limit = max(1, min(int(raw["limit"]), self.config.handoff_batch_entries))
        except (KeyError, TypeError, ValueError, ViewError) as exc:
            raise WireError(f"malformed pull: {exc}") from exc
        if not within:
            raise WireError("malformed pull: no scope to pull")
        epoch = raw.get("epoch")
        if isinstance(epoch, int) and self.replica.stale_puller(view.view_id, epoch):
            return {"stale": self._whoami()}
        self._observe_epoch(raw.get("from"), epoch, view.view_id)
        self.replica.fence(view, within)
        entries, nxt = self.replica.pull_page(within, after, limit)
        body: dict[str, Any] = {"entries": entries_to_wire(entries), "next": nxt, **self._whoami()}
        if nxt is None:
            body["report"] = report_to_wire(self.replica.custody.report())
        return body

    def _whoami(self) -> dict[str, Any]:
        """Who sends a view-change message, and on which view and epoch."""
        view = self.replica.view
        return {"from": self.node_id, "epoch": self.replica.epoch,
                "view_id": view.view_id if view else ""}

    def _observe_epoch(self, peer: Any, epoch: Any, view_id: Any) -> None:
        """Note a peer's view epoch (``None`` values: an older peer that does not send it)."""
        if not (isinstance(peer, int) and isinstance(epoch, int) and isinstance(view_id, str)):
            return
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
        try:
            entries = entries_from_wire(raw["entries"])
        except (KeyError, TypeError) as exc:
            raise WireError("malformed handoff") from exc
        self._observe_epoch(raw.get("from"), raw.get("epoch"), raw.get("view_id"))
        if self.replica.merge(entries):
            self._notify()
        self.progress.keys_received += len(entries)
        return {"ok": True, "received": len(entries)}

    async def _hand_off(self, view: View) -> None:
        """Send every key we hold but do not own under ``view`` to all replicas of its new
        shard; drop our copy of a batch only once every one of them acknowledged it."""
        foreign = self.replica.foreign_keys(view)
        async with trio.open_nursery() as nursery:
            for shard, keys in foreign.items():
                nursery.start_soon(self._hand_off_shard, view, shard, keys)

    async def _hand_off_shard(self, view: View, shard: str, keys: list[str]) -> None:
        cfg = self.config
        receivers = view.shards[shard]
        size = cfg.handoff_batch_entries
        for i in range(0, len(keys), size):
            entries = self.replica.entries_for(keys[i : i + size])
            payload = {"entries": entries_to_wire(entries), **self._whoami()}
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
                        log.info("handoff to %s failed, retrying: %s", member.id, exc)
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
            # Every receiver holds these versions; a key changed here since stays for the next
            # round of handoff.
            self.replica.drop_if_unchanged(entries, view)

