"""The scenarios of issue 5, each bounded in requests and time, each adding rows to the table.

Every scenario starts its own processes and stops them in `finally`; a failing scenario adds
a FAILED row and the suite goes on, so one broken feature never hides the other figures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netctl
import procs
import wrk
from cluster import Cluster, Settings, try_get
from httpc import Conn, HTTPError, data_path, put_many
from report import Row, ms, nbytes, pct, rps

MIXES = {"GET": "0", "50/50": "50", "PUT": "100"}
VALUE_100B = "x" * 100


@dataclass
class Ctx:
    """Everything a scenario needs: settings, knobs, and where its figures go."""

    settings: Settings
    out: Path
    quick: bool
    duration: float
    conns: int
    log: Callable[[str], None]
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, wrk.WrkResult] = field(default_factory=dict)
    single: dict[str, wrk.WrkResult] = field(default_factory=dict)
    # 1x3 rows by (keys, mix, meta): 3x2 is judged against them (issue 13: >= 0.8x)
    one_shard: dict[tuple[int, str, bool], wrk.WrkResult] = field(default_factory=dict)
    profile: bool = False
    ceiling_proc: procs.Proc | None = None
    peers: netctl.PeerCounter | None = None  # set while a multi-node topology is driven
    paired: bool = True  # single_node runs too: measure the ceiling right before each node run
    idle_window: float = 0.0  # 0: 5 s quick, 10 s full
    quiet_wait: float = 10.0  # seconds to wait for quiet before a re-run
    retries: int = 6  # re-runs left for the whole suite when other processes disturb a run

    def row(self, *args: Any, **kw: Any) -> None:
        r = Row(*args, **kw)
        self.rows.append(r)
        self.log(f"  {r.section} | {r.case} | {r.result} | {r.ratio} | {r.target} {r.mark}")


def keyset(prefix: str, lo: int, hi: int, value: str = VALUE_100B) -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", value) for i in range(lo, hi)]


async def preload(
    ctx: Ctx, nodes: list[procs.Proc], items: list[tuple[str, str]], concurrency: int = 8
) -> float:
    """PUT items through `nodes` (spread); raises if any PUT failed. Returns seconds."""
    if not items:
        return 0.0
    budget = 60.0 + len(items) / 200.0  # generous, but bounded
    res = await put_many([p.addr for p in nodes], items, concurrency, budget_s=budget)
    ctx.log(
        f"    preload {len(items):,} keys via {len(nodes)} node(s): {res.seconds:.1f}s "
        f"({res.ok / max(res.seconds, 1e-9):,.0f}/s), failed {res.failed}"
    )
    if res.failed:
        raise RuntimeError(f"preload: {res.failed} PUTs failed, e.g. {res.errors[:2]}")
    return float(res.seconds)


def _lat_ok(r: wrk.WrkResult) -> tuple[str, bool]:
    ratio = r.p99_ms / r.p50_ms if r.p50_ms else float("inf")
    return f"p99/p50 {ratio:.1f}", ratio <= 3.0


NOISE = 0.2  # cores busy outside this benchmark during a run: re-run (bounded) above it


def _load_row(
    ctx: Ctx,
    section: str,
    case: str,
    r: wrk.WrkResult,
    base: wrk.WrkResult | None,
    base_name: str,
    target: float | None,
    p99_target: bool = False,
) -> None:
    """One load row. Judged: the throughput ratio where an issue sets one (1x1 vs ceiling,
    1x3 PUT vs 1x1, 3x2 vs 1x3), p99 <= 3x p50 where one does (1x3 under load), errors always."""
    bad = r.errors + r.non2xx
    cpu = " ".join(f"{n}:{c:.0%}" for n, c in r.server_cpu.items() if c >= 0.01)
    res = f"{rps(r.rps)}  p50 {ms(r.p50_ms)} p99 {ms(r.p99_ms)}  wrk {r.wrk_cpu:.0%} {cpu}"
    if r.other_cpu >= 0.05:
        res += f"  other {r.other_cpu:.0%}" + (" NOISY" if r.other_cpu > NOISE else "")
    if r.peer_msgs >= 0 and r.requests:
        n = r.requests
        res += f"  peer {r.peer_msgs / n:.2f} msg/req {r.peer_bytes / n:,.0f} B/req"
        if r.peer_msgs > 0:  # who sends them: relaying replicas show up here
            top = sorted(r.peer_msgs_by_sender.items(), key=lambda kv: -kv[1])[:3]
            res += " (" + " ".join(f"{k}:{v / n:.2f}" for k, v in top if v) + ")"
    if bad:
        res += f"  ERR {bad}"
    lat, lat_ok = _lat_ok(r)
    ratio = f"{r.rps / base.rps:.2f}x {base_name}" if base and base.rps else ""
    if section.startswith("0 "):
        ctx.row(section, case, res, lat, "(reference)", None)
        return
    goals, ok = [], None if not bad else False
    if target is not None and base is not None:
        goals.append(f">= {target:.2f}x")
        ok = r.rps / base.rps >= target and not bad
    if p99_target:
        goals.append("p99 <= 3x p50")
        ok = (ok is not False) and lat_ok and not bad
    ctx.row(section, case, res, f"{ratio}  {lat}".strip(), "; ".join(goals), ok)


async def drive(
    ctx: Ctx,
    target: procs.Proc,
    servers: list[procs.Proc],
    mix: str,
    nkeys: int,
    meta: bool,
    prefix: str = "k",
    duration: float | None = None,
    retry: bool = True,
) -> wrk.WrkResult:
    """One wrk run; re-run (twice at most, from a suite-wide budget) while other processes ate
    more than NOISE cores (engineers share this machine), keeping the least disturbed run."""
    args = {
        "keys": str(nkeys),
        "prefix": prefix,
        "put": MIXES[mix],
        "vsize": "100",
        "meta": "1" if meta else "0",
        "seed": str(random.randrange(1 << 20)),
    }
    dur = duration or ctx.duration

    def peer_counts() -> dict[str, tuple[int, int]] | None:
        try:
            return ctx.peers.read_by_sender() if ctx.peers else None
        except RuntimeError as exc:  # e.g. another bench run's cleanup removed the chain
            ctx.log(f"    peer counters unreadable, left out: {str(exc)[:120]}")
            return None

    async def once() -> wrk.WrkResult:
        before = peer_counts()
        r = await wrk.run(target, dur, ctx.conns, args, servers=servers)
        after = peer_counts() if before is not None else None
        if before is not None and after is not None:
            r.peer_msgs_by_sender = {n: after[n][0] - before[n][0] for n in after}
            r.peer_msgs = sum(r.peer_msgs_by_sender.values())
            r.peer_bytes = sum(after[n][1] - before[n][1] for n in after)
        return r

    best = await once()
    for _ in range(2):
        if not retry or best.other_cpu <= NOISE or ctx.retries <= 0:
            break
        ctx.retries -= 1
        waited = await wrk.wait_quiet(servers, ctx.quiet_wait)
        ctx.log(
            f"    other processes used {best.other_cpu:.0%} of a core: re-running "
            f"(waited {waited:.1f} s for quiet)"
        )
        r = await once()
        if r.other_cpu < best.other_cpu:
            best = r
    return best


# ---------------------------------------------------------------- 0. the bare stack ceiling


async def ceiling(ctx: Ctx) -> None:
    """Same routes as a node, no logic: the most hypercorn-trio-starlette can do here.

    The process stays up (idle) for the whole run, so single_node can re-measure it right
    before each node run and compare the pair measured under the same conditions.
    """
    port = procs.free_ports(1)[0]
    p = procs.start_ceiling(port, ctx.settings.python, ctx.settings.logdir)
    ctx.ceiling_proc = p
    await procs.wait_ready([p])
    await preload(ctx, [p], keyset("k", 0, 1000))
    await wrk.run(p, 1, ctx.conns, {"keys": "1000"}, servers=[p])  # warm-up
    await wrk_capacity(ctx)
    if not ctx.paired:  # else single_node measures it, paired with each node run
        for mix in MIXES:
            r = await drive(ctx, p, [p], mix, 1000, False)
            ctx.ceiling[mix] = r
            _load_row(ctx, "0 ceiling", f"bare stack {mix}", r, None, "", None)
        ctx.data["ceiling"] = {m: r.as_dict() for m, r in ctx.ceiling.items()}


async def wrk_capacity(ctx: Ctx) -> None:
    """wrk, same settings, against a fixed-reply server: how far it is from being the limit."""
    f = procs.start_fixed(procs.free_ports(1)[0], ctx.settings.python, ctx.settings.logdir)
    try:
        await procs.wait_ready([f])
        r = await wrk.run(f, 2, ctx.conns, {"keys": "1000"}, servers=[f])
        ctx.row(
            "0 ceiling",
            "wrk capacity (fixed-reply asyncio server)",
            f"{rps(r.rps)}  p50 {ms(r.p50_ms)}  wrk {r.wrk_cpu:.0%} "
            f"server {r.server_cpu.get('fixed', 0):.0%}",
            f"wrk {r.rps / max(r.wrk_cpu, 1e-9):,.0f} req/s per core",
        )
        ctx.data["wrk_capacity"] = r.as_dict()
    finally:
        procs.stop([f])


# ---------------------------------------------------------------- 1. throughput and latency


async def single_node(ctx: Ctx) -> None:
    """One node, one shard, vs the ceiling measured just before it (GET >= 85%, PUT >= 75%)."""
    c = await Cluster.start(ctx.settings, 1)
    try:
        await c.set_view(c.layout(1, 1))
        await preload(ctx, c.nodes, keyset("k", 0, 1000))
        await wrk.run(c.nodes[0], 1, ctx.conns, {"keys": "1000"}, servers=c.nodes)
        targets = {"GET": 0.85, "PUT": 0.75, "50/50": None}
        rows: dict[str, Any] = {}
        cp = ctx.ceiling_proc
        reps = 1 if ctx.quick else 2
        for mix in MIXES:
            # Alternate ceiling and node runs and keep the best of each: interference from
            # other processes only ever slows a run down, so the best is the least disturbed.
            best_c: wrk.WrkResult | None = None
            best_n: wrk.WrkResult | None = None
            for _ in range(reps):
                if cp is not None and cp.alive():
                    rc = await drive(ctx, cp, [cp], mix, 1000, False)
                    best_c = rc if best_c is None or rc.rps > best_c.rps else best_c
                rn = await drive(ctx, c.nodes[0], c.nodes, mix, 1000, False)
                best_n = rn if best_n is None or rn.rps > best_n.rps else best_n
            assert best_n is not None
            tag = f" (best of {reps})" if reps > 1 else ""
            if best_c is not None:
                ctx.ceiling[mix] = best_c
                _load_row(ctx, "0 ceiling", f"bare stack {mix}{tag}", best_c, None, "", None)
            ctx.single[mix] = best_n
            rows[mix] = best_n.as_dict()
            base = ctx.ceiling.get(mix)
            _load_row(
                ctx, "1 throughput", f"1x1 1k keys {mix}{tag}", best_n, base, "ceiling",
                targets[mix],
            )  # fmt: skip
        ctx.data["ceiling"] = {m: r.as_dict() for m, r in ctx.ceiling.items()}
        ctx.data["single"] = rows
        if ctx.profile:
            await profile_node(ctx, c, "1x1", ("GET", "PUT"), c.nodes)
    finally:
        c.stop()


async def topology(ctx: Ctx, shards: int, replicas: int) -> None:
    """The load matrix on one topology; wrk drives n1, the other nodes replicate/own keys."""
    c = await Cluster.start(ctx.settings, shards * replicas)
    name = f"{shards}x{replicas}"
    results: list[dict[str, Any]] = []
    if netctl.available()[0]:
        ctx.peers = netctl.PeerCounter(c.nodes)
    try:
        await c.set_view(c.layout(shards, replicas))
        target = c.nodes[0]
        have = 0
        key_counts = [1000] if ctx.quick else [1000, 10000]
        for nkeys in key_counts:
            await preload(ctx, c.nodes, keyset("k", have, nkeys))
            have = nkeys
            await asyncio.sleep(0.5)  # let replication of the preload drain
            await wrk.run(target, 1, ctx.conns, {"keys": str(nkeys)}, servers=c.nodes)
            for meta in (False, True):
                for mix in ["GET", "PUT"] if ctx.quick else list(MIXES):
                    r = await drive(ctx, target, c.nodes, mix, nkeys, meta)
                    case = f"{name} {nkeys // 1000}k keys {mix}{' +meta' if meta else ''}"
                    base, bname, tgt = ctx.ceiling.get(mix), "ceiling", None
                    if name == "1x3":
                        ctx.one_shard[(nkeys, mix, meta)] = r
                        if mix == "PUT" and "PUT" in ctx.single:
                            base, bname, tgt = ctx.single["PUT"], "1 node", 0.70
                    elif name == "3x2" and (nkeys, mix, meta) in ctx.one_shard:
                        base, bname, tgt = ctx.one_shard[(nkeys, mix, meta)], "1x3", 0.80
                    _load_row(ctx, "1 throughput", case, r, base, bname, tgt, name == "1x3")
                    results.append(
                        {"topology": name, "keys": nkeys, "meta": meta, "mix": mix, **r.as_dict()}
                    )
                    if mix == "PUT":
                        await asyncio.sleep(0.5)  # drain replication before the next run
        if ctx.profile and shards == 1:
            await profile_node(ctx, c, name, ("PUT",), c.nodes[:2])
        if shards > 1:
            await forwarding(ctx, c)
            if ctx.profile:
                await profile_node(ctx, c, name, ("GET",), c.nodes[:1])
            await metadata_growth(ctx, c)
    finally:
        ctx.data.setdefault("throughput", []).extend(results)
        if ctx.peers:
            ctx.peers.close()
            ctx.peers = None
        c.stop()


# ---------------------------------------------------------------- 2. forwarding


async def forwarding(ctx: Ctx, c: Cluster) -> None:
    """Low load (one connection): GET of keys n1 owns vs keys another shard owns."""
    owners = await c.key_owners()
    mine = next(s for s, ms_ in c.view.items() if c.nodes[0] in ms_)
    local = sorted(k for k, s in owners.items() if s == mine and k.startswith("k"))[:1000]
    remote = sorted(k for k, s in owners.items() if s != mine and k.startswith("k"))[:1000]
    if not local or not remote:
        raise RuntimeError(f"forwarding: {len(local)} local and {len(remote)} remote keys")
    res = {}
    dur = max(2.0, ctx.duration * 0.6)
    for kind, keys in (("owner", local), ("non-owner", remote)):
        kf = wrk.write_keyfile(ctx.out / f"keys-{kind}.txt", keys)
        res[kind] = await wrk.run(c.nodes[0], dur, 1, {"keyfile": kf, "put": "0"}, servers=c.nodes)
    lo, fw = res["owner"], res["non-owner"]
    for kind, r in res.items():
        ctx.row(
            "2 forwarding",
            f"GET at 1 conn, key on {kind}",
            f"p50 {ms(r.p50_ms)} p99 {ms(r.p99_ms)} mean {ms(r.mean_ms)} ({rps(r.rps)})"
            + (f" ERR {r.errors + r.non2xx}" if r.errors + r.non2xx else ""),
        )
    ratio = fw.p50_ms / lo.p50_ms if lo.p50_ms else float("inf")
    ctx.row(
        "2 forwarding",
        "forwarded / local latency (p50)",
        f"{ratio:.2f}x",
        f"mean {fw.mean_ms / lo.mean_ms:.2f}x",
        "<= 1.5x",
        ratio <= 1.5,
    )
    ctx.data["forwarding"] = {k: r.as_dict() for k, r in res.items()}


# ---------------------------------------------------------------- 3. metadata size


async def metadata_growth(ctx: Ctx, c: Cluster) -> None:
    """One session writes distinct keys in sequence (spread over all shards) through n1."""
    checkpoints = [10, 100, 1000] if ctx.quick else [10, 100, 1000, 10000]
    host, port = c.nodes[0].addr.rsplit(":", 1)
    conn = Conn(host, int(port))
    meta: Any = {}
    sizes: dict[int, int] = {}
    t0 = time.monotonic()
    deadline = t0 + (30 if ctx.quick else 90)
    n = 0
    try:
        for n in range(1, checkpoints[-1] + 1):
            body = {"value": f"m{n}", "causal-metadata": meta}
            r = await conn.request("PUT", data_path(f"meta-{n}"), body, timeout=30)
            if r.status != 200:
                raise RuntimeError(f"metadata PUT #{n}: {r.status} {r.body[:200]!r}")
            meta = r.json().get("causal-metadata", {})
            if n in checkpoints:
                sizes[n] = len(json.dumps(meta, separators=(",", ":")))
            if time.monotonic() > deadline:
                break
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.0)
        r = await conn.request(
            "GET", data_path("meta-1"), headers={"X-Causal-Metadata": json.dumps(meta)}, timeout=30
        )
        settled = len(json.dumps(r.json().get("causal-metadata", {}), separators=(",", ":")))
    finally:
        conn.close()
    for k, size in sizes.items():
        last = k == checkpoints[-1]
        ctx.row(
            "3 metadata",
            f"after {k:,} writes by one session",
            nbytes(size),
            "",
            "<= 1 KB" if last else "",
            (size <= 1024) if last else None,
        )
    if n < checkpoints[-1]:
        ctx.row("3 metadata", f"stopped at {n:,} writes (time bound)", "", "", "", False)
    ctx.row(
        "3 metadata",
        "1 s later, on the next read",
        nbytes(settled),
        f"{n / elapsed:,.0f} seq writes/s",
    )
    ctx.data["metadata"] = {
        "sizes": sizes,
        "after_settle": settled,
        "writes": n,
        "seconds": elapsed,
        "sample": json.dumps(meta)[:400],
    }


# ---------------------------------------------------------------- 4 + 7. idle anti-entropy, memory


async def _converged(c: Cluster, prefix: str, n: int, budget: float) -> float:
    """Wait until every node answers 200 for a sample of the n keys; returns seconds waited."""
    if n == 0:
        return 0.0
    sample = {n - 1, 0, *random.sample(range(n), min(n, 30))}
    t0 = time.monotonic()
    pending = [(p, i) for p in c.nodes for i in sample]
    while pending and time.monotonic() - t0 < budget:
        still = []
        for p, i in pending:
            r = await try_get(p.addr, data_path(f"{prefix}{i}"))
            if r is None or r.status != 200:
                still.append((p, i))
        pending = still
        if pending:
            await asyncio.sleep(0.2)
    if pending:
        raise RuntimeError(f"replicas did not converge on {len(pending)} sampled keys")
    return time.monotonic() - t0


async def idle_and_memory(ctx: Ctx) -> None:
    """1x3 cluster; grow to 0/1k/10k/100k keys; idle bytes/s per node and RSS at each step."""
    ok, why = netctl.available()
    counts = [0, 1000, 10000] if ctx.quick else [0, 1000, 10000, 100000]
    # At least one idle heartbeat period of the node (5 s at the time of writing), else a
    # window can fall between two rounds and read 0 B/s.
    window = ctx.idle_window or (5.0 if ctx.quick else 10.0)
    c = await Cluster.start(ctx.settings, 3)
    counter = netctl.ByteCounter(c.nodes) if ok else None
    steps: list[dict[str, Any]] = []
    try:
        await c.set_view(c.layout(1, 3))
        have = 0
        for n in counts:
            await preload(ctx, c.nodes, keyset("ae", have, n), concurrency=12)
            have = n
            waited = await _converged(c, "ae", n, budget=60)
            await asyncio.sleep(1.0)
            rss = {p.name: p.rss_kb() for p in c.nodes}
            step: dict[str, Any] = {"keys": n, "converge_wait_s": waited, "rss_kb": rss}
            if counter:
                b0, t0 = counter.read(), time.monotonic()
                cpu0 = {p.name: p.cpu_s() for p in c.nodes}
                await asyncio.sleep(window)
                b1, dt = counter.read(), time.monotonic() - t0
                cpu = {p.name: (p.cpu_s() - cpu0[p.name]) / dt for p in c.nodes}
                port = {k: (b1["port"][k] - b0["port"][k]) / dt for k in b1["port"]}
                sent = {k: (b1["sent"][k] - b0["sent"][k]) / dt for k in b1["sent"]}
                pkts = {k: (b1["pkts"][k] - b0["pkts"][k]) / dt for k in b1["pkts"]}
                total = sum(port.values())  # every node-to-node byte once
                n_nodes = len(port)
                mx = max(sent.values()) if sent else total / n_nodes
                step.update(
                    {
                        "bytes_per_s_by_port": port,
                        "sent_bytes_per_s": sent,
                        "sent_packets_per_s": pkts,
                        "total_bytes_per_s": total,
                        "max_sent_per_node": mx,
                        "avg_in_out_per_node": 2 * total / n_nodes,
                        "idle_cpu": cpu,
                    }
                )
                ctx.row(
                    "4 idle anti-entropy",
                    f"1x3, {n:,} keys",
                    f"sent {nbytes(total / n_nodes)}/s per node (max {nbytes(mx)}/s, "
                    f"{max(pkts.values(), default=0):.0f} pkt/s); "
                    f"in+out {nbytes(2 * total / n_nodes)}/s",
                    f"idle cpu {max(cpu.values()):.1%}",
                    "<= 2 KiB/s sent",
                    mx <= 2048,
                )
            steps.append(step)
        if not counter:
            ctx.row("4 idle anti-entropy", "skipped", f"no byte counters: {why}", "", "", None)
        _memory_rows(ctx, steps)
    finally:
        ctx.data["idle_and_memory"] = steps
        if counter:
            counter.close()
        c.stop()


def _memory_rows(ctx: Ctx, steps: list[dict[str, Any]]) -> None:
    for s in steps:
        avg = sum(s["rss_kb"].values()) / len(s["rss_kb"])
        ctx.row(
            "7 memory",
            f"RSS with {s['keys']:,} keys (100 B values)",
            f"{avg / 1024:.1f} MiB per node (avg of 3)",
        )
    big = [s for s in steps if s["keys"] >= 10000]
    if len(big) >= 1:
        lo = max((s for s in steps if s["keys"] < big[-1]["keys"]), key=lambda s: s["keys"])
        hi = big[-1]
        dk = (hi["keys"] - lo["keys"]) / 10000
        growth = {n: (hi["rss_kb"][n] - lo["rss_kb"][n]) / dk for n in hi["rss_kb"]}
        avg = sum(growth.values()) / len(growth)
        ctx.row(
            "7 memory",
            f"RSS growth per 10,000 keys ({lo['keys']:,} -> {hi['keys']:,})",
            f"{avg / 1024:.2f} MiB",
            f"{avg * 1024 / 10000:.0f} B/key",
        )
        ctx.data["memory_per_10k_kb"] = growth


# ---------------------------------------------------------------- 5. convergence after heal


async def convergence(ctx: Ctx) -> None:
    """1x3: cut n1 from n2,n3; write D keys to n1; heal; time until n2 and n3 have all D."""
    ok, why = netctl.available()
    if not ok:
        ctx.row("5 convergence", "skipped", f"no partitions: {why}")
        return
    sizes = [100] if ctx.quick else [100, 5000]
    c = await Cluster.start(ctx.settings, 3)
    part = netctl.Partition()
    out: list[dict[str, Any]] = []
    try:
        await c.set_view(c.layout(1, 3))
        a, others = c.nodes[0], c.nodes[1:]
        for d in sizes:
            prefix = f"cv{d}-"
            part.cut([a], others)
            await asyncio.sleep(0.3)
            await preload(ctx, [a], keyset(prefix, 0, d, "y" * 20), concurrency=8)
            await asyncio.sleep(0.5)
            leaked = 0
            for p in others:
                r = await try_get(p.addr, data_path(f"{prefix}{d - 1}"), 2.0)
                leaked += r is not None and r.status == 200
            dropped = part.dropped_packets()
            t0 = time.monotonic()
            part.heal()
            secs, missing = await _wait_all(c, others, prefix, d, budget=30.0)
            ok_ = missing == 0
            target = d == 5000
            res = (
                f"{secs:.2f} s" if ok_ else f"not converged after {secs:.0f} s ({missing} missing)"
            )
            note = f"{dropped} pkts dropped" + (
                f"; {leaked} replicas saw keys early" if leaked else ""
            )
            ctx.row(
                "5 convergence",
                f"heal -> all 3 replicas have {d:,} keys",
                res,
                note,
                "<= 2 s" if target else "",
                (ok_ and secs <= 2.0) if target else None,
            )
            out.append(
                {
                    "keys": d,
                    "seconds": secs,
                    "missing": missing,
                    "dropped": dropped,
                    "leaked": leaked,
                    "heal_at": t0,
                }
            )
            await asyncio.sleep(0.5)
    finally:
        ctx.data["convergence"] = out
        part.close()
        c.stop()


async def _wait_all(
    c: Cluster, nodes: list[procs.Proc], prefix: str, d: int, budget: float
) -> tuple[float, int]:
    """Poll until every node's GET /data holds all d keys; cheap sample probes first."""
    t0 = time.monotonic()
    want = {f"{prefix}{i}" for i in range(d)}
    probe = [f"{prefix}{i}" for i in random.sample(range(d), min(d, 10))] + [f"{prefix}{d - 1}"]
    pending = list(nodes)
    missing = d
    while pending and time.monotonic() - t0 < budget:
        for p in list(pending):
            rs = await asyncio.gather(*(try_get(p.addr, data_path(k), 2.0) for k in probe))
            if not all(r is not None and r.status == 200 for r in rs):
                continue
            try:
                items = await c.items(p, timeout=10)
            except (RuntimeError, HTTPError):
                continue
            missing = len(want - items.keys())
            if missing == 0:
                pending.remove(p)
        if pending:
            await asyncio.sleep(0.02)
    return time.monotonic() - t0, (missing if pending else 0)


