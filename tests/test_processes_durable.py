"""Durability with real ``python -m trio_kv`` processes, each on its own data directory, killed
with SIGKILL: every acknowledged write is there afterwards."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_processes import _free_ports


class Nodes:
    """Node i (from 1) on port ``ports[i - 1]`` with data directory ``root/node<i>``."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.ports = _free_ports(count)
        self.root = Path(tempfile.mkdtemp(prefix="trio-kv-durable-"))
        self.env = env
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def data_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def start(self, i: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "NODE_IDENTIFIER": str(i), "KV_WAIT_DEADLINE": "5",
               "KV_DATA_DIR": str(self.data_dir(i)), **self.env}
        log = open(self.root / f"node{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "trio_kv", "--host", "127.0.0.1", "--port",
             str(self.ports[i - 1])], env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
        return self.procs[i]

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i - 1]}"

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i - 1]}"

    def view(self, shards: dict[str, list[int]]) -> dict[str, Any]:
        return {"view": {s: [{"address": self.address(i), "id": i} for i in ids]
                         for s, ids in shards.items()}}

    def wait_up(self, ids: list[int], deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        for i in ids:
            while True:
                try:
                    if httpx.get(self.url(i) + "/ping", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert self.procs[i].poll() is None, f"node {i} exited: {self.log(i)}"
                assert time.monotonic() < end, f"node {i} did not come up"
                time.sleep(0.05)

    def log(self, i: int) -> str:
        return (self.root / f"node{i}.log").read_text()[-3000:]

    def put_view(self, shards: dict[str, list[int]], to: list[int]) -> None:
        body = self.view(shards)
        with httpx.Client(timeout=60) as c:
            for i in to:
                r = c.put(self.url(i) + "/view", json=body)
                assert r.status_code == 200, r.text

    def status(self, i: int) -> dict[str, Any]:
        return dict(httpx.get(self.url(i) + "/view", timeout=5).json())

    def items(self, i: int) -> dict[str, str]:
        r = httpx.get(self.url(i) + "/data", timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json()["items"])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def nodes_factory() -> Iterator[Callable[..., Nodes]]:
    made: list[Nodes] = []

    def make(count: int, **env: str) -> Nodes:
        n = Nodes(count, env)
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()
        shutil.rmtree(n.root, ignore_errors=True)


def poll(check: Callable[[], bool], within: float, what: str) -> None:
    end = time.monotonic() + within
    while not check():
        assert time.monotonic() < end, f"timed out: {what}"
        time.sleep(0.1)


def converged_shards(nodes: Nodes, shards: dict[str, list[int]], within: float = 40) -> dict:
    """Poll until the replicas of every shard list the same items; return their union."""
    out: dict[str, str] = {}

    def check() -> bool:
        out.clear()
        try:
            for ids in shards.values():
                lists = [nodes.items(i) for i in ids]
                if any(x != lists[0] for x in lists):
                    return False
                out.update(lists[0])
        except (httpx.TransportError, AssertionError):
            return False
        return True

    poll(check, within, "shards converge")
    return dict(out)


class Writers:
    """Client threads writing unique keys through random nodes; keeps what was acknowledged."""

    def __init__(self, nodes: Nodes, ids: list[int], threads: int = 4) -> None:
        self.nodes, self.ids = nodes, ids
        self.acked: dict[str, str] = {}
        self.attempts = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    def _run(self, t: int) -> None:
        rnd = random.Random(t)
        n = 0
        with httpx.Client(timeout=8) as c:
            while not self.stop.is_set():
                key, value = f"c{t}-{n}", f"v{t}.{n}"
                n += 1
                self.attempts += 1
                try:
                    r = c.put(self.nodes.url(rnd.choice(self.ids)) + f"/data/{key}",
                              json={"value": value})
                except httpx.TransportError:
                    continue
                if r.status_code == 200:
                    self.acked[key] = value

    def __enter__(self) -> Writers:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(30)


@pytest.mark.parametrize("durability", ["always", "batch"])
def test_kill_9_of_one_node_and_of_every_node_loses_no_acknowledged_write(
    nodes_factory: Callable[..., Nodes], durability: str
) -> None:
    shards = {"A": [1, 2], "B": [3, 4]}
    nodes = nodes_factory(4, KV_DURABILITY=durability)
    ids = [1, 2, 3, 4]
    for i in ids:
        nodes.start(i)
    nodes.wait_up(ids)
    nodes.put_view(shards, ids)
    rnd = random.Random(durability)
    with Writers(nodes, ids) as writers:
        for _ in range(3):  # one node at a time, at random moments
            time.sleep(rnd.uniform(0.3, 1.2))
            victim = rnd.choice(ids)
            nodes.kill(victim)
            time.sleep(rnd.uniform(0.1, 0.5))
            nodes.start(victim)
            nodes.wait_up([victim])
        time.sleep(rnd.uniform(0.3, 1.2))
        for i in ids:  # the whole cluster at once
            nodes.kill(i)
        for i in ids:
            nodes.start(i)
        nodes.wait_up(ids)
        time.sleep(1.0)
    assert len(writers.acked) > 100, (writers.attempts, len(writers.acked))
    for i in ids:  # nobody was told the view again
        assert nodes.status(i)["view_id"] is not None
    held = converged_shards(nodes, shards)
    lost = {k: v for k, v in writers.acked.items() if held.get(k) != v}
    assert not lost, f"{len(lost)} of {len(writers.acked)} acknowledged writes lost: " \
        f"{sorted(lost)[:10]}"


def test_restart_during_a_view_change_resumes_it_and_loses_nothing(
    nodes_factory: Callable[..., Nodes],
) -> None:
    nodes = nodes_factory(3, KV_VIEW_CHANGE_DEADLINE="30", KV_PEER_TIMEOUT="1")
    for i in (1, 2, 3):
        nodes.start(i)
    nodes.wait_up([1, 2, 3])
    nodes.put_view({"A": [1, 2]}, [1, 2])
    data = {f"k{i}": f"v{i}" for i in range(60)}
    with httpx.Client(timeout=10) as c:
        for k, v in data.items():
            assert c.put(nodes.url(1) + f"/data/{k}", json={"value": v}).status_code == 200
    converged_shards(nodes, {"A": [1, 2]})
    new = {"A": [1], "B": [2, 3]}
    nodes.procs[2].send_signal(signal.SIGSTOP)  # node 3 cannot finish pulling from node 2
    try:
        sender = threading.Thread(target=lambda: _try_put_view(nodes, new, 3))
        sender.start()
        poll(lambda: nodes.status(3)["change"]["state"] == "changing", 10, "change starts")
        time.sleep(1.5)
        nodes.kill(3)  # in the middle of the change
        sender.join(30)
        nodes.start(3)
        nodes.wait_up([3])
        status = nodes.status(3)
        assert status["change"]["state"] == "changing", status  # resumed, no PUT /view
    finally:
        nodes.procs[2].send_signal(signal.SIGCONT)
    nodes.put_view(new, [1, 2, 3])
    held = converged_shards(nodes, new)
    assert held == data


def _try_put_view(nodes: Nodes, shards: dict[str, list[int]], i: int) -> None:
    with contextlib.suppress(httpx.TransportError):  # the node was killed under it
        httpx.put(nodes.url(i) + "/view", json=nodes.view(shards), timeout=60)


def test_wiped_node_is_refilled_and_damaged_file_refused(
    nodes_factory: Callable[..., Nodes],
) -> None:
    nodes = nodes_factory(3)
    for i in (1, 2, 3):
        nodes.start(i)
    nodes.wait_up([1, 2, 3])
    shards = {"A": [1, 2, 3]}
    nodes.put_view(shards, [1, 2, 3])
    with httpx.Client(timeout=10) as c:
        for n in range(50):
            assert c.put(nodes.url(1 + n % 3) + f"/data/k{n}",
                         json={"value": str(n)}).status_code == 200
    assert len(converged_shards(nodes, shards)) == 50
    # damaged: node 2's file is overwritten past its first page, then truncated; a node
    # refuses to start on either, naming the file (stopped cleanly first, so the data is in
    # the main file, not only in the write-ahead log)
    nodes.procs[2].send_signal(signal.SIGTERM)
    assert nodes.procs[2].wait(20) == 0
    path = nodes.data_dir(2) / "kv.sqlite"
    raw = bytearray(path.read_bytes())
    raw[4096:] = b"\xff" * (len(raw) - 4096)
    path.write_bytes(bytes(raw))
    assert nodes.start(2).wait(20) == 3
    assert f"cannot start: {path}: " in nodes.log(2)
    path.write_bytes(bytes(raw[:1000]))
    assert nodes.start(2).wait(20) == 3
    assert nodes.log(2).count(f"cannot start: {path}: ") == 2
    # wiped: node 3 starts empty, is given the view again, and is refilled by its peers
    nodes.kill(3)
    shutil.rmtree(nodes.data_dir(2))
    shutil.rmtree(nodes.data_dir(3))
    for i in (2, 3):
        nodes.start(i)
    nodes.wait_up([2, 3])
    assert nodes.status(3)["view"] is None and nodes.status(3)["keys"] == 0
    nodes.put_view(shards, [2, 3])
    assert len(converged_shards(nodes, shards)) == 50


def test_a_collected_tombstone_is_never_resurrected(nodes_factory: Callable[..., Nodes]) -> None:
    nodes = nodes_factory(3, KV_TOMBSTONE_GRACE="0", KV_TOMBSTONE_INTERVAL="0.2")
    ids = [1, 2, 3]
    for i in ids:
        nodes.start(i)
    nodes.wait_up(ids)
    shards = {"A": ids}
    nodes.put_view(shards, ids)
    with httpx.Client(timeout=10) as c:
        assert c.put(nodes.url(1) + "/data/gone", json={"value": "old"}).status_code == 200
        converged_shards(nodes, shards)
        nodes.procs[3].send_signal(signal.SIGSTOP)  # holds "old", hears nothing
        try:
            assert c.delete(nodes.url(1) + "/data/gone").status_code == 200
            time.sleep(2)
            assert nodes.status(1)["storage"]["tombstones_collected"] == 0, \
                "collected while a replica still held the old value"
        finally:
            nodes.procs[3].send_signal(signal.SIGCONT)
        poll(lambda: all(nodes.status(i)["storage"]["tombstones_collected"] == 1 for i in ids),
             30, "every replica collects the tombstone")
        for i in ids:
            nodes.kill(i)
        for i in ids:
            nodes.start(i)
        nodes.wait_up(ids)
        time.sleep(2)  # replicas exchange their streams again
        for i in ids:
            assert c.get(nodes.url(i) + "/data/gone").status_code == 404
            assert nodes.status(i)["keys"] == 0
        assert converged_shards(nodes, shards) == {}
