"""The simulated network and nodes: calls between cores, with drops, delays (hence reorders),
duplicates, partitions (both ways or one way), nodes down and restarted, clocks skewed."""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .. import snapshot
from ..clock import Version
from ..config import Config
from ..core import Answer, Call, Cancel, Core, Failed, Outcome, Output, Reply, Request, Respond
from ..core.forwarding import BUDGET_HEADER, HOPS_HEADER, RETRY_HEADER, WRITE_ID_HEADER
from ..messages import WireError, dumps, loads
from ..metadata import Deps, MetadataError, parse_metadata
from ..store import Entry

BASE_WALL_MS = 1_700_000_000_000  # the simulated wall clock starts here (plus each skew)
CONNECT_TIMEOUT = 1.0  # a cut link: the caller learns after this that nothing was sent


@dataclass
class Disk:
    """What a node's data directory holds (``persist.py``), captured whenever the node
    carries out decisions: the simulated shell commits before it sends or answers."""

    entries: dict[str, tuple[Version, str | None, Deps]]
    hlc: int
    state: bytes  # snapshot.dump, encoded
    applied: list[tuple[tuple[str, bytes], Reply]]

    @classmethod
    def capture(cls, core: Core) -> Disk:
        replica = core.replica
        return cls(
            {k: (e.version, e.value, dict(e.deps)) for k, e in replica.store.entries.items()},
            replica.clock.last, dumps(snapshot.dump(replica)),
            list(core.requests.applied.items())[-core.config.dedup_entries:],
        )

    def load(self, core: Core) -> None:
        """Into a new incarnation's core, as ``Persister.open`` and ``recover`` do."""
        replica = core.replica
        for key, (version, value, deps) in self.entries.items():
            replica.store.put(key, Entry(version, value, deps))
            replica.clock.observe(version.hlc)
        replica.clock.observe(self.hlc)
        snapshot.restore(replica, loads(self.state), core.config.vnodes)
        for ident, reply in self.applied:
            core.requests.applied[ident] = reply


@dataclass
class SimNode:
    id: int
    address: str
    core: Core
    skew_ms: int = 0
    incarnation: int = 0
    up: bool = True
    wake_at: float | None = None
    rid: int = 0
    owners: dict[int, Callable[[Reply], None]] = field(default_factory=dict)
    disk: Disk | None = None  # a durable node's data directory (None: memory only)
    durable: bool = False


@dataclass
class CallState:
    src: SimNode
    incarnation: int
    cid: int
    done: bool = False


class Trace:
    """Every event, hashed as it happens: the digest of a run."""

    def __init__(self, keep: bool = False) -> None:
        self.hash = hashlib.blake2b(digest_size=16)
        self.lines = 0
        self.kept: list[str] | None = [] if keep else None

    def add(self, now: float, text: str) -> None:
        line = f"{now!r} {text}\n"
        self.hash.update(line.encode())
        self.lines += 1
        if self.kept is not None:
            self.kept.append(line.rstrip())

    def digest(self) -> str:
        return self.hash.hexdigest()