# ---------------------------------------------------------------- 6. resharding


async def _shipped(c: Cluster) -> int:
    """Entries every node has sent for view changes so far (pull pages served plus handoff
    copies, from each node's ``GET /view`` ``shipped``; 0 for a node that does not say)."""
    total = 0
    for p in c.nodes:
        r = await try_get(p.addr, "/view")
        body = r.json() if r is not None and r.status == 200 else {}
        shipped = body.get("shipped") if isinstance(body, dict) else None
        if isinstance(shipped, dict):
            total += sum(v for v in shipped.values() if isinstance(v, int))
    return total


async def resharding(ctx: Ctx, replicas: int = 2) -> None:
    """2 -> 4 shards: time until every PUT /view answered, keys moved, lost and shipped.

    Checked right after the last 200, on every replica: API.md says a node answers only once
    it serves the view with what it newly owns, so gaps then are real, not replication lag.
    Shipped: entries the nodes sent during the change (their own counters), against the
    ideal of each moved key sent once to each replica of its new shard.
    """
    sizes = [2000] if ctx.quick else [2000, 20000]
    out: list[dict[str, Any]] = []
    for k in sizes:
        c = await Cluster.start(ctx.settings, 4 * replicas)
        try:
            v1 = c.layout(2, replicas)
            await c.set_view(v1)
            items = [(f"rs{k}-{i}", f"val-{i}") for i in range(k)]
            await preload(ctx, [p for ps in v1.values() for p in ps], items, concurrency=12)
            await asyncio.sleep(0.5 if replicas == 1 else 2.0)
            before = await c.key_owners()
            shipped0 = await _shipped(c)
            v2 = c.layout(4, replicas)
            t0 = time.monotonic()
            answered = await c.set_view(v2, targets=c.nodes, timeout=120)
            secs = time.monotonic() - t0
            shipped = await _shipped(c) - shipped0
            after: dict[str, str] = {}
            values: dict[str, str] = {}
            dup = gaps = 0
            for name, members in v2.items():
                lists = [await c.items(m) for m in members]
                shard_keys = set().union(*(set(x) for x in lists))
                gaps += sum(len(shard_keys - x.keys()) for x in lists)  # replica lacks a key
                for key in shard_keys:
                    if key in after:
                        dup += 1
                    after[key] = name
                    values[key] = next(x[key] for x in lists if key in x)
            expect = dict(items)
            lost = sum(1 for key, val in expect.items() if values.get(key) != val)
            moved = sum(1 for key in expect if key in after and before.get(key) != after[key])
            frac = moved / k
            ideal = moved * replicas
            ratio = shipped / ideal if ideal else 0.0
            target_s = 2.0 if k >= 20000 else 0.5
            ctx.row(
                "6 resharding",
                f"2x{replicas} -> 4x{replicas} shards, {k:,} keys",
                f"{secs:.2f} s, moved {moved:,} ({pct(frac)}), lost {lost}, shipped "
                f"{shipped:,} = {ratio:.2f}x moved x {replicas}"
                + (f", {dup} on two shards" if dup else "")
                + (f", {gaps} replica gaps" if gaps else ""),
                f"missing before {k - len(before)}",
                f"<= {target_s:g} s, lost 0, shipped <= 1.2x",
                lost == 0 and secs <= target_s and ratio <= 1.2,
            )
            out.append(
                {
                    "keys": k,
                    "replicas": replicas,
                    "seconds": secs,
                    "answered": answered,
                    "moved": moved,
                    "moved_fraction": frac,
                    "lost": lost,
                    "shipped": shipped,
                    "shipped_ratio": ratio,
                    "duplicates": dup,
                    "replica_gaps": gaps,
                    "missing_before": k - len(before),
                }
            )
        finally:
            c.stop()
    ctx.data["resharding"] = out


