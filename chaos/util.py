"""Small helpers shared by the backends: running commands, waiting, owning processes safely."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MARKER_ENV = "TKV_CHAOS"
"""Every process we start carries ``TKV_CHAOS=<prefix>:<role>``.  Before signalling a pid read
from a state file we check this marker in ``/proc/<pid>/environ``, so a recycled pid that now
belongs to someone else is never touched."""


class ChaosError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback."""


class Unsupported(ChaosError):
    """The verb needs something this backend does not have (e.g. a network of its own)."""


def run(cmd: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = 60.0, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with a bound on time; on failure raise with its stderr, not a bare code."""
    try:
        proc = subprocess.run(list(cmd), input=input, text=True, timeout=timeout,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None, check=False)
    except FileNotFoundError as exc:
        raise ChaosError(f"command not found: {cmd[0]} (is it installed?)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ChaosError(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout or "").strip()
        raise ChaosError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {err[-2000:]}")
    return proc


def require_tools(*tools: str) -> None:
    """Fail early, naming every missing tool, instead of half-building a cluster."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ChaosError(f"missing tools: {', '.join(missing)} (apt-get install iproute2 "
                         "iptables, or podman for the podman backend)")


def require_root(what: str) -> None:
    """Namespaces, bridges and iptables need root; say so instead of failing obscurely."""
    if os.geteuid() != 0:
        raise ChaosError(f"the {what} backend needs root (network namespaces, iptables); "
                         "use --backend local without root")


def wait_until(probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll ``probe`` until it returns a non-None value; bounded in time, never forever."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise ChaosError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def process_has_marker(pid: int, marker: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and was started by us with ``marker``."""
    for _ in range(300):  # up to 3 s: a loaded machine can take that long to finish an exec
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, IndexError):
            return False
        if env:
            return f"{MARKER_ENV}={marker}".encode() in env.split(b"\0")
        time.sleep(0.01)  # empty while the process is in the middle of an exec: look again
    return False


def kill_marked(pid: int | None, marker: str, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid`` only if it carries our marker; returns whether a signal was sent."""
    if pid is None or not process_has_marker(pid, marker):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, marker: str, timeout: float = 5.0) -> None:
    """Wait (bounded) until a signalled process is gone, reaping it if it is our child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            pass
        if not process_has_marker(pid, marker):
            return
        time.sleep(0.02)
    raise ChaosError(f"process {pid} did not exit within {timeout:.0f}s")


def route_device(address: str) -> str | None:
    """The interface the kernel would use to reach ``address`` (``ip route get``)."""
    out = run(["ip", "-o", "route", "get", address], check=False).stdout
    match = re.search(r"\bdev (\S+)", out)
    return match.group(1) if match else None


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages that explain a dead node."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