class Network:
    def __init__(self, rng: random.Random, config: Config, trace: Trace) -> None:
        self.rng = rng
        self.config = config
        self.trace = trace
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.nodes: dict[int, SimNode] = {}
        self.by_address: dict[str, SimNode] = {}
        self.blocked: set[tuple[int, int]] = set()  # directed (src, dst) links that drop
        self.drop = 0.0  # chance a message is lost
        self.duplicate = 0.0  # chance a request is delivered twice
        self.slow: dict[int, float] = {}  # node -> extra latency each way
        self.calls: dict[tuple[int, int, int], CallState] = {}

    # ------------------------------------------------------------ time
    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (max(when, self.now), self._seq, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, done: Callable[[], bool], limit: float) -> bool:
        """Process events until ``done()`` or simulated time ``limit``; True if done."""
        while self._events and not done():
            when, _seq, fn = self._events[0]
            if when > limit:
                break
            heapq.heappop(self._events)
            self.now = when
            fn()
        if done():
            return True
        self.now = max(self.now, limit)
        return False

    def latency(self, a: int, b: int) -> float:
        return 0.0002 + self.rng.random() * 0.002 + self.slow.get(a, 0.0) + self.slow.get(b, 0.0)

    # ------------------------------------------------------------ nodes
    def wall(self, node: SimNode) -> int:
        return BASE_WALL_MS + int(self.now * 1000) + node.skew_ms

    def add(self, node: SimNode) -> None:
        self.nodes[node.id] = node
        self.by_address[node.address] = node

    def feed(self, node: SimNode, fn: Callable[..., list[Output]], *args: Any) -> None:
        """One input to a node's core, then carry out what it decided."""
        self.carry_out(node, fn(*args, self.now, self.wall(node)))

    def carry_out(self, node: SimNode, outputs: list[Output]) -> None:
        if node.durable and outputs:
            node.disk = Disk.capture(node.core)  # persist, then send, then answer
        for out in outputs:
            if isinstance(out, Call):
                self._send(node, out)
            elif isinstance(out, Cancel):
                state = self.calls.pop((node.id, node.incarnation, out.cid), None)
                if state is not None:
                    state.done = True
            elif isinstance(out, Respond):
                owner = node.owners.pop(out.rid, None)
                if owner is not None:
                    owner(out.reply)
        wake = node.core.next_wake()
        if wake is not None and (node.wake_at is None or wake < node.wake_at):
            node.wake_at = wake = max(wake, self.now)
            incarnation = node.incarnation
            self.at(wake, lambda: self._tick(node, incarnation, wake))

    def _tick(self, node: SimNode, incarnation: int, at: float) -> None:
        if node.incarnation != incarnation or not node.up or node.wake_at != at:
            return  # superseded by an earlier wake-up, or the node died
        node.wake_at = None
        self.feed(node, node.core.tick)

    def request(self, node: SimNode, req: Request, owner: Callable[[Reply], None]) -> None:
        node.rid += 1
        node.owners[node.rid] = owner
        self.feed(node, node.core.request, node.rid, req)

    # ------------------------------------------------------------ calls
    def _send(self, src: SimNode, call: Call) -> None:
        key = (src.id, src.incarnation, call.cid)
        state = self.calls[key] = CallState(src, src.incarnation, call.cid)
        dst = self.by_address.get(call.address)
        self.trace.add(self.now, f"call {src.id}#{call.cid} {call.method} {call.path} -> "
                       f"{dst.id if dst else call.address}")
        self.after(call.timeout, lambda: self._complete(state, Failed("no answer in time")))
        if dst is None or not dst.up:
            self.after(self.latency(src.id, src.id),
                       lambda: self._complete(state, Failed("refused", not_sent=True)))
            return
        if (src.id, dst.id) in self.blocked:
            self.after(min(CONNECT_TIMEOUT, call.timeout),
                       lambda: self._complete(state, Failed("no route", not_sent=True)))
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.drop:
                continue  # lost on the way: the caller's deadline ends its wait
            self.after(self.latency(src.id, dst.id),
                       lambda i=dst.incarnation: self._deliver(state, dst, i, call))  # type: ignore[misc]

    def _deliver(self, state: CallState, dst: SimNode, incarnation: int, call: Call) -> None:
        if not dst.up or dst.incarnation != incarnation:
            return  # the connection died with the node
        self.trace.add(self.now, f"deliver {state.src.id}#{state.cid} at {dst.id}")
        core, now, wall = dst.core, self.now, self.wall(dst)

        def answer(status: int, body: bytes) -> None:
            self._answer(state, dst, Answer(status, body))

        try:
            if call.path == "/internal/sync":
                payload, outputs = core.on_sync(loads(call.body or b"null"), now, wall)
            elif call.path == "/internal/pull":
                payload, outputs = core.on_pull(loads(call.body or b"null"), now, wall)
            elif call.path == "/internal/handoff":
                payload, outputs = core.on_handoff(loads(call.body or b"null"), now, wall)
            elif call.path == "/internal/stable":
                payload, outputs = core.on_stable(loads(call.body or b"null"), now, wall)
            elif call.path == "/view":
                return answer(200, dumps(core.view_status()))
            else:
                req = _forwarded(dst, call, wall)
                if req is None:
                    return answer(400, dumps({"error": "malformed forwarded request"}))

                def replied(reply: Reply) -> None:
                    if reply is CONNECTION_RESET:  # the node died mid-request: no answer
                        self.after(self.latency(dst.id, state.src.id), lambda: self._complete(
                            state, Failed("connection reset by a node that went down")))
                    else:
                        answer(reply.status, _body(reply))

                return self.request(dst, req, replied)
        except WireError as exc:
            return answer(400, dumps({"error": str(exc)}))
        answer(200, dumps(payload))
        self.carry_out(dst, outputs)

    def _answer(self, state: CallState, dst: SimNode, outcome: Outcome) -> None:
        src = state.src
        if (dst.id, src.id) in self.blocked or self.rng.random() < self.drop:
            return  # the answer is lost: the caller's deadline ends its wait
        self.after(self.latency(dst.id, src.id), lambda: self._complete(state, outcome))

    def _complete(self, state: CallState, outcome: Outcome) -> None:
        if state.done:
            return
        state.done = True
        src = state.src
        self.calls.pop((src.id, state.incarnation, state.cid), None)
        if not src.up or src.incarnation != state.incarnation:
            return
        what = f"{outcome.status}" if isinstance(outcome, Answer) else outcome.reason
        self.trace.add(self.now, f"done {src.id}#{state.cid} {what}")
        self.feed(src, src.core.call_done, state.cid, outcome)


# What a request in flight at a node that dies gets.  A client sees a 5xx (its outcome is
# unknown, as the checker assumes); a node that forwarded it sees a broken connection (a
# Failed that may have been applied, as httpx reports it), never an answer: a 503 would tell
# it the write was not applied there, and it would send the write to another replica.
CONNECTION_RESET = Reply(503, {"error": "connection reset"})


def _body(reply: Reply) -> bytes:
    return reply.raw if reply.raw is not None else dumps(reply.payload)


def _forwarded(dst: SimNode, call: Call, wall: int) -> Request | None:
    """A forwarded data request as the edge (``api.py``) would parse it."""
    if not call.path.startswith("/data/"):
        return None
    headers = dict(call.headers)
    try:
        body = loads(call.body or b"{}")
        deps = parse_metadata(body.get("causal-metadata"), dst.core.token_rules, wall)
    except (ValueError, MetadataError, AttributeError):
        return None
    budget = headers.get(BUDGET_HEADER)
    return Request(
        call.method, unquote(call.path[len("/data/"):]), deps, body.get("value"),
        int(headers.get(HOPS_HEADER, "0")), float(budget) if budget is not None else None,
        headers.get(WRITE_ID_HEADER), headers.get(RETRY_HEADER) == "1",
    )
