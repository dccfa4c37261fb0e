"""The chaos tool's local backend: real node processes on 127.0.0.1, no root needed.

This is what ``devenv.py`` runs by default, so it is tested everywhere, root or not.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chaos.client import KVClient
from chaos.cluster import Cluster, State
from chaos.local import port_free
from chaos.util import Unsupported, kill_marked, process_has_marker

REPO = Path(__file__).resolve().parents[2]


def free_base_port(n: int) -> int:
    """A run of n free loopback ports (random, so parallel runs rarely collide)."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range found")


def test_local_cluster_serves_survives_kill_and_cleans_up(tmp_path: Path) -> None:
    cluster = Cluster.up(3, 1, backend="local", prefix="tkvl", state_dir=tmp_path,
                         base_port=free_base_port(3), env={"KV_LOG_LEVEL": "warning"})
    try:
        urls = [n.url for n in cluster.nodes]
        assert all(n.host == "127.0.0.1" for n in cluster.nodes)
        with KVClient("c") as client:
            assert client.put(urls[0], "hello", "world").status == 200
            assert client.get(urls[2], "hello").value == "world"
            cluster.kill(2)
            assert not cluster.backend.alive(cluster.node(2))
            cluster.restart(2)
            assert client.get(urls[1], "hello").value == "world"
        with pytest.raises(Unsupported, match="needs a network"):
            cluster.partition([1], [2, 3])
        with pytest.raises(Unsupported):
            cluster.delay(1, 100)
        # a second process sees the same cluster through the state file
        status = subprocess.run([sys.executable, "-m", "chaos", "--prefix", "tkvl",
                                 "--state-dir", str(tmp_path), "status"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert status.stdout.count(" up") == 3
        refused = subprocess.run([sys.executable, "-m", "chaos", "--prefix", "tkvl",
                                  "--state-dir", str(tmp_path), "partition", "1", "/", "2"],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "--backend netns" in refused.stderr
        # restart from another process: our down() must kill the new process, not the old
        restarted = subprocess.run([sys.executable, "-m", "chaos", "--prefix", "tkvl",
                                    "--state-dir", str(tmp_path), "restart", "3"], cwd=REPO,
                                   capture_output=True, text=True, timeout=120)
        assert restarted.returncode == 0, restarted.stderr
    finally:
        state = State.from_json((tmp_path / "tkvl" / "state.json").read_text())
        pids = [n.pid for n in state.nodes]
        cluster.down()
    assert not any(pid and process_has_marker(pid, f"tkvl:n{i}")
                   for i, pid in enumerate(pids, 1))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{urls[0]}/ping", timeout=1)
    assert not (tmp_path / "tkvl" / "state.json").exists()


def test_up_again_removes_leftovers(tmp_path: Path) -> None:
    """A second ``up`` of the same prefix first kills what the first one left running."""
    base = free_base_port(2)
    first = Cluster.up(2, 1, backend="local", prefix="tkvl", state_dir=tmp_path,
                       base_port=base, env={"KV_LOG_LEVEL": "warning"})
    old = [(n.id, n.pid) for n in first.nodes]
    second = Cluster.up(2, 1, backend="local", prefix="tkvl", state_dir=tmp_path,
                        base_port=base, env={"KV_LOG_LEVEL": "warning"})
    try:
        assert not any(pid and process_has_marker(pid, f"tkvl:n{i}") for i, pid in old)
        assert all(second.backend.alive(n) for n in second.nodes)
    finally:
        second.down()


def read_until(proc: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """What ``proc`` printed up to ``marker`` (raw reads: select sees no line a buffer
    holds); fails after 60 s or if it exits first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = b""
    while marker not in seen:
        left = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([proc.stdout], [], [], left)
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        assert chunk, seen.decode()
        seen += chunk
    return seen


def test_devenv_tears_its_cluster_down_when_signalled_twice() -> None:
    """SIGTERM to a wrapper and to devenv (``timeout``, a supervisor) arrives twice: the
    second one used to abort the teardown and leave the nodes running."""
    prefix = f"d{os.getpid() % 100_000}"  # at most 6 characters
    proc = subprocess.Popen(
        [sys.executable, "devenv.py", "--no-install", "--memory", "-n", "2",
         "--base-port", str(free_base_port(2)), "--prefix", prefix],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    state = None
    try:
        seen = read_until(proc, b"Ctrl-C stops")
        state = State.from_json((REPO / ".chaos" / prefix / "state.json").read_text())
        proc.send_signal(signal.SIGTERM)
        seen += read_until(proc, b"stopping the cluster")
        proc.send_signal(signal.SIGTERM)  # while it tears down
        out, _ = proc.communicate(timeout=60)
        assert b"everything removed" in out, seen + out
        left = [n.id for n in state.nodes
                if n.pid and process_has_marker(n.pid, f"{prefix}:n{n.id}")]
        assert not left, f"nodes {left} still run"
    finally:
        if proc.poll() is None:
            proc.kill()
        for n in state.nodes if state else ():  # a failed run leaves nothing behind
            kill_marked(n.pid, f"{prefix}:n{n.id}")
