"""Client data requests: route, wait (parked, re-evaluated on every change), serve, dedup.

A request is evaluated from the top every time the node's state changes (no await between a
check and the answer it leads to, so "owns the key, dependencies met, serve" is atomic), until
it is answered, forwarded, or its deadline passes (then it is answered with why it waited).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import listing
from ..messages import dumps
from ..metadata import Deps, render_metadata
from .events import Reply, Request, Respond
from .forwarding import Forwarding
from .kernel import Timer

if TYPE_CHECKING:
    from .core import Core

# Why a request is parked; the answer it gets if its deadline passes first.
CHANGE, HANDOFF, DEPS, TOKEN = "change", "handoff", "deps", "token"


def error(status: int, message: str, deps: Deps | None = None, **extra: Any) -> Reply:
    body: dict[str, Any] = {"error": message, **extra}
    if deps is not None:
        body["causal-metadata"] = render_metadata(deps)
    return Reply(status, body)


def fingerprint(req: Request) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    deps = sorted((k, list(v)) for k, v in req.deps.items())
    digest.update(dumps([req.method, req.key, req.value, deps]))
    return digest.digest()


@dataclass(eq=False)
class Pending:
    rid: int
    req: Request
    deadline: float
    wait: float  # seconds this request may wait in all
    dedup: tuple[str, bytes] | None
    parked: str | None = None
    timer: Timer | None = None
    forwarding: bool = False
    final: bool = field(default=False)
    deps_since: float | None = None  # when it began waiting for causal dependencies
    copies: list[int] = field(default_factory=list)  # the same write, arrived meanwhile


class Requests:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.pending: dict[int, Pending] = {}
        self._parked: dict[int, Pending] = {}
        # answers to forwarded writes by write id, so a retry is not applied twice
        self.applied: OrderedDict[tuple[str, bytes], Reply] = OrderedDict()
        self.inflight: dict[tuple[str, bytes], Pending] = {}  # forwarded writes not answered
        self.forwarding = Forwarding(core, self)

    def parked_count(self) -> int:
        return len(self._parked)

    def start(self, rid: int, req: Request) -> None:
        cfg = self.core.config
        dedup = None
        if req.write_id is not None:
            # Keyed by what the write is too: an id (which a client could send) only ever
            # matches a retry of the very same request, never suppresses another write.
            dedup = (req.write_id, fingerprint(req))
            if (done := self.applied.get(dedup)) is not None:
                self.core.k.emit(Respond(rid, done))
                return
            if (first := self.inflight.get(dedup)) is not None:
                # Another copy of a write we are still handling (a retry that overtook it):
                # handled twice, it could be applied twice, the copy over a later write.
                first.copies.append(rid)
                return
            if req.retry and self.core.uptime() < cfg.wait_deadline:
                # An earlier attempt was sent at most wait_deadline ago: it may have reached
                # our previous incarnation, whose answers we lost.  Applying it again could
                # overwrite a later write (the simulator found this); say we cannot know.
                self.core.k.emit(Respond(rid, error(
                    503, "this node restarted since the write was first sent; it may or may "
                    "not have been applied", req.deps, outcome="unknown",
                )))
                return
        wait = cfg.wait_deadline if req.budget is None else max(
            0.0, min(req.budget, cfg.wait_deadline)
        )
        p = Pending(rid, req, self.core.k.now + wait, wait, dedup)
        self.pending[rid] = p
        if dedup is not None:
            self.inflight[dedup] = p
        self._attempt(p)

    def abandon(self, rid: int) -> None:
        p = self.pending.get(rid)
        if p is not None and p.copies:
            return  # another copy still waits for its answer
        p = self.pending.pop(rid, None)
        if p is not None:
            if p.dedup is not None:
                self.inflight.pop(p.dedup, None)
            self._unpark(p)
            self.forwarding.abandon(p)

    def reevaluate(self) -> None:
        for p in list(self._parked.values()):
            if p.rid in self._parked:
                self._attempt(p)

    def finish(self, p: Pending, reply: Reply) -> None:
        if self.pending.pop(p.rid, None) is None:
            return
        met = not (p.parked == DEPS and reply.status == 503)
        self._unpark(p)
        self._waited(p, met)
        if p.dedup is not None:
            self.inflight.pop(p.dedup, None)
            if reply.status == 200:
                self.applied[p.dedup] = reply
                while len(self.applied) > self.core.config.dedup_entries:
                    self.applied.popitem(last=False)
        for rid in (p.rid, *p.copies):
            self.core.k.emit(Respond(rid, reply))

    # ------------------------------------------------------------ the decision
    def _attempt(self, p: Pending) -> None:
        core, req = self.core, p.req
        replica, key, deps = core.replica, p.req.key, p.req.deps
        if core.changes.changing:
            return self._park(p, CHANGE)
        if replica.view is None:
            return self.finish(p, error(503, "no view has been set on this node yet", deps))
        if key is None and replica.shard is None:  # a routing node: ask every shard
            return self._gather(p)
        if key is not None and not replica.owns(key):
            self._unpark(p)
            if req.hops >= core.config.max_hops:
                return self.finish(
                    p, error(503, "request forwarded too many times; views disagree", deps)
                )
            return self.forwarding.start(p)
        # Writes wait too: a write its old owners made (and made stable, so no token names it)
        # may carry a later timestamp than ours from a faster clock; ours must win, so we
        # write only once we hold the key's past (issue 9, item 8).
        if replica.custody.awaiting(key):
            return self._park(p, HANDOFF)
        if req.method != "PUT":
            unmet = replica.unmet_in_shard(deps) if key is None else replica.unmet(key, deps)
            if unmet:
                return self._park(p, DEPS)
        self._waited(p, met=True)
        reply = self._serve(req)
        if reply is not None:
            return self.finish(p, reply)
        # The answer's token would be over the limits: wait for replication to make some of
        # its writes stable (pruned), then answer afresh.
        return self._park(p, TOKEN)

    def _serve(self, req: Request) -> Reply | None:
        """Answer from this replica; None (nothing changed) when the answer's token would be
        over the limits."""
        core = self.core
        replica, key, deps, fits = core.replica, req.key, req.deps, core.token_rules.fits
        if key is None and req.page is not None:
            return listing.page_of(replica, core.token_rules, deps, req.page)
        if key is None:
            items, out = replica.items(deps)
            if not fits(out):
                return None
            return Reply(200, {"items": items, "causal-metadata": render_metadata(out)})
        if req.method in ("PUT", "DELETE"):
            if req.method == "DELETE" and not replica.is_live(key):
                return error(404, f"key {key!r} does not exist", deps)
            written = replica.write(key, req.value, deps, core.k.wall_ms)
            if written is None:
                return None
            core.notify()
            return Reply(200, {"causal-metadata": render_metadata(written)})
        entry, out = replica.read(key, deps)
        if not fits(out):
            return None
        if entry is None or entry.value is None:
            return error(404, f"key {key!r} does not exist", out)
        return Reply(200, {"value": entry.value, "causal-metadata": render_metadata(out)})

    # ------------------------------------------------------------ waits
    def _park(self, p: Pending, why: str) -> None:
        if p.final:
            return self.finish(p, self._timeout(p, why))
        if p.rid not in self._parked:
            cfg = self.core.config
            if len(self._parked) >= cfg.max_waiting:
                self.core.stats.waits_refused += 1
                return self.finish(p, error(
                    503, "too many requests already waiting here (max_waiting="
                    f"{cfg.max_waiting}); try again shortly", p.req.deps,
                ))
            self._parked[p.rid] = p
            p.timer = self.core.k.at(p.deadline, lambda: self._expire(p))
        if why == DEPS and p.deps_since is None:
            p.deps_since = self.core.k.now
        p.parked = why

    def _waited(self, p: Pending, met: bool) -> None:
        """Count a causal wait that ended (metrics)."""
        if p.deps_since is not None:
            self.core.stats.waited(self.core.k.now - p.deps_since, met)
            p.deps_since = None

    def _gather(self, p: Pending) -> None:
        """A routing node's ``GET /data``: one forward per shard, answers merged."""
        core, req = self.core, p.req
        if req.hops >= core.config.max_hops:
            return self.finish(
                p, error(503, "request forwarded too many times; views disagree", req.deps)
            )
        view = core.replica.view
        assert view is not None
        answers: dict[str, Reply] = {}
        shards = sorted(view.shards)
        query = req.page.query() if req.page is not None else ""

        def answered(shard: str, reply: Reply) -> None:
            answers[shard] = reply
            if len(answers) == len(shards):
                self.finish(p, listing.merge_listings(answers, req.deps, req.page))

        for shard in shards:
            if p.rid in self.pending:
                self.forwarding.start(
                    p, shard, query, lambda reply, s=shard: answered(s, reply)  # type: ignore[misc]
                )

    def _unpark(self, p: Pending) -> None:
        if self._parked.pop(p.rid, None) is not None and p.timer is not None:
            p.timer.cancel()
        p.parked = None

    def _expire(self, p: Pending) -> None:
        """The deadline: one last look, then answer with why it still waits."""
        if p.rid in self._parked:
            self._parked.pop(p.rid)
            p.final = True
            self._attempt(p)

    def _timeout(self, p: Pending, why: str) -> Reply:
        deps = p.req.deps
        if why == CHANGE:
            return error(503, "view change in progress; try again", deps)
        if why == HANDOFF:
            return error(503, "this key's data is still being handed off by its previous "
                         "owners, which are unreachable; try again", deps)
        if why == DEPS:
            return error(503, "causal dependencies not yet available on this replica; its "
                         f"shard may be partitioned (waited {p.wait:g}s)", deps)
        rules = self.core.token_rules
        return error(
            503, "the answer's causal metadata would exceed the token limits (max_token_deps="
            f"{rules.max_deps}, max_token_bytes={rules.max_bytes}): too many writes in this "
            "session's past have not reached every replica yet; retry once replication catches "
            "up, or start a new session", deps,
        )
