"""The trio shell around a ``Replica``: one nursery per node.

It supervises the HTTP server, one replication sender per peer, the view-change coordinator
and the forwarding pool.  It moves bytes and time only; every decision is the replica's.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

import trio

from .config import Config
from .handoff import Pull
from .messages import (
    SyncBatch,
    SyncReply,
    WireError,
    dumps,
    entries_from_wire,
    entries_to_wire,
    report_from_wire,
    report_to_wire,
    scope_from_wire,
    scope_to_wire,
)
from .metadata import Deps, render_metadata
from .persist import Persister
from .replica import Replica, ReplicaLimits
from .storage import Storage
from .transport import PeerClient, PeerUnavailable, TransportFactory, real_transport
from .view import Member, View, ViewError, parse_view

log = logging.getLogger("trio_kv.node")

HOPS_HEADER = "x-kv-hops"
BUDGET_HEADER = "x-kv-budget"
WRITE_ID_HEADER = "x-kv-write-id"


def _outcome_unknown(body: bytes) -> bool:
    """A 503 saying a nested forward could not tell whether the write was applied."""
    return b'"outcome":"unknown"' in body


class TooManyWaiting(Exception):
    """The node already holds ``max_waiting`` requests in waits."""


@dataclass(slots=True)
class Reply:
    """A data answer: JSON payload, or a forwarded peer's raw body passed through unchanged."""

    status: int
    payload: dict[str, Any] | None = None
    raw: bytes | None = None


def error(status: int, message: str, deps: Deps | None = None, **extra: Any) -> Reply:
    body: dict[str, Any] = {"error": message, **extra}
    if deps is not None:
        body["causal-metadata"] = render_metadata(deps)
    return Reply(status, body)


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


