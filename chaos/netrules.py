"""Render one node's packet-filter rules from the cluster's desired faults.

The whole ``filter`` table of the node's namespace (or container) is rewritten in one
``iptables-restore`` call: it is atomic, takes one process per node, and leaves no stale rule
behind however the faults changed.  We own the node's network namespace entirely, so
replacing its table cannot clobber anyone else's rules.
"""

from __future__ import annotations

from chaos.cluster import State

DELAY_QUEUE = 7
"""NFQUEUE number used by :mod:`chaos.delayer` (queues are per network namespace)."""


def render(state: State, node_id: int, *, iface: str = "eth0", nfqueue_delay: bool = False,
           confine: str | None = None) -> str:
    """The ``iptables-restore`` input for one node.

    Cuts are DROP rules (not REJECT: a real partition answers nothing, so peers see
    time-outs, not quick refusals), on INPUT by source and on OUTPUT by destination, so a
    one-way cut ``a -> b`` drops a's packets to b at both ends.  With ``nfqueue_delay`` every
    packet leaving ``iface`` goes through the delayer's queue (``--queue-bypass``: if the
    delayer is gone, packets pass undelayed rather than vanish).  With ``confine`` (a subnet),
    anything the node would send through ``iface`` outside that subnet is dropped first: node
    traffic never leaves the cluster's own network, whatever routes the namespace has.
    """
    addr = {n.id: n.host for n in state.nodes}
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":TKV-IN - [0:0]",
        ":TKV-OUT - [0:0]",
        "-A INPUT -j TKV-IN",
        "-A OUTPUT -j TKV-OUT",
    ]
    for src, dst in sorted(state.cuts):
        if dst == node_id:
            lines.append(f"-A TKV-IN -s {addr[src]}/32 -m comment --comment "
                         f"\"tkv cut {src}->{dst}\" -j DROP")
        if src == node_id:
            lines.append(f"-A TKV-OUT -d {addr[dst]}/32 -m comment --comment "
                         f"\"tkv cut {src}->{dst}\" -j DROP")
    if confine:
        lines.append(f"-A TKV-OUT -o {iface} ! -d {confine} -m comment --comment "
                     f"\"tkv confine\" -j DROP")
    if nfqueue_delay and state.delays.get(node_id):
        lines.append(f"-A TKV-OUT -o {iface} -m comment --comment \"tkv delay\" "
                     f"-j NFQUEUE --queue-num {DELAY_QUEUE} --queue-bypass")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
