"""Record client operations and check them for causal anomalies and convergence.

Why a checker: a chaos run that "did not crash" proves little.  Every operation the test
clients make is recorded (client, op, key, value, metadata in/out, start/end, status), and the
history is then checked against the causal-consistency "bad patterns" of Bouajjani, Enea,
Guerraoui and Hamza, *On Verifying Causal Consistency* (POPL 2017).  For a *differentiated*
history (every written value is unique, which our clients guarantee) those checks are
polynomial.

Our store resolves concurrent writes by last-writer-wins on a causal timestamp, so the right
model is *causal convergence* (CCv): there is one total arbitration order, consistent with
causality, and every read returns the arbitration-greatest write among those in its causal
past.  Its bad patterns, all checked here:

* ``CyclicCO``        -- causal order ``CO = (po U wr)+`` has a cycle.
* ``ThinAirRead``     -- a read returns a value no write of that key wrote.
* ``WriteCOInitRead`` -- a read answers "not found" although a write of that key is in its
  causal past (and no delete could have superseded that write).
* ``WriteCORead``     -- a read returns ``w`` although another write ``w'`` of the same key with
  ``w CO w' CO read`` exists (a stale read).
* ``CyclicCF``        -- ``CF U CO`` has a cycle, where ``w' CF w`` when some read returns ``w``
  while ``w'`` (same key) is in its causal past: ``w'`` must be arbitrated before ``w``, and no
  single last-writer-wins order can satisfy all such constraints at once.

``po`` (session order) comes from how our clients pass metadata: each request carries the
metadata of the client's last successful answer.  A write whose outcome is unknown (time-out,
5xx) is kept as a *maybe* write: it is causally after the client's earlier operations, it may
be read (so reading its value is not thin air), but the client's later operations do not
follow it, since the client never got its metadata.

Convergence at the end is checked two ways: all replicas of a shard return identical
``GET /data`` (:func:`check_convergence`), and the converged value of every key is treated as
a read by an observer that has seen every successful operation, so a lost write, or a final
value that lost to a causally later write, is reported like any other anomaly.

Deletes are writes of a tombstone; a "not found" read cannot name which delete (or the initial
state) it saw, so it adds no read-from edge.  The checks stay sound (no false alarms) with
deletes; they just see a little less.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

OpKind = Literal["put", "get", "delete", "get_all"]
Outcome = Literal["ok", "fail", "info"]


@dataclass
class Op:
    """One client operation, from invocation to answer (or failure)."""

    id: int
    client: str
    kind: OpKind
    key: str | None
    value: str | None = None
    """For ``put``: the value written.  For ``get``: the value returned, ``None`` if 404."""
    node: str = ""
    meta_in: Any = None
    meta_out: Any = None
    start: float = 0.0
    end: float = 0.0
    status: int | None = None
    outcome: Outcome = "ok"
    """``ok``: it happened as answered; ``fail``: it surely did not take effect (or, for a read,
    observed nothing); ``info``: a write whose effect is unknown (time-out, 5xx)."""
    items: dict[str, str] | None = None
    error: str | None = None

    @property
    def is_write(self) -> bool:
        """A put or a delete that happened or may have happened."""
        return self.kind in ("put", "delete") and self.outcome in ("ok", "info") and not (
            self.kind == "delete" and self.status == 404
        )

    @property
    def is_read(self) -> bool:
        """An observation of one key: a successful get, or a delete that found nothing."""
        if self.outcome != "ok":
            return False
        return self.kind == "get" or (self.kind == "delete" and self.status == 404)

    def describe(self) -> str:
        """Short human form for anomaly reports."""
        shown = {"put": f"put({self.key}={self.value!r})", "delete": f"delete({self.key})",
                 "get": f"get({self.key})->{self.value!r}", "get_all": "get_all()"}[self.kind]
        if self.kind == "delete" and self.status == 404:
            shown = f"delete({self.key})->404"
        return f"#{self.id} {self.client} {shown} @{self.node} [{self.outcome} {self.status}]"


@dataclass
class Anomaly:
    """A violated causal pattern, naming the operations that show it."""

    kind: str
    ops: tuple[int, ...]
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class History:
    """A thread-safe, append-only log of operations, shared by all clients of one scenario."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self.ops: list[Op] = []
        self.clock = clock  # in-process runs pass trio's, so times match the nodes' logs

    def begin(self, client: str, kind: OpKind, key: str | None, value: str | None,
              node: str, meta_in: Any) -> Op:
        """Register an invocation; the caller fills in the answer with :meth:`finish`."""
        with self._lock:
            op = Op(id=len(self.ops), client=client, kind=kind, key=key, value=value,
                    node=node, meta_in=meta_in, start=self.clock())
            self.ops.append(op)
            return op

    def finish(self, op: Op, *, status: int | None, outcome: Outcome, value: str | None = None,
               meta_out: Any = None, items: dict[str, str] | None = None,
               error: str | None = None) -> Op:
        """Record the answer of an operation begun with :meth:`begin`."""
        op.end = self.clock()
        op.status = status
        op.outcome = outcome
        op.meta_out = meta_out
        op.items = items
        op.error = error
        if op.kind == "get":
            op.value = value
        return op

    def __iter__(self) -> Iterator[Op]:
        with self._lock:
            return iter(list(self.ops))

    def __len__(self) -> int:
        return len(self.ops)

    def dump(self, path: Path) -> None:
        """Write the history as JSON lines, for reading after a failed run."""
        with path.open("w") as out:
            for op in self:
                out.write(json.dumps(asdict(op), default=str) + "\n")

    def summary(self) -> dict[str, int]:
        """Counts by kind and outcome, for test logs."""
        counts: dict[str, int] = defaultdict(int)
        for op in self:
            counts[f"{op.kind}:{op.outcome}"] += 1
        return dict(sorted(counts.items()))


