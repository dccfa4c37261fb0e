"""Backend: plain processes on 127.0.0.1 with distinct ports; no root, no network faults.

For development (``devenv.py`` uses it by default) and for machines without root.  Node i
listens on ``127.0.0.1:<base port + i - 1>`` (8081, 8082, ... by default).  ``kill`` and
``restart`` work; verbs that need a network of the cluster's own (partition, isolate, heal,
delay) refuse with a message that names the backends that have one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from chaos.cluster import Backend, Node
from chaos.util import (
    MARKER_ENV,
    ChaosError,
    kill_marked,
    process_has_marker,
    tail,
    wait_dead,
)

DEFAULT_BASE_PORT = 8081


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (so our node can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class ChildNodes:
    """Nodes run as our own child processes (local and netns backends): kill, liveness, reaping.

    A node started by an earlier CLI invocation is not our child: it is found by its marker.
    """

    _children: dict[int, subprocess.Popen[bytes]]

    def marker(self, node: Node) -> str:
        raise NotImplementedError

    def kill(self, node: Node) -> None:
        child = self._children.get(node.pid) if node.pid is not None else None
        if child is not None:  # our own child: signal it by its Popen, then reap it
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=10)
        else:
            marker = self.marker(node)
            if kill_marked(node.pid, marker, signal.SIGKILL) and node.pid is not None:
                wait_dead(node.pid, marker)
        self._reap()

    def alive(self, node: Node) -> bool:
        """Our own child: ask it (reading /proc races with its exec); else check the marker."""
        if node.pid is None:
            return False
        child = self._children.get(node.pid)
        if child is not None:
            return child.poll() is None
        return process_has_marker(node.pid, self.marker(node))

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]


class LocalBackend(ChildNodes, Backend):
    """Local processes, one port each."""

    name = "local"
    has_network = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def preflight(cls) -> None:
        """Nothing to check: any user can start processes on loopback."""

    def marker(self, node: Node) -> str:
        return f"{self.state.prefix}:n{node.id}"

    def plan(self, n: int, options: Mapping[str, Any]) -> list[tuple[str, int, str]]:
        base = int(options.get("base_port") or DEFAULT_BASE_PORT)
        ports = [base + i for i in range(n)]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise ChaosError(f"port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1; "
                             "pick another --base-port")
        return [("127.0.0.1", port, f"{self.state.prefix}-n{i}")
                for i, port in enumerate(ports, 1)]

    def create(self) -> None:
        for node in self.state.nodes:
            self.start(node)

    def start(self, node: Node) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.state.env)
        env.update({"NODE_IDENTIFIER": str(node.id), "HOST": node.host, "PORT": str(node.port),
                    MARKER_ENV: self.marker(node), "PYTHONUNBUFFERED": "1"})
        if "KV_DATA_DIR" in env:  # one data directory per node: "{id}" is its id
            env["KV_DATA_DIR"] = env["KV_DATA_DIR"].replace("{id}", str(node.id))
        with (self.logdir / f"n{node.id}.log").open("ab") as log:
            log.write(f"---- start {time.strftime('%H:%M:%S')} ----\n".encode())
            log.flush()
            proc = subprocess.Popen(self.state.node_cmd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.workdir)
        self._children[proc.pid] = proc
        node.pid = proc.pid

    def apply_network(self, node: Node) -> None:
        raise self.no_network("partition")

    def destroy(self) -> None:
        """SIGKILL every node recorded in the state (checked by marker, so never a stranger)."""
        for node in self.state.nodes:
            self.kill(node)
            node.pid = None

    def log_tail(self, node: Node) -> str:
        return tail(self.logdir / f"n{node.id}.log")
