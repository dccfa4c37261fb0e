"""The trio shell around a ``Core``: one nursery per node, carrying out the core's decisions.

The core decides everything (``core/``); this module only moves bytes and time: it feeds the
core client requests, peer messages, call outcomes and timer ticks, each with the time, and
carries out what comes back, in raft's order: persist, then send (each ``Call`` a task in the
nursery, bounded by its cancel scope), then answer.  ``server.py`` adds hypercorn.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from .channel import ChannelClient
from .config import Config
from .core import (
    Answer,
    Call,
    Cancel,
    Core,
    Failed,
    Log,
    Outcome,
    Output,
    Persist,
    Reply,
    Request,
    Respond,
)
from .core.forwarding import (
    BUDGET_HEADER,
    HOPS_HEADER,
    RETRY_HEADER,
    WRITE_ID_HEADER,
    key_path_segment,
)
from .core.viewchange import ChangeProgress
from .listing import Page
from .messages import WireRules
from .metadata import Deps, TokenRules
from .persist import Persister, PersistFailed
from .recovery import AppliedAnswers, persister, recover
from .replica import Replica
from .stats import NodeStats
from .transport import (
    PeerCaller,
    PeerClient,
    PeerUnavailable,
    TransportFactory,
    real_transport,
)
from .view import View

log = logging.getLogger("trio_kv.node")

__all__ = [
    "BUDGET_HEADER", "HOPS_HEADER", "RETRY_HEADER", "WRITE_ID_HEADER", "Node", "Reply",
    "key_path_segment",
]


class _Waiter:
    """A request handed to the core, until the core answers it."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None


def peer_clients(config: Config, factory: TransportFactory) -> dict[str, PeerCaller]:
    """Replication has at most one call in flight per peer; forwarding is bounded by its own
    limiter.  Separate clients keep one lane's traffic from queueing behind the other's (a
    4 MiB sync batch ahead of a forwarded GET).  Channels need real sockets: an injected
    transport (in-process tests) means HTTP."""
    made: dict[str, PeerCaller] = {}
    for lane, concurrency in (("peer", 8), ("forward", config.forward_concurrency)):
        http = PeerClient(factory, concurrency, config.connect_timeout,
                          config.client_keepalive_expiry, config.cluster_secret,
                          config.max_peer_message_bytes)
        if config.peer_transport == "channel" and factory is real_transport:
            made[lane] = ChannelClient(
                concurrency, config.connect_timeout, config.client_keepalive_expiry,
                config.cluster_secret, config.max_peer_message_bytes, fallback=http,
                linger=config.channel_send_linger, stall_timeout=config.channel_stall_timeout)
        else:
            made[lane] = http
    return made