@dataclass
class _Graph:
    ops: dict[int, Op]
    succ: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    pred: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))

    def edge(self, a: int, b: int) -> None:
        if a != b:
            self.succ[a].add(b)
            self.pred[b].add(a)


def _topo_order(nodes: Iterable[int], succ: Mapping[int, set[int]]) -> list[int] | None:
    """Kahn's algorithm; None if the graph has a cycle."""
    nodes = list(nodes)
    indeg = dict.fromkeys(nodes, 0)
    for a in nodes:
        for b in succ.get(a, ()):
            indeg[b] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    order: list[int] = []
    while ready:
        n = ready.pop()
        order.append(n)
        for b in succ.get(n, ()):
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return order if len(order) == len(nodes) else None


def _find_cycle(nodes: Iterable[int], succ: Mapping[int, set[int]]) -> list[int]:
    """Return one cycle (list of node ids) of a graph known to be cyclic."""
    color: dict[int, int] = {}
    for root in nodes:
        if color.get(root):
            continue
        stack: list[tuple[int, Iterator[int]]] = [(root, iter(sorted(succ.get(root, ()))))]
        path = [root]
        color[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
                continue
            if color.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if not color.get(nxt):
                color[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(succ.get(nxt, ())))))
    return []


FINAL = -1
"""Id of the virtual observer that reads the converged state."""


