"""Run wrk (C, from apt) with bench/lua/kv.lua and collect throughput, latency and CPU.

wrk's own CPU comes from wait4()'s rusage, the servers' from /proc/PID/stat deltas over the
same interval, so every row shows whether the load generator or the server was saturated.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from procs import BENCH_DIR, CLK_TCK, Proc

LUA = BENCH_DIR / "lua" / "kv.lua"


@dataclass
class WrkResult:
    """One wrk run: rates in req/s, latencies in ms, CPU as fraction of one core."""

    target: str
    rps: float
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    non2xx: int
    wrk_cpu: float
    server_cpu: dict[str, float] = field(default_factory=dict)
    other_cpu: float = 0.0
    peer_msgs: int = -1  # node-to-node data segments during the run (-1: not counted)
    peer_bytes: int = -1
    peer_msgs_by_sender: dict[str, int] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def busy_cores_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system irq softirq; idle, iowait and steal (other VMs) are not our machine's work
    return float(v[0] + v[1] + v[2] + v[5] + v[6]) / float(CLK_TCK)


async def wait_quiet(servers: list[Proc], max_s: float, threshold: float = 0.2) -> float:
    """Wait (at most max_s) until processes outside ours use < threshold cores over 0.5 s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = sum(p.cpu_s() for p in servers if p.alive())
        b0, s0, w0 = busy_cores_s(), _self_cpu(), time.monotonic()
        await asyncio.sleep(0.5)
        c1 = sum(p.cpu_s() for p in servers if p.alive())
        other = (busy_cores_s() - b0 - (c1 - c0) - (_self_cpu() - s0)) / (time.monotonic() - w0)
        if other < threshold:
            break
    return time.monotonic() - t0


def wrk_path() -> str:
    path = shutil.which("wrk")
    if not path:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    return path


def _run_blocking(argv: list[str], timeout: float) -> tuple[int, str, float]:
    """Run wrk, return (status, stdout, cpu seconds of wrk itself via wait4)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    out_chunks: list[bytes] = []
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        try:
            chunk = p.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            out_chunks.append(chunk)
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            p.returncode = -9
            break
        time.sleep(0.05)
    try:
        rest = p.stdout.read()
    except BlockingIOError:
        rest = None
    if rest:
        out_chunks.append(rest)
    p.stdout.close()
    return p.returncode, b"".join(out_chunks).decode(errors="replace"), ru.ru_utime + ru.ru_stime


async def run(
    target: Proc | str,
    duration: float,
    connections: int,
    lua_args: dict[str, str],
    servers: list[Proc] | None = None,
    threads: int = 1,
    timeout_s: float = 5.0,
) -> WrkResult:
    """Drive `target` with wrk for `duration` seconds; bounded by duration + 15 s."""
    addr = target.addr if isinstance(target, Proc) else target
    argv = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(LUA),
        f"http://{addr}",
        "--",
        *(f"{k}={v}" for k, v in lua_args.items()),
    ]
    servers = servers or []
    cpu0 = {p.name: p.cpu_s() for p in servers if p.alive()}
    self0, busy0 = _self_cpu(), busy_cores_s()
    t0 = time.monotonic()
    code, out, wrk_cpu = await asyncio.to_thread(_run_blocking, argv, duration + 15)
    wall = time.monotonic() - t0
    cpu1 = {p.name: p.cpu_s() for p in servers if p.alive()}
    self1, busy1 = _self_cpu(), busy_cores_s()
    ours = sum(cpu1[n] - cpu0[n] for n in cpu1 if n in cpu0) + wrk_cpu + (self1 - self0)
    other = max(0.0, (busy1 - busy0) - ours) / wall if wall else 0.0
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed ({code}): {out[-800:]}")
    d = json.loads(line[len("WRKJSON ") :])
    secs = d["duration_us"] / 1e6
    errors = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    return WrkResult(
        target=addr,
        rps=d["requests"] / secs if secs else 0.0,
        requests=d["requests"],
        seconds=secs,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000,
        mean_ms=d["lat_mean_us"] / 1000,
        max_ms=d["lat_max_us"] / 1000,
        errors=errors,
        non2xx=d["err_status"],
        wrk_cpu=wrk_cpu / wall if wall else 0.0,
        server_cpu={n: (cpu1[n] - cpu0[n]) / wall for n in cpu1 if n in cpu0},
        other_cpu=other,
        args=dict(lua_args),
    )


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def write_keyfile(path: Path, keys: list[str]) -> str:
    """Write keys one per line for kv.lua's keyfile= argument."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(keys) + "\n")
    return str(path)