class Node:
    def __init__(
        self,
        config: Config,
        transport_factory: TransportFactory = real_transport,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if config.node_id is None:
            raise ValueError("a node needs an id (--id or NODE_IDENTIFIER)")
        self.config = config
        self.node_id = config.node_id
        self.wall_ms = wall_ms
        incarnation = f"{time.time_ns():x}{random.getrandbits(16):04x}"
        self.replica = Replica(
            config.node_id,
            f"{config.node_id}.{incarnation}",
            ReplicaLimits(config.batch_entries, config.batch_bytes),
        )
        keepalive = config.client_keepalive_expiry
        # Replication has at most one call in flight per peer; forwarding is bounded by its own
        # limiter.  Separate clients keep one pool's bookkeeping from slowing the other.
        self.sync_client = PeerClient(
            transport_factory, 8, config.connect_timeout, keepalive, config.cluster_secret
        )
        self.forward_client = PeerClient(
            transport_factory, config.forward_concurrency, config.connect_timeout, keepalive,
            config.cluster_secret,
        )
        self._installs = 0  # views installed so far: a parked request re-checks ownership
        self.progress = ChangeProgress()
        self._changed = trio.Event()  # replaced on every data change: wakes readers, senders
        self._ready = trio.Event()  # set while no view change is in progress
        self._ready.set()
        self._view_installed = trio.Event()
        self._view_send, self._view_recv = trio.open_memory_channel[_ViewRequest](16)
        self._view_requested = trio.Event()  # a PUT /view waits: background retries yield
        self._waiting = 0  # requests parked in _wait_for
        self._write_ids = 0
        # answers to forwarded writes by write id, so a retry is not applied twice
        self._applied: OrderedDict[str, Reply] = OrderedDict()
        self._forward_failed: dict[int, float] = {}  # member id -> when a forward to it failed
        self.started = trio.Event()
        self.stopped = trio.Event()
        self.tombstones_collected = 0
        durable = bool(config.data_dir) and config.durability != "none"
        self.persist = Persister(
            Storage(config.data_dir, config.node_id) if durable else None, config.durability,
            config.dedup_entries,
        )

    # ================================================================ services
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replication and view-change services; runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                await self._recover(nursery)
                nursery.start_soon(self._gossip_supervisor)
                nursery.start_soon(self._coordinator)
                nursery.start_soon(self._fence_watch)
                self.started.set()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.sync_client.aclose()
                await self.forward_client.aclose()
            self.stopped.set()

    async def _recover(self, nursery: trio.Nursery) -> None:
        """Load the data directory (if any) and start the writer and the tombstone collector."""
        from .recovery import recover

        await recover(self, nursery)

    async def _durable(self) -> None:
        """Wait until every change made so far is on disk: before an answer that claims it."""
        if self.persist.enabled:
            await self.persist.commit(self.replica)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Sleep on data-change events until ``ready()`` or the deadline (no polling).

        Raises ``TooManyWaiting`` rather than park more than ``max_waiting`` requests.
        """
        if ready():
            return True
        if self._waiting >= self.config.max_waiting:
            raise TooManyWaiting
        self._waiting += 1
        try:
            while True:
                event = self._changed
                if ready():
                    return True
                with trio.move_on_at(deadline) as scope:
                    await event.wait()
                if scope.cancelled_caught:
                    return ready()
        finally:
            self._waiting -= 1

    # ================================================================ replication
    async def _gossip_supervisor(self) -> None:
        while True:
            installed = self._view_installed
            async with trio.open_nursery() as nursery:
                for peer in self.replica.peers:
                    nursery.start_soon(self._sender, peer)
                await installed.wait()
                nursery.cancel_scope.cancel()

    async def _sender(self, peer: Member) -> None:
        """Push our stream to one peer: at once on news, else a heartbeat now and then."""
        cfg = self.config
        last_push = -math.inf
        while True:
            news = self._changed
            # Under load, gather writes for a moment: fewer, bigger pushes. A lone write after
            # a quiet spell goes at once, so stability (and token pruning) stays quick.
            await trio.sleep(max(0.0, last_push + cfg.replication_linger - trio.current_time()))
            last_push = trio.current_time()
            await self._durable()  # persist, then send: a peer may count what it gets as stable
            batch = self.replica.batch_for(peer.id)
            if batch is None:
                return
            try:
                raw = await self.sync_client.post_json(
                    peer.address, "/internal/sync", batch.to_wire(), cfg.peer_timeout
                )
                reply = SyncReply.from_wire(raw)
            except (PeerUnavailable, WireError) as exc:
                log.debug("sync to %s failed: %s", peer.id, exc)
                await trio.sleep(cfg.gossip_interval * random.uniform(0.5, 1.5))
                continue
            self._observe_epoch(peer.id, reply.epoch, reply.view_id)
            self.replica.on_sync_reply(peer.id, reply)
            if not reply.accepted:
                await trio.sleep(cfg.gossip_interval * random.uniform(0.5, 1.5))
                continue
            if self.replica.has_news_for(peer.id) and batch.upto > batch.after:
                continue
            with trio.move_on_after(cfg.heartbeat_interval * random.uniform(0.8, 1.2)):
                await news.wait()

    async def on_sync(self, raw: Any) -> dict[str, Any]:
        batch = SyncBatch.from_wire(raw)
        self._observe_epoch(batch.sender, batch.epoch, batch.view_id)
        reply, changed = self.replica.on_sync(batch)
        await self._durable()  # "seen up to n" lets the sender prune: n must survive a crash
        if changed:
            self._notify()
        return reply.to_wire()

    # ================================================================ data requests
    async def data(
        self,
        method: str,
        key: str | None,
        deps: Deps,
        value: str | None = None,
        hops: int = 0,
        budget: float | None = None,
        write_id: str | None = None,
    ) -> Reply:
        """Serve or forward one client data request (``key`` None means ``GET /data``).

        ``write_id`` names a forwarded write: a retry of one already answered gets the same
        answer instead of being applied again.
        """
        if write_id is not None and (done := self._applied.get(write_id)) is not None:
            return done
        try:
            reply = await self._data(method, key, deps, value, hops, budget, write_id)
        except TooManyWaiting:
            return error(
                503, f"too many requests already waiting here (max_waiting="
                f"{self.config.max_waiting}); try again shortly", deps,
            )
        if write_id is not None and reply.status == 200:
            if reply.raw is not None:  # forwarded on: remember its answer durably too
                self.persist.remember(write_id, reply.status, reply.raw)
                await self._durable()
            self._applied[write_id] = reply
            while len(self._applied) > self.config.dedup_entries:
                self._applied.popitem(last=False)
        return reply

    async def _data(
        self,
        method: str,
        key: str | None,
        deps: Deps,
        value: str | None,
        hops: int,
        budget: float | None,
        write_id: str | None = None,
    ) -> Reply:
        cfg = self.config
        wait = cfg.wait_deadline if budget is None else max(0.0, min(budget, cfg.wait_deadline))
        deadline = trio.current_time() + wait
        replica = self.replica
        while True:  # again if a view change moved the key while we waited
            if not await self._wait_for(self._ready.is_set, deadline):
                return error(503, "view change in progress; try again", deps)
            installs = self._installs
            if replica.view is None:
                return error(503, "no view has been set on this node yet", deps)
            if replica.shard is None:
                return error(503, "this node is not part of the current view", deps)
            if key is not None and not replica.owns(key):
                if hops >= cfg.max_hops:
                    return error(503, "request forwarded too many times; views disagree", deps)
                return await self._forward(method, key, deps, value, hops, deadline)

            def moved(installs: int = installs) -> bool:
                return self._installs != installs or not self._ready.is_set()

            def ready() -> bool:
                if key is None:
                    return not replica.unmet_in_shard(deps)
                return not replica.unmet(key, deps)

            if method != "PUT" and replica.awaiting_handoff(key):
                if not await self._wait_for(
                    lambda: moved() or not replica.awaiting_handoff(key), deadline
                ):
                    return error(
                        503, "this key's data is still being handed off by its previous "
                        "owners, which are unreachable; try again", deps,
                    )
                continue
            if method != "PUT" and not ready():
                if not await self._wait_for(lambda: moved() or ready(), deadline):
                    return self._deps_timeout(deps, wait)
                continue
            reply = self._serve_locally(method, key, deps, value)
            if write_id is not None and method != "GET" and reply.payload is not None:
                # in the write's own commit: a retry after our restart must not apply it again
                self.persist.remember(write_id, reply.status, dumps(reply.payload))
            # An answer (a write's 200, or a read of a write) only once what it shows is on
            # disk: a value seen then lost would break the reader's causal past.
            await self._durable()
            return reply

    def _serve_locally(self, method: str, key: str | None, deps: Deps, value: str | None) -> Reply:
        """Answer from this replica: ownership and dependencies were checked with no await since."""
        replica = self.replica
        if key is None:
            items, out = replica.items(deps)
            return Reply(200, {"items": items, "causal-metadata": render_metadata(out)})
        if method == "PUT" or method == "DELETE":
            if method == "DELETE" and not replica.is_live(key):
                return error(404, f"key {key!r} does not exist", deps)
            out = replica.write(key, value, deps, self.wall_ms())
            self._notify()
            return Reply(200, {"causal-metadata": render_metadata(out)})
        entry, out = replica.read(key, deps)
        if entry is None or entry.value is None:
            return error(404, f"key {key!r} does not exist", out)
        return Reply(200, {"value": entry.value, "causal-metadata": render_metadata(out)})

    def _deps_timeout(self, deps: Deps, waited: float) -> Reply:
        return error(
            503,
            "causal dependencies not yet available on this replica; its shard may be "
            f"partitioned (waited {waited:g}s)",
            deps,
        )

    async def _forward(
        self, method: str, key: str, deps: Deps, value: str | None, hops: int, deadline: float
    ) -> Reply:
        """Try the owning shard's replicas in turn until one answers or the deadline passes."""
        cfg = self.config
        view = self.replica.view
        assert view is not None
        fenced_to = self.replica.fence_for(key)
        if fenced_to is not None:
            view = fenced_to  # a newer owner pulled this key from us
        shard = view.shard_for(key)
        replicas = self._forward_order(
            tuple(m for m in view.shards[shard] if m.id != self.node_id)
        )
        if not replicas:
            return error(503, f"shard {shard} has no other replica to forward to", deps)
        body: dict[str, Any] = {"causal-metadata": render_metadata(deps)}
        if value is not None:
            body["value"] = value
        content = dumps(body)
        path = "/data/" + quote(key, safe="")
        headers = {HOPS_HEADER: str(hops + 1)}
        if method != "GET":
            # A write may reach a replica whose answer is then lost. Sent again elsewhere it
            # would be applied twice, the copy with a later version that could overwrite a
            # write made after the first (a causal anomaly). So after an ambiguous failure a
            # write is retried only at the same replica, under an id it deduplicates.
            self._write_ids += 1
            headers[WRITE_ID_HEADER] = f"{self.replica.origin}.{self._write_ids}"
        sticky: Member | None = None
        attempt = 0
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            target = sticky or replicas[attempt % len(replicas)]
            attempt += 1
            timeout = min(remaining, cfg.forward_attempt_timeout)
            # The target may wait for causal deps; it must answer before our attempt ends.
            budget = max(0.0, timeout - min(1.0, timeout / 4))
            headers[BUDGET_HEADER] = f"{budget:.3f}"
            try:
                resp = await self.forward_client.request(
                    target.address, method, path, content=content, timeout=timeout,
                    headers=headers,
                )
            except PeerUnavailable as exc:
                log.debug("forward of %r to %s failed: %s", key, target.id, exc)
                self._forward_failed[target.id] = trio.current_time()
                if method != "GET" and not exc.not_sent:
                    sticky = target
                if sticky or attempt % len(replicas) == 0:  # give the network a moment
                    await trio.sleep(min(cfg.gossip_interval, max(0.0, remaining)))
                continue
            self._forward_failed.pop(target.id, None)
            if (
                resp.status == 503
                and sticky is None
                and trio.current_time() < deadline - 0.05
                and (method == "GET" or not _outcome_unknown(resp.body))
            ):
                continue  # that replica could not serve yet; another one may
            return Reply(resp.status, raw=resp.body)
        if sticky is not None:
            return error(
                503, f"shard {shard}: replica {sticky.id} stopped answering after the write was "
                "sent; it may or may not have been applied", deps, outcome="unknown",
            )
        return error(503, f"shard {shard} unreachable: no replica answered in time", deps)

    def _forward_order(self, members: tuple[Member, ...]) -> list[Member]:
        """Replicas to try, those that failed recently last, so a partitioned replica costs
        a request its timeout only once per ``forward_retry_after``, not every time."""
        now = trio.current_time()
        horizon = self.config.forward_retry_after

        def recently_failed(m: Member) -> bool:
            return now - self._forward_failed.get(m.id, -math.inf) < horizon

        order = list(members)
        random.shuffle(order)
        order.sort(key=recently_failed)
        return order

    # ================================================================ views
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
            "storage": {**self.persist.stats(), "tombstones_collected": self.tombstones_collected},
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
                    self.persist.state_dirty = True
                    await self._durable()  # a restart now resumes this change
                    # new pulls, and those of earlier changes still unfinished
                    self._start_pulls(nursery, self.replica.custody.pending(), new)
                    nursery.start_soon(self._hand_off, new)
            self.replica.install_view(new)
            self.persist.state_dirty = True
            with trio.CancelScope(shield=True):
                await self._durable()
            self._installs += 1
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
                    self.persist.state_dirty = True

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
            await self._durable()  # merged keys must outlive the debt they settle
            self.progress.keys_received += len(entries)
            self.progress.bytes_received += sum(e.size for _, e in entries)
            self._notify()
            if report is not None:
                started = self.replica.pulled(pull, report)
                self.persist.state_dirty = True
                await self._durable()
                self._start_pulls(nursery, started, view)
                self._notify()
                return
            cursor = str(nxt)

    async def on_pull(self, raw: Any) -> dict[str, Any]:
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
        fences = len(self.replica.custody.fences)
        self.replica.fence(view, within)
        if len(self.replica.custody.fences) != fences:
            self.persist.state_dirty = True  # a restart must not serve fenced keys again
        await self._durable()
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

    async def on_handoff(self, raw: Any) -> dict[str, Any]:
        try:
            entries = entries_from_wire(raw["entries"])
        except (KeyError, TypeError) as exc:
            raise WireError("malformed handoff") from exc
        self._observe_epoch(raw.get("from"), raw.get("epoch"), raw.get("view_id"))
        changed = self.replica.merge(entries)
        await self._durable()  # the sender drops its copy on our ack
        if changed:
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
            await self._durable()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def serve(config: Config) -> None:
    """Run a node with hypercorn until SIGTERM/SIGINT, then shut down cleanly."""
    from hypercorn.config import Config as HyperConfig

    from .api import build_app

    if config.gc_gen0_threshold > 0:
        gc.freeze()  # what startup made lives for good: no collection needs to scan it again
        _gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(config.gc_gen0_threshold, gen1, gen2)
    node = Node(config)
    hcfg = HyperConfig()
    hcfg.bind = [f"{config.host}:{config.port}"]
    hcfg.keep_alive_timeout = config.keep_alive_timeout
    hcfg.graceful_timeout = config.shutdown_grace
    hcfg.h11_max_incomplete_size = config.max_header_bytes
    hcfg.accesslog = None
    hcfg.errorlog = logging.getLogger("hypercorn.error")
    stop = trio.Event()
    http_done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        nursery.start_soon(_stop_on_signal, stop)
        binds = await nursery.start(_serve_http, build_app(node), hcfg, stop, http_done)
        log.info("node %s listening on %s", config.node_id, ", ".join(binds))
        await http_done.wait()  # hypercorn returns once stopped and drained (graceful_timeout)
        nursery.cancel_scope.cancel()


async def _serve_http(
    app: Any,
    hcfg: Any,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    import hypercorn.trio

    try:
        await hypercorn.trio.serve(app, hcfg, shutdown_trigger=stop.wait, task_status=task_status)
    finally:
        done.set()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("received %s: shutting down", signal.Signals(sig).name)
            stop.set()
            return

