"""Durability figures (issue 11): what persisting costs and how fast a node comes back.

* write throughput at 1 and 32 concurrent clients for --durability none / batch / always
  (one node, one shard, wrk PUT of 100-byte values); target: batch at 32 >= 50% of none;
* recovery: a node holding N keys (100,000 in the full run) is killed with SIGKILL and
  restarted on its data directory: seconds until it answers, and until a read of a key
  written before the kill answers 200 (target < 5 s); disk bytes and RSS per key.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import procs
import wrk
from cluster import Cluster
from httpc import HTTPError, data_path, request
from report import nbytes, rps
from scenarios import VALUE_100B, Ctx, keyset, preload

MODES = ("none", "batch", "always")


def _start(ctx: Ctx, data: Path, mode: str, port: int | None = None) -> procs.Proc:
    env = {**ctx.settings.env, "KV_DATA_DIR": str(data), "KV_DURABILITY": mode}
    return procs.start_node(
        1, port or procs.free_ports(1)[0], ctx.settings.node_cmd, ctx.settings.python,
        ctx.settings.logdir, env,
    )


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def durability(ctx: Ctx) -> None:
    root = Path(tempfile.mkdtemp(prefix="trio-kv-bench-durable-"))
    try:
        await _throughput(ctx, root)
        await _recovery(ctx, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _throughput(ctx: Ctx, root: Path) -> None:
    """All three nodes stay up; runs alternate between them (best of two in a full run), so
    each ratio compares runs taken under the same conditions on a shared machine."""
    nodes = {mode: _start(ctx, root / f"tp-{mode}", mode) for mode in MODES}
    figures: dict[str, dict[int, wrk.WrkResult]] = {mode: {} for mode in MODES}
    try:
        await procs.wait_ready(list(nodes.values()))
        for p in nodes.values():
            c = Cluster(ctx.settings, [p])
            await c.set_view(c.layout(1, 1))
            await wrk.run(p, 1, 8, {"keys": "1000", "put": "100", "vsize": "100"},
                          servers=[p])  # warm-up
        for conns in (1, 32):
            for _ in range(1 if ctx.quick else 2):
                for mode, p in nodes.items():
                    args = {"keys": "1000", "prefix": "k", "put": "100", "vsize": "100",
                            "meta": "0", "seed": str(random.randrange(1 << 20))}
                    r = await wrk.run(p, ctx.duration, conns, args, servers=[p])
                    best = figures[mode].get(conns)
                    if best is None or r.rps > best.rps:
                        figures[mode][conns] = r
    finally:
        procs.stop(list(nodes.values()))
    for conns in (1, 32):
        base = figures["none"][conns].rps
        for mode in MODES:
            r = figures[mode][conns]
            ratio = r.rps / base if base else 0.0
            target = ">= 0.50x of none" if (mode, conns) == ("batch", 32) else ""
            ok = ratio >= 0.5 if target else None
            ctx.row(
                "9 durability", f"1x1 PUT, {conns} client{'s' if conns > 1 else ''}, {mode}",
                f"{rps(r.rps)}  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
                f"errors {r.errors + r.non2xx}",
                f"{ratio:.2f}x of none", target, ok=ok,
            )
    ctx.data["durability_throughput"] = {
        m: {str(c): r.as_dict() for c, r in f.items()} for m, f in figures.items()
    }


async def _recovery(ctx: Ctx, root: Path) -> None:
    n = 20_000 if ctx.quick else 100_000
    data = root / "recovery"
    port = procs.free_ports(1)[0]
    p = _start(ctx, data, "batch", port)
    try:
        await procs.wait_ready([p])
        c = Cluster(ctx.settings, [p])
        await c.set_view(c.layout(1, 1))
        base_rss = p.rss_kb()
        await preload(ctx, [p], keyset("r", 0, n, VALUE_100B), concurrency=32)
        await asyncio.sleep(1.0)
        rss_per_key = (p.rss_kb() - base_rss) * 1024 / n
        p.popen.send_signal(signal.SIGKILL)
        p.popen.wait(10)
        disk_killed = _disk_bytes(data)
        t0 = time.monotonic()
        p = _start(ctx, data, "batch", port)
        await procs.wait_ready([p], timeout=60)
        ready = time.monotonic() - t0
        probe = f"r{n - 1}"
        while True:
            try:
                r = await request(p.addr, "GET", data_path(probe), timeout=5.0)
                if r.status == 200:
                    break
            except HTTPError:
                pass
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"key {probe} not served 60 s after restart")
            await asyncio.sleep(0.02)
        serving = time.monotonic() - t0
        loaded = _loaded_line(p)
        procs.stop([p])  # SIGTERM: the write-ahead log is checkpointed into the main file
        disk = _disk_bytes(data)
    finally:
        procs.stop([p])
    ctx.row("9 durability", f"recovery after kill -9, {n:,} keys of 100 B",
            f"{serving:.2f} s to serve a key ({ready:.2f} s to answer /ping; {loaded})",
            "", "< 5 s", ok=serving < 5.0)
    ctx.row("9 durability", "disk per key (100 B values)",
            f"{disk / n:,.0f} B after a clean stop ({nbytes(disk)}); {disk_killed / n:,.0f} B "
            "with the write-ahead log of a killed node", "", "")
    ctx.row("9 durability", "RSS per key (100 B values, durable node)",
            f"{rss_per_key:,.0f} B", "", "")
    ctx.data["durability_recovery"] = {
        "keys": n, "ready_s": ready, "serving_s": serving, "loaded": loaded,
        "disk_bytes": disk, "disk_bytes_killed": disk_killed, "rss_per_key": rss_per_key,
    }


def _loaded_line(p: procs.Proc) -> str:
    """The node's own account of its load ("N keys loaded in X s")."""
    for line in reversed(p.log_tail(40).splitlines()):
        if "keys loaded in" in line:
            part = line.split("): ", 1)[-1].split(", view", 1)[0]
            return f"node: {part}"
    return "node: load time not logged"