def check(history: Iterable[Op], final: Mapping[str, str | None] | None = None) -> list[Anomaly]:
    """Check a differentiated history for CCv bad patterns; ``[]`` means no anomaly.

    ``final`` is the converged state of the keys to judge (value, or ``None`` for absent), as
    read from the replicas once the network healed and writes stopped.
    """
    ops = [op for op in history if op.is_write or op.is_read]
    by_id = {op.id: op for op in ops}
    anomalies: list[Anomaly] = []
    graph = _Graph(by_id)

    # Session order: each op follows the client's last successful op.
    sessions: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        sessions[op.client].append(op)
    for client_ops in sessions.values():
        client_ops.sort(key=lambda o: (o.start, o.id))
        last_ok: Op | None = None
        for op in client_ops:
            if last_ok is not None:
                graph.edge(last_ok.id, op.id)
            if op.outcome == "ok":
                last_ok = op

    # Read-from: unique values name their writer.
    writer: dict[tuple[str, str], Op] = {}
    writes_on: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.is_write:
            writes_on[op.key or ""].append(op)
            if op.kind == "put":
                assert op.value is not None
                slot = (op.key or "", op.value)
                if slot in writer:
                    raise ValueError(f"history is not differentiated: {op.describe()} rewrites "
                                     f"the value of {writer[slot].describe()}")
                writer[slot] = op
    for op in ops:
        if op.is_read and op.value is not None:
            source = writer.get((op.key or "", op.value))
            if source is None:
                elsewhere = [w.describe() for (k, v), w in writer.items() if v == op.value]
                hint = f" (written to another key: {elsewhere[0]})" if elsewhere else ""
                anomalies.append(Anomaly("ThinAirRead", (op.id,),
                                         f"{op.describe()} returns a value never written{hint}"))
                continue
            graph.edge(source.id, op.id)

    order = _topo_order(by_id, graph.succ)
    if order is None:
        cycle = _find_cycle(sorted(by_id), graph.succ)
        steps = " -> ".join(by_id[i].describe() for i in cycle)
        anomalies.append(Anomaly("CyclicCO", tuple(cycle), f"causal order has a cycle: {steps}"))
        return anomalies

    # past[o]: bitset of every op causally before o.
    past: dict[int, int] = {}
    for node in order:
        bits = 0
        for p in graph.pred.get(node, ()):
            bits |= past[p] | (1 << p)
        past[node] = bits

    reads: list[tuple[int, Op, int]] = [(op.id, op, past[op.id]) for op in ops if op.is_read]
    if final is not None:
        seen_all = 0
        for op in ops:
            if op.outcome == "ok":
                seen_all |= past[op.id] | (1 << op.id)
        for key, value in sorted(final.items()):
            observer = Op(id=FINAL, client="final-state", kind="get", key=key, value=value,
                          node="converged replicas")
            reads.append((FINAL, observer, seen_all))
            if value is not None:
                source = writer.get((key, value))
                if source is None:
                    anomalies.append(Anomaly("ThinAirRead", (FINAL,),
                                             f"final state {key}={value!r} was never written"))

    cf_edges: list[tuple[int, int, int]] = []
    for rid, read, rpast in reads:
        key = read.key or ""
        label = "final state" if rid == FINAL else read.describe()
        if read.value is None:
            deletes = [w for w in writes_on[key] if w.kind == "delete"]
            for w in writes_on[key]:
                if w.kind != "put" or not (rpast >> w.id) & 1:
                    continue
                if all((past[w.id] >> d.id) & 1 for d in deletes):
                    anomalies.append(Anomaly(
                        "WriteCOInitRead", (w.id, rid),
                        f"{label} finds no value although {w.describe()} is in its causal past"
                        + ("" if not deletes else " and every delete of the key precedes it")))
                    break
            continue
        source = writer.get((key, read.value))
        if source is None:
            continue
        for w in writes_on[key]:
            if w is source or not (rpast >> w.id) & 1:
                continue
            if (past[w.id] >> source.id) & 1:
                anomalies.append(Anomaly(
                    "WriteCORead", (source.id, w.id, rid),
                    f"{label} returns {source.describe()} although the later "
                    f"{w.describe()} is in its causal past"))
                break
            cf_edges.append((w.id, source.id, rid))

    if not any(a.kind == "WriteCORead" for a in anomalies):
        succ = defaultdict(set, {k: set(v) for k, v in graph.succ.items()})
        why: dict[tuple[int, int], int] = {}
        for a, b, rid in cf_edges:
            if a != b:
                succ[a].add(b)
                why.setdefault((a, b), rid)
        if _topo_order(by_id, succ) is None:
            cycle = _find_cycle(sorted(by_id), succ)
            parts = []
            for a, b in itertools.pairwise(cycle):
                if (a, b) in why and b not in graph.succ.get(a, set()):
                    via = why[(a, b)]
                    via_s = "final state" if via == FINAL else f"#{via}"
                    parts.append(f"{by_id[a].describe()} =CF(seen by {via_s})=> ")
                else:
                    parts.append(f"{by_id[a].describe()} => ")
            steps = "".join(parts) + by_id[cycle[-1]].describe()
            anomalies.append(Anomaly("CyclicCF", tuple(cycle),
                                     f"no last-writer-wins order explains the reads: {steps}"))
    return anomalies


def check_convergence(replica_items: Mapping[str, Mapping[str, str] | None],
                      shards: Mapping[str, Sequence[str]]) -> list[str]:
    """Differences between replicas of each shard; ``[]`` means every shard converged.

    ``replica_items`` maps a node name to its ``GET /data`` items (None if it did not answer);
    ``shards`` maps a shard name to the node names that replicate it.
    """
    problems: list[str] = []
    for shard, nodes in sorted(shards.items()):
        states = {n: replica_items.get(n) for n in nodes}
        missing = [n for n, s in states.items() if s is None]
        if missing:
            problems.append(f"shard {shard}: no answer from {', '.join(missing)}")
            continue
        reference_node = nodes[0]
        reference = states[reference_node] or {}
        for node in nodes[1:]:
            other = states[node] or {}
            if other == reference:
                continue
            keys = sorted(set(reference) | set(other))
            diff = [f"{k}: {reference.get(k)!r} vs {other.get(k)!r}" for k in keys
                    if reference.get(k) != other.get(k)]
            problems.append(f"shard {shard}: {reference_node} and {node} differ on "
                            f"{len(diff)} key(s): {'; '.join(diff[:5])}")
    return problems


def merged_state(replica_items: Mapping[str, Mapping[str, str] | None]) -> dict[str, str]:
    """The union of every replica's items (each key lives in one shard)."""
    merged: dict[str, str] = {}
    for items in replica_items.values():
        merged.update(items or {})
    return merged
