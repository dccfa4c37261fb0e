"""Real node processes (``python -m trio_kv``) on 127.0.0.1, driven over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Procs:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logdir = tempfile.mkdtemp(prefix="trio-kv-procs-")

    def start(self, i: int) -> None:
        env = {**os.environ, "NODE_IDENTIFIER": str(i + 1), "KV_WAIT_DEADLINE": "5"}
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "trio_kv", "--host", "127.0.0.1", "--port", str(self.ports[i])],
            env=env, stdout=subprocess.DEVNULL,
            stderr=open(f"{self.logdir}/node{i + 1}.log", "ab"),  # noqa: SIM115
        )

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    @contextmanager
    def running(self) -> Iterator[Procs]:
        """Every node started and answering; whatever is still running is killed after."""
        for i in range(len(self.ports)):
            self.start(i)
        try:
            self.wait_up()
            yield self
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait(5)

    def wait_up(self, deadline: float = 20.0) -> None:
        end = time.monotonic() + deadline
        for i in self.procs:
            while True:
                try:
                    if httpx.get(self.url(i) + "/ping", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > end:
                    raise TimeoutError(f"node {i + 1} did not come up")
                time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[Procs]:
    with Procs(_free_ports(4)).running() as p:
        yield p


def test_real_processes_serve_the_api_and_stop_cleanly(procs: Procs) -> None:
    view = {"view": {"A": [{"address": f"127.0.0.1:{procs.ports[i]}", "id": i + 1}
                           for i in (0, 1)],
                     "B": [{"address": f"127.0.0.1:{procs.ports[i]}", "id": i + 1}
                           for i in (2, 3)]}}
    with httpx.Client(timeout=20) as c:
        for i in range(4):
            assert c.put(procs.url(i) + "/view", json=view).status_code == 200
        meta: dict = {}
        for n in range(40):  # written through every node: half of them forwarded
            r = c.put(procs.url(n % 4) + f"/data/key{n}",
                      json={"value": f"v{n}", "causal-metadata": meta})
            assert r.status_code == 200, r.text
            meta = r.json()["causal-metadata"]
        for n in range(40):
            r = c.request("GET", procs.url((n + 1) % 4) + f"/data/key{n}",
                          json={"causal-metadata": meta})
            assert r.status_code == 200 and r.json()["value"] == f"v{n}"
        shard_items = [c.get(procs.url(i) + "/data").json()["items"] for i in (0, 2)]
        assert not set(shard_items[0]) & set(shard_items[1])
        deadline = time.monotonic() + 10
        while True:  # replicas converge: both of each shard list the same keys
            lists = [c.get(procs.url(i) + "/data").json()["items"] for i in range(4)]
            if lists[0] == lists[1] and lists[2] == lists[3]:
                break
            assert time.monotonic() < deadline, "replicas did not converge"
            time.sleep(0.05)
        assert len(lists[0]) + len(lists[2]) == 40
        r = c.put(procs.url(0) + "/data/x", content=b"{")
        assert r.status_code == 400 and r.json()["error"]
    for proc in procs.procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.procs.values():
        assert proc.wait(10) == 0