async def first_view(ctx: Ctx, runs: int = 3) -> None:
    """The first view on 3 fresh nodes with an empty store: seconds until every PUT /view
    answered 200 (best and worst of ``runs`` clusters, each started afresh)."""
    times: list[float] = []
    for _ in range(runs):
        c = await Cluster.start(ctx.settings, 3)
        try:
            t0 = time.monotonic()
            await c.set_view(c.layout(1, 3), timeout=30)
            times.append(time.monotonic() - t0)
        finally:
            c.stop()
    worst = max(times)
    ctx.row(
        "6 resharding",
        "first view, 3 fresh nodes, empty store",
        f"{min(times):.3f} - {worst:.3f} s ({runs} runs)",
        "",
        "<= 0.2 s",
        worst <= 0.2,
    )
    ctx.data["first_view"] = {"seconds": times}


# ---------------------------------------------------------------- profiling (--profile)


async def profile_node(
    ctx: Ctx, c: Cluster, label: str, mixes: tuple[str, ...], nodes: list[procs.Proc]
) -> None:
    """py-spy on `nodes` while wrk drives n1 with each mix: collapsed stacks + flame graphs."""
    import profiling

    pdur = max(ctx.duration, 5.0)
    for mix in mixes:
        key = f"{label} {mix}"
        profs = await profiling.record(
            {p.name: p.pid for p in nodes},
            ctx.out / f"profile-{label}-{mix.lower().replace('/', '')}",
            pdur,
            drive(ctx, c.nodes[0], c.nodes, mix, 1000, False, duration=pdur, retry=False),
        )
        ctx.data.setdefault("profile", {})[key] = profs
        for name, prof in profs.items():
            where = f"{key} {name}"
            for fn, share in prof["self"][:5]:
                ctx.row("8 profile", f"{where} self", fn, pct(share))
            for fn, share in prof["trio_kv_inclusive"][:4]:
                ctx.row("8 profile", f"{where} trio_kv incl.", fn, pct(share))
            top = prof["by_package"][:6]
            pk = ", ".join(f"{m.removeprefix('stdlib:')} {pct(v)}" for m, v in top)
            ctx.row("8 profile", f"{where} self by package", pk, f"{prof['samples']} samples")
            lay = ", ".join(f"{m} {pct(v)}" for m, v in prof["layers"] if v >= 0.005)
            ctx.row("8 profile", f"{where} by layer", lay)


Scenario = Callable[[Ctx], Awaitable[None]]
