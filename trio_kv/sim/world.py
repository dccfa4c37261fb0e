"""A simulated run: a cluster of cores, causal clients, a nemesis, a final heal, and checks.

The clients pass on the causal metadata of their last successful answer and write unique
values; every operation is recorded and the history is checked with ``trio_kv.checker``
(POPL'17 bad patterns for last-writer-wins), then every shard must converge."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..checker import FINAL, History, Op, check, check_convergence
from ..config import Config
from ..core import Core, Reply, Request
from ..messages import loads
from ..metadata import parse_metadata
from ..view import View, parse_view
from .network import CONNECTION_RESET, Network, SimNode, Trace

FAULTS = ["partition", "isolate", "oneway", "heal", "drop", "duplicate", "slow"]
MODES: dict[str, list[str]] = {
    "faults": FAULTS,
    "views": ["view", "heal"],
    "faults+views": [*FAULTS, "view"],
    # views sent to one node at a time, not waiting: nodes on different views meanwhile
    "staggered": [*FAULTS, "view", "view-to-one"],
    "restarts": [*FAULTS, "view", "restart"],
    # durable nodes (a simulated data directory) killed at any moment and restarted from it
    "crashes": [*FAULTS, "view", "view-to-one", "crash"],
}
VIEWS = [
    {"A": [1, 2], "B": [3, 4]},
    {"A": [1, 2], "B": [3, 4], "C": [5, 6]},
    {"A": [1, 2, 3], "B": [4, 5]},
    {"A": [2, 6], "B": [3, 4], "C": [1, 5]},
]
NODES = 6
CLIENTS = 4
KEYS = 6


@dataclass
class SimResult:
    seed: int
    mode: str
    ops: int
    anomalies: list[str]
    lost: int
    digest: str
    summary: dict[str, int] = field(default_factory=dict)
    trace: list[str] | None = None

    def line(self) -> str:
        return (f"seed={self.seed} ops={self.ops} anomalies={len(self.anomalies)} "
                f"lost={self.lost} digest={self.digest}")


def sim_config() -> Config:
    return Config(vnodes=32)


class World:
    def __init__(self, seed: int, mode: str, ops: int, keep_trace: bool = False) -> None:
        self.seed, self.mode, self.target = seed, mode, ops
        self.rng = random.Random(seed)
        self.trace = Trace(keep_trace)
        self.config = sim_config()
        self.net = Network(random.Random(self.rng.getrandbits(64)), self.config, self.trace)
        self.history = History(clock=lambda: self.net.now)
        self.issued = 0
        self.answered = 0
        self.view_shards: dict[str, list[int]] = VIEWS[0]
        skewed = mode in ("restarts", "staggered", "crashes")
        for i in range(1, NODES + 1):
            skew = self.rng.randrange(-2000, 2001) if skewed else self.rng.randrange(-50, 51)
            node = SimNode(i, f"10.0.0.{i}:8081", self._core(i, 0), skew)
            node.durable = mode == "crashes"
            self.net.add(node)

    def _core(self, node_id: int, incarnation: int) -> Core:
        config = dataclasses.replace(self.config, node_id=node_id)
        origin = f"{node_id}.{incarnation}{self.rng.getrandbits(32):08x}"
        return Core(config, origin, random.Random(self.rng.getrandbits(64)))

    def view(self, shards: dict[str, list[int]]) -> View:
        body = {"view": {name: [{"address": self.net.nodes[i].address, "id": i} for i in ids]
                         for name, ids in shards.items()}}
        return parse_view(body, self.config.vnodes, self.config.max_view_nodes)

    # ------------------------------------------------------------ operator
    def put_view(self, shards: dict[str, list[int]], to: list[int],
                 then: Callable[[], None] | None = None, until_served: bool = False) -> None:
        """Send a view to nodes ``to``; ``then`` once each answered (``until_served``: once
        each answered 200, sending it again to a node that was down or answered otherwise,
        as an operator making sure of the final view would)."""
        view = self.view(shards)
        self.view_shards = shards
        self.trace.add(self.net.now, f"view {view.view_id} to {to}")
        answered: set[int] = set()

        def send(i: int) -> None:
            node = self.net.nodes[i]
            if not node.up:  # connection refused
                if until_served:
                    self.net.after(0.5, lambda: send(i))
                else:
                    done(Reply(503, {"error": "refused"}), i)
                return
            node.rid += 1
            node.owners[node.rid] = lambda r: done(r, i)
            self.net.feed(node, node.core.put_view, node.rid, view)

        def done(reply: Reply, i: int) -> None:
            if until_served and reply.status != 200:
                self.net.after(0.5, lambda: send(i))
                return
            answered.add(i)
            if len(answered) == len(to) and then is not None:
                then()

        for i in to:
            send(i)

    # ------------------------------------------------------------ clients
    def client(self, name: str, rnd: random.Random) -> None:
        meta: list[Any] = [None]
        count = [0]

        def step() -> None:
            if self.issued >= self.target:
                return
            self.issued += 1
            node = self.net.nodes[rnd.choice(sorted(self.net.nodes))]
            key = f"k{rnd.randrange(KEYS)}"
            kind = rnd.choices(["put", "get", "delete"], weights=[4, 5, 1])[0]
            value = f"{name}.{count[0]}" if kind == "put" else None
            count[0] += 1
            op = self.history.begin(name, kind, key, value, str(node.id), meta[0])  # type: ignore[arg-type]
            self.trace.add(self.net.now, f"op {op.id} {name} {kind} {key} {value} @{node.id}")
            method = {"put": "PUT", "get": "GET", "delete": "DELETE"}[kind]
            req = Request(method, key, parse_metadata(meta[0]), value)
            finished = [False]

            def answered(reply: Reply | None) -> None:
                if finished[0]:
                    return
                finished[0] = True
                self._record(op, reply, meta)
                self.net.after(rnd.uniform(0, 0.2), step)

            if not node.up:
                self.net.after(0.001, lambda: answered(None))
                return
            self.net.after(120.0, lambda: answered(None))  # the client's own timeout
            self.net.request(node, req, lambda r: self.net.after(
                self.net.latency(node.id, node.id), lambda: answered(r)))

        self.net.after(rnd.uniform(0, 0.1), step)

    def _record(self, op: Op, reply: Reply | None, meta: list[Any]) -> None:
        self.answered += 1
        write = op.kind != "get"
        if reply is None:
            self.history.finish(op, status=None, outcome="info" if write else "fail",
                                error="no answer")
        else:
            payload: dict[str, Any] = (
                reply.payload or {} if reply.raw is None else loads(reply.raw)
            )
            if reply.status in (200, 404):
                meta[0] = payload["causal-metadata"]
                self.history.finish(op, status=reply.status, outcome="ok",
                                    value=payload.get("value"), meta_out=meta[0])
            else:
                self.history.finish(op, status=reply.status, outcome="info" if write else "fail",
                                    error=payload.get("error"))
        self.trace.add(self.net.now, f"end {op.id} {op.status} {op.value} {op.meta_out}")

    # ------------------------------------------------------------ nemesis
    def nemesis(self) -> None:
        if self.issued >= self.target:
            return
        net, rnd = self.net, self.rng
        ids = sorted(net.nodes)
        action = rnd.choice(MODES[self.mode])
        self.trace.add(net.now, f"nemesis {action}")

        def again() -> None:
            net.after(rnd.uniform(0.5, 4), self.nemesis)

        if action == "partition":
            rnd.shuffle(ids)
            cut = rnd.randrange(1, len(ids))
            for a in ids[:cut]:
                for b in ids[cut:]:
                    net.blocked |= {(a, b), (b, a)}
        elif action == "isolate":
            lonely = rnd.choice(ids)
            net.blocked |= {(lonely, b) for b in ids if b != lonely}
            net.blocked |= {(b, lonely) for b in ids if b != lonely}
        elif action == "oneway":
            a, b = rnd.sample(ids, 2)
            net.blocked.add((a, b))
        elif action == "heal":
            self.heal()
        elif action == "drop":
            net.drop = rnd.choice([0.0, 0.01, 0.05])
        elif action == "duplicate":
            net.duplicate = rnd.choice([0.0, 0.02, 0.1])
        elif action == "slow":
            net.slow[rnd.choice(ids)] = rnd.uniform(0.01, 0.5)
        elif action == "view-to-one":
            self.put_view(rnd.choice(VIEWS), [rnd.choice(ids)])
        elif action == "view":
            return self.put_view(rnd.choice(VIEWS), ids, again)
        elif action == "restart":
            return self.restart(rnd.choice(ids), again)
        elif action == "crash":
            self.crash(rnd.choice(ids), rnd.uniform(0.05, 3))
        again()

    def heal(self) -> None:
        self.net.blocked.clear()
        self.net.slow.clear()
        self.net.drop = self.net.duplicate = 0.0

    def restart(self, node_id: int, then: Callable[[], None], tries: int = 50) -> None:
        """Crash a node and start a new, empty incarnation, once all it acknowledged is on its
        peers (the store is in memory: a crash before that loses writes, as documented) and
        it owes, fences and hands off nothing; then the operator sends it the view again."""
        node = self.net.nodes[node_id]
        replica = node.core.replica
        drained = (
            replica.view is not None
            and not node.core.changes.changing
            and node.core.changes.progress.state == "idle"  # no handoff unacknowledged
            and not replica.custody.debts and not replica.custody.pulls
            and not replica.custody.fences
            and all(replica.claims.get(p.id, 0) >= replica.store.head for p in replica.peers)
        )
        if not drained:
            if tries > 0:
                self.net.after(0.1, lambda: self.restart(node_id, then, tries - 1))
            else:
                then()
            return
        self.trace.add(self.net.now, f"restart {node_id}")
        self._drop_clients(node)
        node.incarnation += 1
        node.core = self._core(node_id, node.incarnation)
        node.wake_at = None
        self.net.feed(node, node.core.tick)
        self.net.after(0.5, lambda: self.put_view(self.view_shards, [node_id], then))

    def crash(self, node_id: int, down: float) -> None:
        """Kill a durable node at once (its memory is lost, its data directory is not), keep
        it down for ``down`` seconds, then start a new incarnation from its data directory."""
        node = self.net.nodes[node_id]
        self.trace.add(self.net.now, f"crash {node_id} for {down!r}")
        self._drop_clients(node)
        node.up = False
        node.incarnation += 1

        def start() -> None:
            self.trace.add(self.net.now, f"start {node_id}")
            node.core = self._core(node_id, node.incarnation)
            if node.disk is not None:
                node.disk.load(node.core)
            node.up = True
            node.wake_at = None
            self.net.feed(node, node.core.recovered)
            if node.core.replica.view is None and node.core.replica.custody.target is None:
                self.put_view(self.view_shards, [node_id])  # it never had one: the operator

        self.net.after(down, start)

    def _drop_clients(self, node: SimNode) -> None:
        """Requests in flight at a node that dies: their connections reset."""
        for owner in list(node.owners.values()):
            self.net.after(0.001, lambda o=owner: o(CONNECTION_RESET))  # type: ignore[misc]
        node.owners.clear()

    # ------------------------------------------------------------ the run
    def run(self) -> SimResult:
        net = self.net
        self.put_view(VIEWS[0], sorted(net.nodes))
        net.run_until(lambda: False, 1.0)
        for c in range(CLIENTS):
            self.client(f"c{c}", random.Random(self.rng.getrandbits(64)))
        net.after(self.rng.uniform(0.5, 2), self.nemesis)
        net.run_until(lambda: self.issued >= self.target, 1e9)
        net.run_until(lambda: self.answered == self.issued, net.now + 200)
        self.heal()
        final_view = self.rng.choice(VIEWS)
        installed: list[bool] = []
        self.put_view(final_view, sorted(net.nodes), lambda: installed.append(True),
                      until_served=True)
        problems: list[str] = []
        if not net.run_until(lambda: bool(installed), net.now + 120):
            problems.append("the final view was not installed everywhere within 120 s")
        if not net.run_until(self._settled, net.now + 60):
            busy = sorted(i for i, n in net.nodes.items() if not _settled(n))
            problems.append(f"view change still pending 60 s after the final view: {busy}")
        shards = {s: [str(i) for i in ids] for s, ids in final_view.items()}
        items: dict[str, dict[str, str] | None] = {}
        deadline = net.now + 10
        while True:
            items = self._items(final_view)
            if check_convergence(items, shards) == [] or net.now >= deadline:
                break
            net.run_until(lambda: False, net.now + 0.2)
        problems += check_convergence(items, shards)
        final: dict[str, str | None] = {}
        for ids in final_view.values():
            final.update(items.get(str(ids[0])) or {})
        for key in {op.key for op in self.history if op.key}:
            final.setdefault(key, None)
        anomalies = check(self.history, final)
        lost = sum(1 for a in anomalies if FINAL in a.ops)
        for a in anomalies:
            self.trace.add(net.now, f"anomaly {a}")
        return SimResult(
            self.seed, self.mode, len(self.history), problems + [str(a) for a in anomalies],
            lost, self.trace.digest(), self.history.summary(), self.trace.kept,
        )

    def _settled(self) -> bool:
        return all(_settled(n) for n in self.net.nodes.values())

    def _items(self, shards: dict[str, list[int]]) -> dict[str, dict[str, str] | None]:
        out: dict[str, dict[str, str] | None] = {}
        for ids in shards.values():
            for i in ids:
                got: list[Reply] = []
                self.net.request(self.net.nodes[i], Request("GET", None, {}), got.append)
                self.net.run_until(lambda g=got: bool(g), self.net.now + 5)  # type: ignore[misc]
                ok = got and got[0].status == 200 and got[0].payload is not None
                out[str(i)] = dict(got[0].payload["items"]) if ok else None  # type: ignore[index]
        return out


def _settled(node: SimNode) -> bool:
    status = node.core.view_status()
    return bool(status["change"]["state"] == "idle" and not status["fenced_to"])


def simulate(seed: int, ops: int, mode: str = "faults+views", keep_trace: bool = False
             ) -> SimResult:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    return World(seed, mode, ops, keep_trace).run()
