"""What the netns and podman backends share: applying cuts and delays inside a node's namespace.

Each backend supplies one primitive, :meth:`NetworkBackend.node_exec` (run a command inside
the node's network namespace, as root), plus how to start and stop the delayer there.
Delays use ``tc qdisc ... netem`` when the kernel has it; kernels built without
``sch_netem`` (this CI's, for one) get the same egress latency from :mod:`chaos.delayer`
through an NFQUEUE rule.  Which one works is probed once and remembered in the state.
"""

from __future__ import annotations

import abc
import subprocess

from chaos.cluster import Backend, Node
from chaos.netrules import DELAY_QUEUE, render
from chaos.util import ChaosError

IFACE = "eth0"


class NetworkBackend(Backend, abc.ABC):
    """A backend whose nodes each own a network namespace with interface ``eth0``."""

    @abc.abstractmethod
    def node_exec(self, node: Node, cmd: list[str], *, input: str | None = None,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as root inside the node's network namespace."""

    @abc.abstractmethod
    def netns_ready(self, node: Node) -> bool:
        """Whether the node's namespace exists now (a stopped container has none)."""

    @abc.abstractmethod
    def start_delayer(self, node: Node, ms: float) -> None:
        """Run :mod:`chaos.delayer` bound to :data:`DELAY_QUEUE` in the node's namespace."""

    @abc.abstractmethod
    def stop_delayer(self, node: Node) -> None:
        """Stop the node's delayer if one runs."""

    @abc.abstractmethod
    def delayer_running(self, node: Node) -> bool:
        """Whether the node's delayer is alive."""

    def delay_mode(self, node: Node) -> str:
        """``netem`` if this kernel has sch_netem, else ``nfqueue``; probed once."""
        mode = self.state.extra.get("delay_mode")
        if mode in ("netem", "nfqueue"):
            return str(mode)
        probe = self.node_exec(node, ["tc", "qdisc", "replace", "dev", IFACE, "root", "netem",
                                      "delay", "1ms"], check=False)
        if probe.returncode == 0:
            self.node_exec(node, ["tc", "qdisc", "del", "dev", IFACE, "root"], check=False)
            mode = "netem"
        else:
            mode = "nfqueue"
        self.state.extra["delay_mode"] = mode
        return mode

    def apply_network(self, node: Node) -> None:
        """Rewrite the node's filter table and set its delay to match the desired state."""
        if not self.netns_ready(node):
            return  # a stopped container: restart() applies everything when it is back
        ms = self.state.delays.get(node.id, 0.0)
        mode = self.delay_mode(node) if (ms or node.delayer_pid
                                         or self.state.extra.get("delay_mode")) else "none"
        rules = render(self.state, node.id, iface=IFACE, nfqueue_delay=mode == "nfqueue",
                       confine=self.state.extra.get("subnet"))
        self.node_exec(node, ["iptables-restore"], input=rules)
        if mode == "netem":
            if ms:
                self.node_exec(node, ["tc", "qdisc", "replace", "dev", IFACE, "root", "netem",
                                      "delay", f"{ms:g}ms"])
            else:
                self.node_exec(node, ["tc", "qdisc", "del", "dev", IFACE, "root"], check=False)
        elif mode == "nfqueue":
            current = self.state.extra.setdefault("delayer_ms", {}).get(str(node.id))
            if ms and (current != ms or not self.delayer_running(node)):
                self.stop_delayer(node)
                self.start_delayer(node, ms)
                self.state.extra["delayer_ms"][str(node.id)] = ms
            elif not ms:
                self.stop_delayer(node)
                self.state.extra["delayer_ms"].pop(str(node.id), None)

    def rules_of(self, node: Node) -> str:
        """The node's current filter table, for debugging (``iptables-save``)."""
        out = self.node_exec(node, ["iptables-save", "-t", "filter"], check=False)
        if out.returncode != 0:
            raise ChaosError(out.stderr.strip())
        return out.stdout


__all__ = ["DELAY_QUEUE", "IFACE", "NetworkBackend"]
