#!/usr/bin/env python3
"""trio-kv benchmark suite: one command, one table, one JSON file (see bench/README.md).

    .venv/bin/python bench/run.py            # full suite, a few minutes
    .venv/bin/python bench/run.py --quick    # smaller sizes, shorter runs, ~90 s
    .venv/bin/python bench/run.py --profile  # also py-spy the node under GET and PUT load

Starts every cluster as local processes on 127.0.0.1, drives them with wrk, measures the
bare-stack ceiling in the same run and reports the node's figures as ratios to it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import durability
import netctl
import procs
import scenarios as sc
import wrk
from cluster import Settings
from report import md_table, text_table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ALL = ["ceiling", "single", "1x3", "3x2", "idle", "convergence", "reshard", "firstview",
       "durability"]


def default_python() -> str:
    """The venv's interpreter if there is one (it has hypercorn and the node), else ours."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def machine(python: str) -> dict[str, object]:
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    mem = 0
    with contextlib.suppress(OSError, StopIteration):
        mem = int(
            next(
                ln.split()[1]
                for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")
            )
        )

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip()

    # versions as the servers see them (the harness may run under another interpreter)
    probe = (
        "import json, importlib.metadata as m\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return '-'\n"
        "print(json.dumps({p: v(p) for p in "
        "['trio', 'hypercorn', 'starlette', 'httpx', 'orjson', 'trio-kv']}))"
    )
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
    versions = json.loads(r.stdout) if r.returncode == 0 else {}
    wrk_v = subprocess.run([wrk.wrk_path(), "-v"], capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty_node": bool(git("status", "--porcelain", "--", "trio_kv")),
        # identifies uncommitted node code measured (hash of the diff plus untracked files)
        "node_diff": hashlib.sha1(
            (
                git("diff", "HEAD", "--", "trio_kv") + git("status", "--porcelain", "--", "trio_kv")
            ).encode()
        ).hexdigest()[:10],
        "versions": versions,
        "wrk": wrk_v.splitlines()[0] if wrk_v else "?",
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 s runs (~90 s)")
    ap.add_argument("--only", default="", help=f"comma list of: {','.join(ALL)}")
    ap.add_argument("--duration", type=float, default=0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=8, help="wrk connections per run")
    ap.add_argument("--profile", action="store_true", help="py-spy the single node (GET, PUT)")
    ap.add_argument(
        "--node-cmd",
        default="{python} -m trio_kv",
        help="node command; --id/--host/--port are appended",
    )
    ap.add_argument("--python", default=default_python(), help="interpreter for servers")
    ap.add_argument(
        "--idle-window",
        type=float,
        default=0,
        help="seconds per idle anti-entropy window (default 5 quick, 10 full)",
    )
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="nodes on one core, harness and wrk on another (default: on with >= 2 cores)",
    )
    ap.add_argument("--reshard-replicas", type=int, default=2, help="replicas per shard")
    ap.add_argument("--out", default=str(BENCH / "out"))
    ap.add_argument(
        "--record", action="store_true", help="append to bench/RESULTS.md (full runs always do)"
    )
    ap.add_argument("--no-record", action="store_true", help="never append to RESULTS.md")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for the nodes (repeatable)",
    )
    return ap.parse_args()


