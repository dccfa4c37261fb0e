"""Start, watch and stop the server processes a benchmark runs against.

Every process is a real OS process on 127.0.0.1 (nodes: `python -m trio_kv`, ceiling:
`bench/ceiling_app.py`). As root each node gets its own group id, so netctl.py can cut
node-to-node traffic by owner (a partition) while everything stays on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from httpc import HTTPError, request

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GID_BASE = 61000  # node N runs with gid GID_BASE + N when root (see netctl.partition)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_live: list[subprocess.Popen[bytes]] = []

# CPU pinning (``run.py --pin``, on by default with >= 2 cores): every node on NODE_CPUS,
# the harness and wrk on HARNESS_CPUS, so a row's figures are CPU per request of the nodes.
NODE_CPUS: set[int] | None = None
HARNESS_CPUS: set[int] | None = None


def pin(enabled: bool) -> str:
    """Pin nodes to core 0 and this process (hence wrk, its child) to core 1; says what it did."""
    global NODE_CPUS, HARNESS_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        NODE_CPUS = HARNESS_CPUS = None
        return "not pinned" + ("" if enabled else " (--no-pin)")
    NODE_CPUS, HARNESS_CPUS = {cpus[0]}, {cpus[1]}
    os.sched_setaffinity(0, HARNESS_CPUS)
    return f"nodes pinned to cpu {cpus[0]}, harness and wrk to cpu {cpus[1]}"


def _pin_child(pid: int) -> None:
    """Pin a just-started server to the nodes' core (it inherits the harness's core, wrk's, until
    then). The ceiling and the fixed-reply server too: left on wrk's core, the ceiling ran
    ~15% faster than a pinned node would, and every ratio to it read low."""
    if NODE_CPUS is not None:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, NODE_CPUS)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound and released; tiny race, fine locally)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Proc:
    """One server process: its id, address, log file and handle."""

    name: str
    node_id: int
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    gid: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kb(self) -> int:
        """VmRSS from /proc/PID/status, in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        """User+system CPU seconds so far, from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK_TCK

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _spawn(
    name: str, argv: list[str], env: dict[str, str], log: Path, gid: int | None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        extra: dict[str, Any] = {}
        if gid is not None:
            extra = {"group": gid, "extra_groups": []}
        p: subprocess.Popen[bytes] = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
            **extra,
        )
    finally:
        fh.close()
    _live.append(p)
    return p


def start_node(
    node_id: int,
    port: int,
    node_cmd: str,
    python: str,
    logdir: Path,
    env_extra: dict[str, str] | None = None,
) -> Proc:
    """Start one node as `NODE_CMD --id N --host 127.0.0.1 --port P` (env too, as API.md)."""
    argv = [python if a == "{python}" else a for a in shlex.split(node_cmd)]
    argv += ["--id", str(node_id), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ)
    env.update(
        {
            "NODE_IDENTIFIER": str(node_id),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(env_extra or {})
    gid = GID_BASE + node_id if os.geteuid() == 0 else None
    log = logdir / f"node{node_id}-{port}.log"
    popen = _spawn(f"n{node_id}", argv, env, log, gid)
    _pin_child(popen.pid)
    return Proc(f"n{node_id}", node_id, port, popen, log, gid)


def start_ceiling(port: int, python: str, logdir: Path) -> Proc:
    """Start the bare-stack ceiling app (hypercorn trio worker + starlette, no access log)."""
    argv = [python, str(BENCH_DIR / "ceiling_app.py"), "--port", str(port)]
    log = logdir / f"ceiling-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = _spawn("ceiling", argv, env, log, None)
    _pin_child(popen.pid)
    return Proc("ceiling", 0, port, popen, log)


def start_fixed(port: int, python: str, logdir: Path) -> Proc:
    """Start the fixed-reply server that shows wrk's own capacity (fixed_reply.py)."""
    argv = [python, str(BENCH_DIR / "fixed_reply.py"), "--port", str(port)]
    log = logdir / f"fixed-{port}.log"
    popen = _spawn("fixed", argv, dict(os.environ), log, None)
    _pin_child(popen.pid)
    return Proc("fixed", 0, port, popen, log)


async def wait_ready(procs: list[Proc], timeout: float = 20.0) -> None:
    """Wait until every process answers GET /ping 200; raise with its log tail if one dies."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for p in list(pending):
            if not p.alive():
                raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.log_tail()}")
            try:
                r = await request(p.addr, "GET", "/ping", timeout=2.0)
                if r.status == 200:
                    pending.remove(p)
            except HTTPError:
                pass
        if pending:
            if time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise RuntimeError(f"not ready after {timeout}s: {names}\n{pending[0].log_tail()}")
            await asyncio.sleep(0.1)


def stop(procs: list[Proc], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; only our own children, by pid."""
    for p in procs:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.popen.wait(5)
        if p.popen in _live:
            _live.remove(p.popen)


def stop_all_live(keep: list[subprocess.Popen[bytes]] | None = None) -> None:
    """Last-resort cleanup (after each scenario, atexit): kill what this harness started."""
    for p in list(_live):
        if keep and p in keep:
            continue
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        _live.remove(p)
