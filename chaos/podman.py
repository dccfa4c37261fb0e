"""Backend: each node a container from the Containerfile image on a podman network.

Containers run as the image's unprivileged user; the chaos tool alone adds ``NET_ADMIN`` so
that it can ``podman exec --user root`` iptables, tc and the delayer *inside* each
container.  Addresses are static on a network we create (default 10.78.0.0/24), and every
container also drops anything it would send outside that subnet, so no node traffic can
leave the machine.  A killed container keeps its name and address; ``restart`` starts it
again and, since its network namespace is new, reapplies its rules.

Everything is labelled ``tkv.chaos=<prefix>`` and removed by label on ``down`` and before
the next ``up``.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chaos.cluster import Node
from chaos.image import ensure_images, podman_common_args
from chaos.netbase import DELAY_QUEUE, NetworkBackend
from chaos.util import ChaosError, require_root, require_tools, route_device, run, wait_until

DEFAULT_SUBNET = "10.78.0.0/24"
NODE_PORT = 8081
DELAYER = Path(__file__).with_name("delayer.py")
DELAYER_IN = "/tmp/tkv-delayer.py"
DELAYER_PID = "/tmp/tkv-delayer.pid"
LABEL = "tkv.chaos"


def mac_for(ip: str) -> str:
    """A fixed, locally administered MAC per address.

    Podman gives a container a new random MAC each time it starts; after a restart, peers and
    the host keep the old one in their ARP caches and their packets vanish until the entry
    expires (~30 s here).  A MAC derived from the IP survives restarts.
    """
    octets = ipaddress.ip_address(ip).packed
    return "02:00:" + ":".join(f"{b:02x}" for b in octets)


class PodmanBackend(NetworkBackend):
    """Containers on a podman bridge network; faults applied inside each container."""

    name = "podman"

    @classmethod
    def preflight(cls) -> None:
        require_root("podman")
        require_tools("podman", "ip")

    @property
    def network(self) -> str:
        return f"{self.state.prefix}-net"

    def plan(self, n: int, options: Mapping[str, Any]) -> list[tuple[str, int, str]]:
        subnet = ipaddress.ip_network(options.get("subnet") or DEFAULT_SUBNET)
        if subnet.num_addresses < n + 12:
            raise ChaosError(f"subnet {subnet} is too small for {n} nodes")
        hosts = list(subnet.hosts())
        self.state.extra.update(subnet=str(subnet), gateway=str(hosts[0]),
                                image=options.get("image") or "")
        return [(str(hosts[9 + i]), NODE_PORT, f"{self.state.prefix}-n{i}")
                for i in range(1, n + 1)]

    def create(self) -> None:
        if not self.state.extra.get("image"):
            self.state.extra["image"] = ensure_images()
        run(["podman", "network", "create", "--subnet", self.state.extra["subnet"],
             "--gateway", self.state.extra["gateway"], "--disable-dns",
             "--label", f"{LABEL}={self.state.prefix}", self.network])
        for node in self.state.nodes:
            self.start(node)

    def _exists(self, node: Node) -> bool:
        return run(["podman", "container", "exists", node.name], check=False).returncode == 0

    def start(self, node: Node) -> None:
        if self._exists(node):
            run(["podman", "start", node.name])
        else:
            # The environment (with the cluster secret) goes in a file only we can read, not
            # on a command line every local user can list.
            env_file = self.workdir / f"{node.name}.env"
            env_file.touch(mode=0o600)
            env_file.chmod(0o600)
            env_file.write_text("".join(f"{k}={v}\n" for k, v in self.state.env.items()))
            env = ["--env-file", str(env_file), "-e", f"NODE_IDENTIFIER={node.id}",
                   "-e", f"PORT={node.port}"]
            run(["podman", "run", "-d", "--name", node.name,
                 "--label", f"{LABEL}={self.state.prefix}", "--network", self.network,
                 "--ip", node.host, "--mac-address", mac_for(node.host),
                 "--cap-add", "NET_ADMIN", "--health-interval", "disable",
                 *podman_common_args(), *env, self.state.extra["image"]], timeout=120)
        wait_until(lambda: True if self.alive(node) else None, timeout=30,
                   what=f"container {node.name} to run")
        # The container's namespace is new: rules first (confinement), then traffic.
        self.apply_network(node)

    def kill(self, node: Node) -> None:
        if self.alive(node):
            run(["podman", "kill", "--signal", "KILL", node.name], check=False)
            wait_until(lambda: True if not self.alive(node) else None, timeout=30,
                       what=f"container {node.name} to stop")

    def alive(self, node: Node) -> bool:
        out = run(["podman", "container", "inspect", "-f", "{{.State.Running}}", node.name],
                  check=False)
        return out.returncode == 0 and out.stdout.strip() == "true"

    def netns_ready(self, node: Node) -> bool:
        return self.alive(node)

    def node_exec(self, node: Node, cmd: list[str], *, input: str | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", "exec", "-i", "--user", "root", node.name, *cmd], input=input,
                   check=check)

    def start_delayer(self, node: Node, ms: float) -> None:
        run(["podman", "cp", str(DELAYER), f"{node.name}:{DELAYER_IN}"])
        self.node_exec(node, ["rm", "-f", DELAYER_PID])
        run(["podman", "exec", "-d", "--user", "root", node.name, "python3", DELAYER_IN,
             "--queue", str(DELAY_QUEUE), "--ms", f"{ms:g}", "--pidfile", DELAYER_PID])
        wait_until(lambda: True if self.delayer_running(node) else None, timeout=10,
                   interval=0.1, what=f"the delayer in {node.name}")

    def stop_delayer(self, node: Node) -> None:
        if not self.alive(node):
            return
        self.node_exec(node, ["sh", "-c", f"test -f {DELAYER_PID} && kill $(cat {DELAYER_PID})"],
                       check=False)
        wait_until(lambda: True if not self.delayer_running(node) else None, timeout=10,
                   what=f"the delayer in {node.name} to stop")

    def delayer_running(self, node: Node) -> bool:
        out = self.node_exec(node, ["sh", "-c", f"kill -0 $(cat {DELAYER_PID}) 2>/dev/null"],
                             check=False)
        return out.returncode == 0

    def check_route(self, node: Node) -> None:
        out = run(["podman", "network", "inspect", "-f", "{{.NetworkInterface}}", self.network],
                  check=False)
        bridge = out.stdout.strip()
        dev = route_device(node.host)
        if not bridge or dev != bridge:
            raise ChaosError(f"refusing to contact {node.host}: it routes via {dev}, not via "
                             f"the podman network's bridge {bridge or '(none)'}")

    def log_tail(self, node: Node) -> str:
        out = run(["podman", "logs", "--tail", "30", node.name], check=False)
        return (out.stdout + out.stderr).strip() or "(no log)"

    def destroy(self) -> None:
        """Remove every container and network labelled with our prefix."""
        label = f"label={LABEL}={self.state.prefix}"
        ids = run(["podman", "ps", "-a", "-q", "--filter", label], check=False).stdout.split()
        if ids:
            run(["podman", "rm", "-f", "-v", "-t", "0", *ids], check=False, timeout=120)
        nets = run(["podman", "network", "ls", "-q", "--filter", label], check=False)
        for net in set(nets.stdout.split()) | {self.network}:
            run(["podman", "network", "rm", "-f", net], check=False)