async def main(a: argparse.Namespace) -> int:
    out = Path(a.out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    env = dict(kv.split("=", 1) for kv in a.env)
    settings = Settings(a.node_cmd, a.python, run_dir / "logs", env)
    ctx = sc.Ctx(
        settings=settings,
        out=run_dir,
        quick=a.quick,
        duration=a.duration or (2.0 if a.quick else 4.0),
        conns=a.connections,
        log=log,
        profile=a.profile,
        retries=2 if a.quick else 6,
    )
    info = machine(a.python)
    log(procs.pin(a.pin))
    log(
        f"machine: {info['cpus']} x {info['cpu']}, {info['mem_gib']} GiB, python "
        f"{info['python']}, commit {info['commit']}; node: {a.node_cmd}"
    )
    wanted = [s for s in (a.only.split(",") if a.only else ALL) if s]
    unknown = set(wanted) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    steps: dict[str, sc.Scenario] = {
        "ceiling": sc.ceiling,
        "single": sc.single_node,
        "1x3": lambda c: sc.topology(c, 1, 3),
        "3x2": lambda c: sc.topology(c, 3, 2),
        "idle": sc.idle_and_memory,
        "convergence": sc.convergence,
        "reshard": lambda c: sc.resharding(c, a.reshard_replicas),
        "firstview": sc.first_view,
        "durability": durability.durability,
    }
    if any(s != "ceiling" for s in wanted) and "ceiling" not in wanted:
        wanted.insert(0, "ceiling")  # every run measures the ceiling (ratios need it)
    ctx.paired = "single" in wanted
    ctx.quiet_wait = 3.0 if a.quick else 10.0
    ctx.idle_window = a.idle_window
    waited = await wrk.wait_quiet([], 3.0 if a.quick else 20.0)
    log(f"waited {waited:.1f} s for other processes to go quiet")
    timings = {}
    for name in wanted:
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            await steps[name](ctx)
        except Exception as exc:  # one scenario failing must not hide the others
            ctx.row(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:300]}", ok=False)
            ctx.data.setdefault("failures", {})[name] = repr(exc)
        finally:
            keep = [ctx.ceiling_proc.popen] if ctx.ceiling_proc else []
            procs.stop_all_live(keep=keep)
        timings[name] = round(time.monotonic() - t0, 1)
    if ctx.ceiling_proc:
        procs.stop([ctx.ceiling_proc])
    total = time.monotonic() - t_start
    table = text_table(ctx.rows)
    dirty = f" +dirty trio_kv (diff {info['node_diff']})" if info["dirty_node"] else ""
    header = (
        f"trio-kv bench {stamp} ({'quick' if a.quick else 'full'}, {total:.0f} s) on "
        f"{info['cpus']} x {info['cpu']}, python {info['python']}, commit "
        f"{info['commit']}{dirty}; node: "
        f"{a.node_cmd}; wrk -t1 -c{a.connections}, {ctx.duration:g} s per run"
    )
    judged = [r for r in ctx.rows if r.ok is not None and r.target]
    missed = [f"{r.section.split(' ', 1)[-1]}: {r.case}" for r in judged if r.ok is False]
    failed = [r.section for r in ctx.rows if r.case == "FAILED"]
    summary = (
        f"targets met {len(judged) - len(missed)} of {len(judged)}"
        + (f"; missed: {'; '.join(missed)}" if missed else "")
        + (f"; FAILED scenarios: {', '.join(failed)}" if failed else "")
    )
    print("\n" + header + "\n\n" + table + "\n\n" + summary + "\n")
    result = {
        "stamp": stamp,
        "quick": a.quick,
        "seconds": total,
        "timings": timings,
        "machine": info,
        "node_cmd": a.node_cmd,
        "duration": ctx.duration,
        "connections": a.connections,
        "rows": [r.as_dict() for r in ctx.rows],
        "summary": summary,
        **ctx.data,
    }
    for path in (run_dir / "results.json", out / "latest.json"):
        path.write_text(json.dumps(result, indent=1, default=str))
    md = f"## {stamp}\n\n{header}\n\n{md_table(ctx.rows)}\n\n{summary}\n"
    (out / "latest.md").write_text(md)
    print(f"JSON: {run_dir / 'results.json'}  (also {out / 'latest.json'}); logs: {run_dir}")
    if not a.no_record and (a.record or (not a.quick and not a.only)):
        with open(BENCH / "RESULTS.md", "a") as f:
            f.write("\n" + md)
        readme = BENCH / "README.md"
        text = readme.read_text()
        start, end = "<!-- latest:start -->", "<!-- latest:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            readme.write_text(f"{head}{start}\n{md}{end}{rest.split(end, 1)[1]}")
        print("appended to bench/RESULTS.md, latest table in bench/README.md")
    return 1 if any(r.case == "FAILED" for r in ctx.rows) else 0


def _cleanup() -> None:
    procs.stop_all_live()
    netctl.cleanup()


def _on_signal(signum: int, frame: object) -> None:
    _cleanup()
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    args = parse_args()
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        sys.exit(asyncio.run(main(args)))
    except KeyboardInterrupt:
        _cleanup()
        sys.exit(130)
