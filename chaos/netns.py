"""Backend: each node a real ``python -m trio_kv`` process in its own network namespace.

Layout (prefix ``tkv``, default subnet 10.77.0.0/24; only addresses we create)::

    host (root ns) -- bridge tkv-br 10.77.0.1
        |-- veth tkv-v1 <-> eth0 10.77.0.11 in netns tkv-n1 (node 1)
        |-- veth tkv-v2 <-> eth0 10.77.0.12 in netns tkv-n2 (node 2)
        ...

The namespaces have no default route, so nothing a node sends can leave the machine.
Clients (tests, curl) run on the host and reach every node through the bridge; cuts only
apply between nodes, so a client can always talk to both sides of a partition.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chaos.cluster import Node
from chaos.local import ChildNodes
from chaos.netbase import DELAY_QUEUE, IFACE, NetworkBackend
from chaos.util import (
    MARKER_ENV,
    ChaosError,
    kill_marked,
    process_has_marker,
    require_root,
    require_tools,
    route_device,
    run,
    tail,
    wait_dead,
    wait_until,
)

DEFAULT_SUBNET = "10.77.0.0/24"
NODE_PORT = 8081
DELAYER = Path(__file__).with_name("delayer.py")


class NetnsBackend(ChildNodes, NetworkBackend):
    """Processes in namespaces on a bridge; iptables and tc inside each namespace."""

    name = "netns"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def preflight(cls) -> None:
        require_root("netns")
        require_tools("ip", "iptables", "iptables-restore", "tc")

    # ---- names ---------------------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.state.prefix}-br"

    def ns(self, node_id: int) -> str:
        return f"{self.state.prefix}-n{node_id}"

    def marker(self, node: Node, role: str = "n") -> str:
        return f"{self.state.prefix}:{role}{node.id}"

    @property
    def fwd_comment(self) -> str:
        return f"tkv-chaos:{self.state.prefix}"

    # ---- creation ------------------------------------------------------------------------

    def plan(self, n: int, options: Mapping[str, Any]) -> list[tuple[str, int, str]]:
        subnet = ipaddress.ip_network(options.get("subnet") or DEFAULT_SUBNET)
        if subnet.num_addresses < n + 12:
            raise ChaosError(f"subnet {subnet} is too small for {n} nodes")
        hosts = list(subnet.hosts())
        self.state.extra["subnet"] = str(subnet)
        self.state.extra["gateway"] = str(hosts[0])
        return [(str(hosts[9 + i]), NODE_PORT, self.ns(i)) for i in range(1, n + 1)]

    def create(self) -> None:
        subnet = ipaddress.ip_network(self.state.extra["subnet"])
        gateway = self.state.extra["gateway"]
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        # With br_netfilter loaded, bridged frames traverse the host's FORWARD chain; make sure
        # a DROP policy there (Docker sets one) does not silently eat node-to-node traffic.
        run(["iptables", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment",
             "--comment", self.fwd_comment, "-j", "ACCEPT"])
        for node in self.state.nodes:
            self._create_namespace(node, subnet.prefixlen)
        for node in self.state.nodes:
            self.apply_network(node)
            self.start(node)

    def _create_namespace(self, node: Node, prefixlen: int) -> None:
        ns = self.ns(node.id)
        host_end, peer = f"{self.state.prefix}-v{node.id}", f"{self.state.prefix}-p{node.id}"
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        run(["ip", "-n", ns, "link", "set", peer, "name", IFACE])
        run(["ip", "-n", ns, "addr", "add", f"{node.host}/{prefixlen}", "dev", IFACE])
        run(["ip", "-n", ns, "link", "set", IFACE, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "set", host_end, "master", self.bridge, "up"])

    def check_route(self, node: Node) -> None:
        dev = route_device(node.host)
        if dev != self.bridge:
            raise ChaosError(f"refusing to contact {node.host}: it routes via {dev}, not via "
                             f"our bridge {self.bridge}")

    # ---- processes -----------------------------------------------------------------------

    def _env(self, node: Node, role: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.state.env)
        env.update({"NODE_IDENTIFIER": str(node.id), "HOST": "0.0.0.0",
                    "PORT": str(node.port), MARKER_ENV: self.marker(node, role),
                    "PYTHONUNBUFFERED": "1"})
        if "KV_DATA_DIR" in env:  # one data directory per node: "{id}" is its id
            env["KV_DATA_DIR"] = env["KV_DATA_DIR"].replace("{id}", str(node.id))
        return env

    def start(self, node: Node) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = (self.logdir / f"n{node.id}.log").open("ab")
        log.write(f"---- start {time.strftime('%H:%M:%S')} ----\n".encode())
        log.flush()
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(node.id), *self.state.node_cmd],
                                env=self._env(node, "n"), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        log.close()
        self._children[proc.pid] = proc
        node.pid = proc.pid

    def log_tail(self, node: Node) -> str:
        return tail(self.logdir / f"n{node.id}.log")

    # ---- network -------------------------------------------------------------------------

    def netns_ready(self, node: Node) -> bool:
        return Path(f"/run/netns/{self.ns(node.id)}").exists()

    def node_exec(self, node: Node, cmd: list[str], *, input: str | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns(node.id), *cmd], input=input, check=check)

    def start_delayer(self, node: Node, ms: float) -> None:
        logfile = self.logdir / f"delayer{node.id}.log"
        with logfile.open("ab") as log:
            start = log.tell()
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node.id), sys.executable, str(DELAYER),
                 "--queue", str(DELAY_QUEUE), "--ms", f"{ms:g}"],
                env=self._env(node, "d"), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[proc.pid] = proc
        node.delayer_pid = proc.pid

        def bound() -> bool | None:
            if proc.poll() is not None:
                raise ChaosError(f"delayer for node {node.id} exited: {tail(logfile, 10)}")
            return True if b"bound" in logfile.read_bytes()[start:] else None

        wait_until(bound, timeout=10, interval=0.05, what=f"the delayer of node {node.id}")

    def stop_delayer(self, node: Node) -> None:
        marker = self.marker(node, "d")
        if kill_marked(node.delayer_pid, marker, signal.SIGTERM) and node.delayer_pid:
            try:
                wait_dead(node.delayer_pid, marker, timeout=3)
            except ChaosError:
                kill_marked(node.delayer_pid, marker, signal.SIGKILL)
        node.delayer_pid = None
        self._reap()

    def delayer_running(self, node: Node) -> bool:
        return node.delayer_pid is not None and process_has_marker(node.delayer_pid,
                                                                   self.marker(node, "d"))

    # ---- teardown ------------------------------------------------------------------------

    def _our_namespaces(self) -> list[str]:
        out = run(["ip", "netns", "list"], check=False).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.state.prefix}-n")
                and n[len(self.state.prefix) + 2:].isdigit()]

    def destroy(self) -> None:
        """Kill every process in our namespaces, delete them, the bridge and the host rule."""
        for node in self.state.nodes:
            kill_marked(node.pid, self.marker(node), signal.SIGKILL)
            kill_marked(node.delayer_pid, self.marker(node, "d"), signal.SIGKILL)
        for ns in self._our_namespaces():
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:  # everything inside a namespace we created was started by us
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        self._reap()
        links = run(["ip", "-o", "link", "show"], check=False).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"{self.state.prefix}-v") or name == self.bridge:
                run(["ip", "link", "del", name], check=False)
        for _ in range(20):  # remove every copy of our FORWARD rule, and nothing else
            removed = run(["iptables", "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge,
                           "-m", "comment", "--comment", self.fwd_comment, "-j", "ACCEPT"],
                          check=False)
            if removed.returncode != 0:
                break
        for node in self.state.nodes:
            node.pid = None
            node.delayer_pid = None