class Node:
    def __init__(
        self,
        config: Config,
        transport_factory: TransportFactory = real_transport,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rng: random.Random | None = None,
    ) -> None:
        if config.node_id is None:
            raise ValueError("a node needs an id (--id or NODE_IDENTIFIER)")
        self.config = config
        self.node_id = config.node_id
        self.wall_ms = wall_ms
        # A new stream name per incarnation: a restarted node never reuses a write identity.
        rng = rng or random.Random()
        origin = f"{config.node_id}.{time.time_ns():x}{rng.getrandbits(16):04x}"
        self.core = Core(config, origin, rng)
        self.persist: Persister = persister(config)
        self.core.requests.applied = AppliedAnswers(self.persist)
        self._clients = peer_clients(config, transport_factory)
        self._failures = 0  # shell steps that failed (each logged; the node goes on)
        self.started = trio.Event()
        self._rids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._timer = trio.CancelScope()  # its deadline: the core's earliest timer

    # ================================================================ what others read
    @property
    def task_failures(self) -> int:
        """Background work that failed (logged; it was retried and the node went on)."""
        return self._failures + self.core.k.failures

    @property
    def stats(self) -> NodeStats:
        return self.core.stats

    @property
    def sync_client(self) -> PeerCaller:
        return self._clients["peer"]

    @property
    def forward_client(self) -> PeerCaller:
        return self._clients["forward"]

    @property
    def replica(self) -> Replica:
        return self.core.replica

    @property
    def progress(self) -> ChangeProgress:
        return self.core.changes.progress

    @property
    def token_rules(self) -> TokenRules:
        return self.core.token_rules

    def wire_rules(self) -> WireRules:
        return self.core.wire_rules()

    def view_status(self) -> dict[str, Any]:
        storage = {**self.persist.stats(), "tombstones_collected": self.core.tombstones_collected}
        return {**self.core.view_status(), "storage": storage}

    # ================================================================ the loop
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out the core's decisions until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for client in self._clients.values():
                    client.start(nursery)
                await recover(self, nursery)  # load the data directory, if there is one
                nursery.start_soon(self._timers)
                self.started.set()
                task_status.started()
        finally:
            self._nursery = None
            self._stopped = True
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for client in self._clients.values():
                    await client.aclose()

    def _now(self) -> tuple[float, int]:
        return trio.current_time(), self.wall_ms()

    def _carry_out(self, outputs: list[Output]) -> None:
        """Carry out decisions now, or (when some must wait for the disk) in a task."""
        if self._persisting(outputs):
            assert self._nursery is not None
            if any(isinstance(o, Persist) and o.state for o in outputs):
                self.persist.state_dirty = True  # the view or custody changed: snapshot it
            self._nursery.start_soon(self._carry_out_durably, outputs)
        else:
            self._send_and_answer(outputs)

    def _persisting(self, outputs: list[Output]) -> bool:
        """Whether sends and answers must first wait for the disk (raft's Ready: persist,
        then send, then answer): with a data directory, whenever there is something to carry
        out (a send or an answer may show what is not yet on disk)."""
        return self.persist.enabled and any(
            isinstance(o, (Call, Respond, Persist)) for o in outputs
        )

    async def _carry_out_durably(self, outputs: list[Output]) -> None:
        await self.durable()
        self._send_and_answer(outputs)

    async def durable(self) -> None:
        """Return once every change made so far is on disk (at once without a data dir)."""
        if self.persist.enabled:
            await self.persist.commit(self.replica)

    def recovered(self) -> None:
        """The data directory is loaded (or there is none): the core takes it from here."""
        self._step(self.core.recovered, *self._now())

    def _send_and_answer(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Call):
                if self._nursery is None:
                    continue  # shutting down
                self._nursery.start_soon(self._call, out)
            elif isinstance(out, Cancel):
                scope = self._scopes.pop(out.cid, None)
                if scope is not None:
                    scope.cancel()
            elif isinstance(out, Log):
                log.log(out.level, "%s", out.message)
        for out in outputs:
            if isinstance(out, Respond):
                waiter = self._waiters.pop(out.rid, None)
                if waiter is not None:
                    waiter.reply = out.reply
                    waiter.done.set()
        wake = self.core.next_wake()
        deadline = math.inf if wake is None else wake
        if deadline != self._timer.deadline:  # earlier, or later: a slack timer fired early
            self._timer.deadline = deadline  # no wake-up of the timer task for it

    async def _timers(self) -> None:
        """Tick the core when its earliest timer is due."""
        while True:
            at = self.core.next_wake()
            self._timer = trio.CancelScope(deadline=math.inf if at is None else at)
            with self._timer:
                await trio.sleep_forever()
            at = self.core.next_wake()
            if at is not None and trio.current_time() >= at:
                self._step(self.core.tick, *self._now())

    def _step(self, fn: Callable[..., list[Output]], *args: Any) -> None:
        """One input to the core; a bug there is logged and counted, and the node goes on.
        A stopped node takes none (an input may fire timers whose decisions it cannot carry
        out)."""
        if self._stopped:
            return
        try:
            outputs = fn(*args)
        except Exception:
            self._failures += 1
            log.exception("node %s: the core failed on %s", self.node_id, fn.__name__)
            return
        self._carry_out(outputs)

    async def _call(self, call: Call) -> None:
        with trio.CancelScope() as scope:
            self._scopes[call.cid] = scope
            outcome = await self._perform(call)
        self._scopes.pop(call.cid, None)
        if not scope.cancelled_caught:
            self._step(self.core.call_done, call.cid, outcome, *self._now())

    async def _perform(self, call: Call) -> Outcome:
        try:
            resp = await self._clients[call.lane].request(
                call.address, call.method, call.path, content=call.body,
                headers=dict(call.headers), timeout=call.timeout,
            )
        except PeerUnavailable as exc:
            return Failed(str(exc), exc.not_sent, exc.too_large)
        return Answer(resp.status, resp.body)

    async def _ask(self, start: Callable[[int], list[Output]], limit: float) -> Reply:
        """Hand a request to the core and wait for its answer (the core answers by the
        request's deadline; ``limit`` bounds the wait if it cannot, e.g. it stopped); a client
        that goes away takes its request out of the core."""
        if self._stopped:
            return Reply(503, {"error": "this node is shutting down"})
        rid = next(self._rids)
        waiter = self._waiters[rid] = _Waiter()
        try:
            self._carry_out(start(rid))
            if waiter.reply is None:
                with trio.move_on_after(limit):
                    await waiter.done.wait()
            if waiter.reply is None:
                waiter.reply = Reply(503, {"error": "no answer from this node in time"})
        finally:
            if self._waiters.pop(rid, None) is not None:  # not answered: take it back
                self._step(self.core.abandon, rid, *self._now())
        assert waiter.reply is not None
        return waiter.reply

    # ================================================================ inputs
    async def data(
        self,
        method: str,
        key: str | None,
        deps: Deps,
        value: str | None = None,
        hops: int = 0,
        budget: float | None = None,
        write_id: str | None = None,
        retry: bool = False,
        page: Page | None = None,
        request_id: str | None = None,
    ) -> Reply:
        """Serve or forward one client data request (``key`` None means ``GET /data``,
        all of it, or one ``page`` of it)."""
        req = Request(method, key, deps, value, hops, budget, write_id, retry, page, request_id)
        limit = self.config.wait_deadline + 1.0
        return await self._ask(lambda rid: self.core.request(rid, req, *self._now()), limit)

    async def put_view(self, view: View) -> str | None:
        """Apply a view (the change outlives this request); None once served, else why not
        (yet)."""
        reply = await self._ask(
            lambda rid: self.core.put_view(rid, view, *self._now()),
            self.config.put_view_timeout + 1.0,
        )
        return None if reply.status == 200 else str((reply.payload or {}).get("error"))

    async def on_sync(self, raw: Any) -> dict[str, Any]:
        return await self._peer_message(self.core.on_sync, raw)

    async def on_pull(self, raw: Any) -> dict[str, Any]:
        return await self._peer_message(self.core.on_pull, raw)

    async def on_handoff(self, raw: Any) -> dict[str, Any]:
        return await self._peer_message(self.core.on_handoff, raw)

    async def on_stable(self, raw: Any) -> dict[str, Any]:
        return await self._peer_message(self.core.on_stable, raw)

    async def _peer_message(
        self, handle: Callable[..., tuple[dict[str, Any], list[Output]]], raw: Any
    ) -> dict[str, Any]:
        """A peer message is answered at once, but only once what it changed is durable
        (our answer lets the sender count what it sent as stable, or drop its copy).  What
        the core decided is carried out by the node, not by this caller: a caller that goes
        away (its channel closed) must not drop sends and answers halfway."""
        if self._nursery is None:
            raise PersistFailed("this node is shutting down")
        answer, outputs = handle(raw, *self._now())
        self._carry_out(outputs)
        await self.durable()
        return answer

    def resync(self) -> None:
        """Forget every stream summary and re-exchange whole streams with our peers (as after
        installing a view); for tests that re-ship old versions."""
        self._step(self.core.resync, *self._now())
