"""The trio shell around a ``Replica``: one nursery per node.

It supervises one replication sender per peer, the view-change coordinator (``viewchange.py``)
and the forwarding pool; ``server.py`` adds hypercorn.  It moves bytes and time only;
every decision is the replica's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio

from .config import Config
from .listing import Page, gather, page_of
from .messages import SyncBatch, SyncReply, WireError, WireRules, dumps
from .metadata import Deps, TokenRules, render_metadata
from .recovery import AppliedAnswers, Durable
from .replica import Replica, ReplicaLimits
from .stats import NodeStats
from .transport import PeerClient, PeerUnavailable, TransportFactory, real_transport
from .view import Member
from .viewchange import ChangeProgress, ViewChanges, _ViewRequest

log = logging.getLogger("trio_kv.node")

HOPS_HEADER = "x-kv-hops"
BUDGET_HEADER = "x-kv-budget"
WRITE_ID_HEADER = "x-kv-write-id"


def key_path_segment(key: str) -> str:
    """The key as one URL path segment that no client or server normalises away: every
    reserved character escaped, and the dot segments ``.`` and ``..`` spelled ``%2E``."""
    segment = quote(key, safe="")
    return segment.replace(".", "%2E") if set(key) == {"."} else segment


def _fingerprint(method: str, key: str | None, value: str | None, deps: Deps) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(dumps([method, key, value, sorted((k, list(v)) for k, v in deps.items())]))
    return digest.digest()


def _either(a: Callable[[], bool], b: Callable[[], bool]) -> bool:
    return a() or b()


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


class Node(Durable, ViewChanges):
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
        self.token_rules = TokenRules(
            config.max_token_deps, config.max_token_bytes, config.max_key_bytes,
            config.max_skew_ms,
        )
        self.replica = Replica(
            config.node_id,
            f"{config.node_id}.{incarnation}",
            ReplicaLimits(
                config.batch_entries, config.batch_bytes, config.handoff_batch_entries,
                config.handoff_batch_bytes, self.token_rules,
            ),
        )
        keepalive = config.client_keepalive_expiry
        # Replication has at most one call in flight per peer; forwarding is bounded by its own
        # limiter.  Separate clients keep one pool's bookkeeping from slowing the other.
        self.sync_client = PeerClient(
            transport_factory, 8, config.connect_timeout, keepalive, config.cluster_secret,
            config.max_peer_message_bytes,
        )
        self.forward_client = PeerClient(
            transport_factory, config.forward_concurrency, config.connect_timeout, keepalive,
            config.cluster_secret, config.max_peer_message_bytes,
        )
        self.task_failures = 0  # background task crashes (each logged, the task restarted)
        self._installs = 0  # views installed so far: a parked request re-checks ownership
        self.progress = ChangeProgress()
        self._changed = trio.Event()  # replaced on every data change: wakes readers, senders
        self._stabler = trio.Event()  # replaced whenever a peer confirms more of our stream
        self._ready = trio.Event()  # set while no view change is in progress
        self._ready.set()
        self._view_installed = trio.Event()
        self._view_send, self._view_recv = trio.open_memory_channel[_ViewRequest](16)
        self._view_requested = trio.Event()  # a PUT /view waits: background retries yield
        self._waiting = 0  # requests parked in _wait_for
        self._write_ids = 0
        # answers to forwarded writes by write id, so a retry is not applied twice
        self._applied: OrderedDict[tuple[str, bytes], Reply] = AppliedAnswers(self._persister())
        self._forward_failed: dict[int, float] = {}  # member id -> when a forward to it failed
        self.started = trio.Event()
        self.stats = NodeStats()  # read by /metrics at scrape time

    # ================================================================ services
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replication and view-change services; runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                await self._recover(nursery)  # load the data directory, if there is one
                nursery.start_soon(self._supervise, "replication", self._replication)
                nursery.start_soon(self._supervise, "view-change coordinator", self._coordinator)
                nursery.start_soon(self._supervise, "fence probes", self._fence_watch)
                self.started.set()
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.sync_client.aclose()
                await self.forward_client.aclose()

    async def _supervise(self, name: str, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a background task to completion: a failure is logged with its context and the
        task restarts after a backoff, while the node keeps serving.  A bug in one task (or a
        peer answer we did not foresee) must not take the node down, nor leave it half-alive
        with a dead task."""
        failures = 0
        while True:
            began = trio.current_time()
            try:
                await task(*args)
                return
            except Exception:
                self.task_failures += 1
                failures = 1 if trio.current_time() - began > 60 else failures + 1
                delay = self._backoff(failures)
                log.exception(
                    "node %s: background task %r failed (%d in a row); restarting in %.2fs",
                    self.node_id, name, failures, delay,
                )
                await trio.sleep(delay)

    def wire_rules(self) -> WireRules:
        """What a peer message may hold, now."""
        cfg = self.config
        return WireRules(
            self.token_rules, cfg.max_value_bytes, self.token_rules.latest_hlc(self.wall_ms()),
            cfg.vnodes, cfg.max_view_nodes,
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _claims_advanced(self) -> None:
        """Peers confirmed more of our stream: more writes are stable, tokens shrink."""
        self._stabler.set()
        self._stabler = trio.Event()

    async def _wait_for(
        self, ready: Callable[[], bool], deadline: float, on_stability: bool = False
    ) -> bool:
        """Sleep on data-change events (or, with ``on_stability``, on peers confirming our
        stream) until ``ready()`` or the deadline (no polling).

        Raises ``TooManyWaiting`` rather than park more than ``max_waiting`` requests.
        """
        if ready():
            return True
        if self._waiting >= self.config.max_waiting:
            raise TooManyWaiting
        self._waiting += 1
        try:
            while True:
                event = self._stabler if on_stability else self._changed
                if ready():
                    return True
                with trio.move_on_at(deadline) as scope:
                    await event.wait()
                if scope.cancelled_caught:
                    return ready()
        finally:
            self._waiting -= 1

    # ================================================================ replication
    async def _replication(self) -> None:
        """One sender per peer of our shard, replaced whenever a view is installed."""
        while True:
            installed = self._view_installed
            async with trio.open_nursery() as nursery:
                for peer in self.replica.peers:
                    nursery.start_soon(self._supervise, f"sync to {peer.id}", self._sender, peer)
                await installed.wait()
                nursery.cancel_scope.cancel()

    async def _sender(self, peer: Member) -> None:
        """Push our stream to one peer: at once on news, else a heartbeat now and then."""
        cfg = self.config
        last_push = -math.inf
        max_bytes = cfg.batch_bytes  # halved while the peer refuses our batches as too large
        while True:
            news = self._changed
            # Under load, gather writes for a moment: fewer, bigger pushes. A lone write after
            # a quiet spell goes at once, so stability (and token pruning) stays quick.
            await trio.sleep(max(0.0, last_push + cfg.replication_linger - trio.current_time()))
            last_push = trio.current_time()
            await self.durable()  # persist, then send: the peer may count what it gets stable
            batch = self.replica.batch_for(peer.id, max_bytes)
            if batch is None:
                return
            try:
                raw = await self.sync_client.post_json(
                    peer.address, "/internal/sync", batch.to_wire(), cfg.peer_timeout
                )
                reply = SyncReply.from_wire(raw)
            except (PeerUnavailable, WireError) as exc:
                max_bytes = self._after_refusal(exc, max_bytes, len(batch.entries), peer.id)
                await trio.sleep(cfg.gossip_interval * random.uniform(0.5, 1.5))
                continue
            self._observe_epoch(peer.id, reply.epoch, reply.view_id)
            if self.replica.on_sync_reply(peer.id, reply):
                self._claims_advanced()
            self.stats.synced("sent", len(batch.entries))
            if not reply.accepted:
                await trio.sleep(cfg.gossip_interval * random.uniform(0.5, 1.5))
                continue
            if self.replica.has_news_for(peer.id) and batch.upto > batch.after:
                continue
            with trio.move_on_after(cfg.heartbeat_interval * random.uniform(0.8, 1.2)):
                await news.wait()

    def _after_refusal(self, exc: Exception, max_bytes: int, entries: int, peer: int) -> int:
        """Log a failed peer call; the batch bytes to use next (halved after a 413, so a
        refused batch is never sent again unchanged)."""
        if isinstance(exc, PeerUnavailable) and exc.too_large:
            if entries <= 1:
                log.error("node %s: peer %s refuses one entry as too large: its "
                          "max_peer_message_bytes is below ours", self.node_id, peer)
                return max_bytes
            log.warning("node %s: peer %s refused a batch as too large; halving it",
                        self.node_id, peer)
            return max(1, max_bytes // 2)
        log.debug("node %s: call to %s failed: %s", self.node_id, peer, exc)
        return max_bytes

    def on_sync(self, raw: Any) -> dict[str, Any]:
        batch = SyncBatch.from_wire(raw, self.wire_rules())
        self._observe_epoch(batch.sender, batch.epoch, batch.view_id)
        claimed = self.replica.claims.get(batch.sender, 0)
        reply, changed = self.replica.on_sync(batch)
        self.stats.synced("received", len(batch.entries))
        if self.replica.claims.get(batch.sender, 0) > claimed:
            self._claims_advanced()
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
        page: Page | None = None,
    ) -> Reply:
        """Serve or forward one client data request (``key`` None means ``GET /data``,
        all of it, or one ``page`` of it).

        ``write_id`` names a forwarded write: a retry of one already answered gets the same
        answer instead of being applied again.
        """
        dedup = None
        if write_id is not None:
            # Keyed by what the write is too: an id (which a client could send) only ever
            # matches a retry of the very same request, never suppresses another write.
            dedup = (write_id, _fingerprint(method, key, value, deps))
            if (done := self._applied.get(dedup)) is not None:
                return done
        try:
            reply = await self._data(method, key, deps, value, hops, budget, page)
        except TooManyWaiting:
            self.stats.waits_refused += 1
            return error(
                503, f"too many requests already waiting here (max_waiting="
                f"{self.config.max_waiting}); try again shortly", deps,
            )
        if dedup is not None and reply.status == 200:
            self._applied[dedup] = reply
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
        page: Page | None = None,
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
            if key is None and replica.shard is None:  # a routing node: ask every shard
                return await gather(self, deps, page, hops, deadline)
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

            # Writes wait too: a write its old owners made (and made stable, so no token
            # names it) may carry a later timestamp than ours from a faster clock; ours must
            # win, so we write only once we hold the key's past (issue 9, item 8).
            if replica.awaiting_handoff(key):
                if not await self._wait_for(
                    lambda: moved() or not replica.awaiting_handoff(key), deadline
                ):
                    return error(
                        503, "this key's data is still being handed off by its previous "
                        "owners, which are unreachable; try again", deps,
                    )
                continue
            if method != "PUT" and not ready():
                began = trio.current_time()
                met = await self._wait_for(lambda: moved() or ready(), deadline)
                if not self.stats.waited(trio.current_time() - began, met):
                    return self._deps_timeout(deps, wait)
                continue
            reply = self._serve_locally(method, key, deps, value, page)
            if reply is not None:
                return reply
            # The answer's token would be over the limits: wait for replication to make some
            # of its writes stable (pruned), then answer afresh.
            if not await self._wait_for(
                functools.partial(_either, moved, self._stabler.is_set), deadline,
                on_stability=True,
            ):
                return self._token_full(deps)

    def _serve_locally(
        self, method: str, key: str | None, deps: Deps, value: str | None,
        page: Page | None = None,
    ) -> Reply | None:
        """Answer from this replica: ownership and dependencies were checked with no await
        since.  None (and nothing changed) when the answer's token would exceed the limits."""
        replica = self.replica
        if key is None and page is not None:
            return page_of(self, deps, page)
        if key is None:
            items, out = replica.items(deps)
            if not self.token_rules.fits(out):
                return None
            return Reply(200, {"items": items, "causal-metadata": render_metadata(out)})
        if method == "PUT" or method == "DELETE":
            if method == "DELETE" and not replica.is_live(key):
                return error(404, f"key {key!r} does not exist", deps)
            written = replica.write(key, value, deps, self.wall_ms())
            if written is None:
                return None
            self._notify()
            return Reply(200, {"causal-metadata": render_metadata(written)})
        entry, out = replica.read(key, deps)
        if not self.token_rules.fits(out):
            return None
        if entry is None or entry.value is None:
            return error(404, f"key {key!r} does not exist", out)
        return Reply(200, {"value": entry.value, "causal-metadata": render_metadata(out)})

    def _token_full(self, deps: Deps) -> Reply:
        rules = self.token_rules
        return error(
            503, "the answer's causal metadata would exceed the token limits (max_token_deps="
            f"{rules.max_deps}, max_token_bytes={rules.max_bytes}): too many writes in this "
            "session's past have not reached every replica yet; retry once replication catches "
            "up, or start a new session", deps,
        )

    def _deps_timeout(self, deps: Deps, waited: float) -> Reply:
        return error(
            503,
            "causal dependencies not yet available on this replica; its shard may be "
            f"partitioned (waited {waited:g}s)",
            deps,
        )

    async def _forward(
        self, method: str, key: str | None, deps: Deps, value: str | None, hops: int,
        deadline: float, shard: str = "", query: str = "",
    ) -> Reply:
        """Try the owning shard's replicas in turn until one answers or the deadline passes
        (``key`` None: ``GET /data`` + ``query`` of the named ``shard``)."""
        cfg = self.config
        view = self.replica.view
        assert view is not None
        fenced_to = self.replica.fence_for(key) if key is not None else None
        if fenced_to is not None:
            view = fenced_to  # a newer owner pulled this key from us
        shard = view.shard_for(key) if key is not None else shard
        replicas = self._forward_order(
            tuple(m for m in view.shards[shard] if m.id != self.node_id)
        )
        if not replicas:
            return error(503, f"shard {shard} has no other replica to forward to", deps)
        body: dict[str, Any] = {"causal-metadata": render_metadata(deps)}
        if value is not None:
            body["value"] = value
        content = dumps(body)
        path = "/data/" + key_path_segment(key) if key is not None else "/data" + query
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
        self.stats.forward_gave_up += 1
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
