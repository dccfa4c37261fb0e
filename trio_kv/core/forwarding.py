"""Forwarding a request to the owning shard: which replica, in which order, when to fail over.

Reads fail over freely.  A write fails over only when the attempt provably was not sent
(refused, no connection): if it may have arrived (the answer was lost), a copy applied
elsewhere would carry a later version and could overwrite a write made after the first copy.
So it is retried at the same replica (sticky) under a write id the target deduplicates, until
the deadline, then answered 503 with ``"outcome": "unknown"``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..messages import dumps
from ..metadata import render_metadata
from ..view import Member
from .events import Answer, Outcome, Reply
from .kernel import Timer

if TYPE_CHECKING:
    from .core import Core
    from .requests import Pending, Requests

HOPS_HEADER = "x-kv-hops"
BUDGET_HEADER = "x-kv-budget"
WRITE_ID_HEADER = "x-kv-write-id"
RETRY_HEADER = "x-kv-retry"
REQUEST_ID_HEADER = "x-request-id"


def key_path_segment(key: str) -> str:
    """The key as one URL path segment that no client or server normalises away: every
    reserved character escaped, and the dot segments ``.`` and ``..`` spelled ``%2E``."""
    segment = quote(key, safe="")
    return segment.replace(".", "%2E") if set(key) == {"."} else segment


def _preference(node: int, member: int) -> bytes:
    """Rendezvous hashing: stable per pair, unrelated across nodes (a CRC would not do: it is
    linear, so every node would rank the members alike)."""
    return hashlib.blake2b(b"%d/%d" % (node, member), digest_size=8).digest()


def outcome_unknown(body: bytes) -> bool:
    """A 503 saying a nested forward could not tell whether the write was applied."""
    return b'"outcome":"unknown"' in body


@dataclass(eq=False)
class Forward:
    p: Pending
    shard: str
    replicas: list[Member]
    content: bytes
    path: str
    headers: dict[str, str]
    done: Callable[[Reply], None] = field(default=lambda reply: None)
    sticky: Member | None = None
    attempt: int = 0
    cid: int | None = None
    timer: Timer | None = None


class Forwarding:
    def __init__(self, core: Core, requests: Requests) -> None:
        self.core = core
        self.requests = requests
        self.failed: dict[int, float] = {}  # member id -> when a forward to it failed
        self.active: dict[int, list[Forward]] = {}  # by request id
        self._write_ids = 0

    def start(
        self, p: Pending, shard: str | None = None, query: str = "",
        done: Callable[[Reply], None] | None = None,
    ) -> None:
        """Forward ``p`` to its key's shard (or, for ``GET /data``, to ``shard`` with
        ``query``); its answer goes to ``done`` (by default: it answers ``p``)."""
        core, req = self.core, p.req
        assert core.replica.view is not None
        finish = done or (lambda reply: self.requests.finish(p, reply))
        view = core.replica.view
        if req.key is not None:
            view = core.replica.fence_for(req.key) or view  # fenced: newer owners
            shard = view.shard_for(req.key)
        assert shard is not None
        replicas = self._order([m for m in view.shards[shard] if m.id != core.node_id])
        if not replicas:
            return finish(_error(503, f"shard {shard} has no other replica to forward to", p))
        body: dict[str, Any] = {"causal-metadata": render_metadata(req.deps)}
        if req.value is not None:
            body["value"] = req.value
        headers = {HOPS_HEADER: str(req.hops + 1)}
        if req.request_id is not None:
            headers[REQUEST_ID_HEADER] = req.request_id
        if req.method != "GET":
            self._write_ids += 1
            headers[WRITE_ID_HEADER] = f"{core.replica.origin}.{self._write_ids}"
        path = "/data/" + key_path_segment(req.key) if req.key is not None else "/data" + query
        f = Forward(p, shard, replicas, dumps(body), path, headers, finish)
        p.forwarding = True
        self.active.setdefault(p.rid, []).append(f)
        self._next(f)

    def abandon(self, p: Pending) -> None:
        for f in self.active.pop(p.rid, []):
            self.core.k.cancel(f.cid)
            if f.timer is not None:
                f.timer.cancel()

    def _end(self, f: Forward, reply: Reply) -> None:
        forwards = self.active.get(f.p.rid, [])
        if f in forwards:
            forwards.remove(f)
            if not forwards:
                del self.active[f.p.rid]
        f.done(reply)

    def _order(self, members: list[Member]) -> list[Member]:
        """Replicas to try: those that failed recently last, so a partitioned replica costs
        a request its timeout only once per ``forward_retry_after``, not every time; before
        that, this node's own preference (a hash of both ids: each node prefers one replica
        of a shard, different nodes mostly different ones).  Sticking to one replica, rather than
        spreading, is what lets frames to it share a wake-up and its caches stay warm (3x2
        GET +10%, bench), and lets a session's reads find its own writes already there."""
        now, horizon = self.core.k.now, self.core.config.forward_retry_after
        me = self.core.node_id
        members.sort(key=lambda m: (now - self.failed.get(m.id, -math.inf) < horizon,
                                    _preference(me, m.id)))
        return members

    def _next(self, f: Forward) -> None:
        k, cfg = self.core.k, self.core.config
        f.timer = None
        remaining = f.p.deadline - k.now
        if remaining <= 0:
            return self._give_up(f)
        target = f.sticky or f.replicas[f.attempt % len(f.replicas)]
        f.attempt += 1
        timeout = min(remaining, cfg.forward_attempt_timeout)
        # The target may wait for causal deps; it must answer before our attempt ends.
        f.headers[BUDGET_HEADER] = f"{max(0.0, timeout - min(1.0, timeout / 4)):.3f}"
        if f.sticky is not None:
            f.headers[RETRY_HEADER] = "1"  # the target may have applied an earlier attempt
        f.cid = k.call(
            target.address, f.p.req.method, f.path, f.content, timeout,
            lambda outcome: self._done(f, target, outcome), lane="forward",
            headers=tuple(sorted(f.headers.items())),
        )

    def _done(self, f: Forward, target: Member, outcome: Outcome) -> None:
        k, method = self.core.k, f.p.req.method
        f.cid = None
        if not isinstance(outcome, Answer):
            k.log(logging.DEBUG, f"forward of {f.p.req.key!r} to {target.id} failed: "
                  f"{outcome.reason}")
            self.failed[target.id] = k.now
            if method != "GET" and not outcome.not_sent:
                f.sticky = target
            if f.sticky or f.attempt % len(f.replicas) == 0:  # give the network a moment
                delay = min(self.core.config.retry_interval, max(0.0, f.p.deadline - k.now))
                f.timer = k.after(delay, lambda: self._next(f))
                return
            return self._next(f)
        self.failed.pop(target.id, None)
        if (
            outcome.status == 503
            and f.sticky is None
            and k.now < f.p.deadline - 0.05
            and (method == "GET" or not outcome_unknown(outcome.body))
        ):
            return self._next(f)  # that replica could not serve yet; another one may
        self._end(f, Reply(outcome.status, raw=outcome.body))

    def _give_up(self, f: Forward) -> None:
        self.core.stats.forward_gave_up += 1
        if f.sticky is not None:
            reply = _error(
                503, f"shard {f.shard}: replica {f.sticky.id} stopped answering after the write "
                "was sent; it may or may not have been applied", f.p, outcome="unknown",
            )
        else:
            reply = _error(503, f"shard {f.shard} unreachable: no replica answered in time", f.p)
        self._end(f, reply)


def _error(status: int, message: str, p: Pending, **extra: Any) -> Reply:
    from .requests import error

    return error(status, message, p.req.deps, **extra)
