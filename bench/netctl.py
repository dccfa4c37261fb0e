"""Loopback traffic accounting and partitions with iptables (needs root; all on 127.0.0.1).

Byte counters: one chain hooked into OUTPUT counts, per node port, the bytes of packets sent
to it (`--dport`) and from it (`--sport`). On loopback every packet crosses OUTPUT exactly
once, and every node-to-node exchange is a client socket talking to some node's server port,
so the sum over all node ports is the cluster's whole traffic, counted once. Bytes are IP-level
(payload plus TCP/IP headers, ~52 bytes per packet), i.e. what the wire would carry.

Partitions: each node runs with its own group id (procs.GID_BASE + id), so a rule
`-m owner --gid-owner <A> --dport <B's port> -j DROP` cuts A's requests to B and nothing else;
the harness's own client (gid 0) still reaches every node. Dropped, not rejected: a partition
looks like silence, as it would on a real network.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from procs import Proc

CHAIN = "TRIOKV_BENCH"
PART = "TRIOKV_PART"
PEER = "TRIOKV_PEER"


def available() -> tuple[bool, str]:
    """Whether iptables accounting/partitions can be used here, and why not."""
    if os.geteuid() != 0:
        return False, "not root"
    if not shutil.which("iptables"):
        return False, "iptables not installed"
    r = subprocess.run(["iptables", "-L", "OUTPUT", "-n"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"iptables unusable: {r.stderr.strip()[:200]}"
    return True, ""


def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {r.stderr.strip()}")
    return r


def _ensure_chain(chain: str) -> None:
    if _ipt("-n", "-L", chain, check=False).returncode != 0:
        _ipt("-N", chain)
    if _ipt("-C", "OUTPUT", "-j", chain, check=False).returncode != 0:
        _ipt("-I", "OUTPUT", "1", "-j", chain)


def _drop_chain(chain: str) -> None:
    while _ipt("-D", "OUTPUT", "-j", chain, check=False).returncode == 0:
        pass
    _ipt("-F", chain, check=False)
    _ipt("-X", chain, check=False)


class ByteCounter:
    """Byte counters for a set of nodes: per server port (cross-check) and per sender.

    `sent` uses `-m owner --gid-owner` (each node runs with its own gid), so it is exactly what
    each node process put on the wire, requests and responses alike. Every byte is sent by one
    node and received by another, so a node's average in+out is 2 x total / N.
    """

    def __init__(self, nodes: list[Proc]) -> None:
        self.ports = {p.name: p.port for p in nodes}
        self.gids = {p.name: p.gid for p in nodes if p.gid is not None}
        _drop_chain(CHAIN)
        _ensure_chain(CHAIN)
        for port in self.ports.values():
            _ipt("-A", CHAIN, "-o", "lo", "-p", "tcp", "--dport", str(port))
            _ipt("-A", CHAIN, "-o", "lo", "-p", "tcp", "--sport", str(port))
        for gid in self.gids.values():
            _ipt("-A", CHAIN, "-o", "lo", "-p", "tcp", "-m", "owner", "--gid-owner", str(gid))

    def read(self) -> dict[str, dict[str, int]]:
        """{"port": bytes to+from each node's port, "sent": bytes and "pkts": packets each
        node sent} so far, keyed by node name."""
        out = _ipt("-n", "-v", "-x", "-L", CHAIN).stdout
        by_port: dict[int, int] = {}
        by_gid: dict[int, tuple[int, int]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 3 or not parts[0].isdigit():
                continue
            pkts, nbytes = int(parts[0]), int(parts[1])
            if "owner" in parts and "match" in parts:
                gid = int(parts[parts.index("match") + 1])
                by_gid[gid] = (pkts, nbytes)
                continue
            for tok in parts:
                if tok.startswith(("dpt:", "spt:")):
                    port = int(tok[4:])
                    by_port[port] = by_port.get(port, 0) + nbytes
        return {
            "port": {name: by_port.get(port, 0) for name, port in self.ports.items()},
            "sent": {name: by_gid.get(g, (0, 0))[1] for name, g in self.gids.items()},
            "pkts": {name: by_gid.get(g, (0, 0))[0] for name, g in self.gids.items()},
        }

    def close(self) -> None:
        _drop_chain(CHAIN)


class PeerCounter:
    """Node-to-node requests only: packets that node processes (by gid) send to node ports.

    Counts data segments (PSH set: about one per request write on loopback) and their bytes,
    so a load run can report peer requests per client request (replication batching,
    forwarding). Responses to peers are not separable from responses to clients by port,
    so they are left out.
    """

    def __init__(self, nodes: list[Proc]) -> None:
        if any(p.gid is None for p in nodes):
            raise RuntimeError("nodes were not started with their own gid")
        if len(nodes) > 15:
            raise RuntimeError("multiport matches at most 15 ports")
        self.gids = {p.name: p.gid for p in nodes}
        ports = ",".join(str(p.port) for p in nodes)
        _drop_chain(PEER)
        _ensure_chain(PEER)
        for gid in self.gids.values():
            _ipt("-A", PEER, "-o", "lo", "-p", "tcp", "-m", "multiport", "--dports", ports,
                 "-m", "owner", "--gid-owner", str(gid), "--tcp-flags", "PSH", "PSH")  # fmt: skip

    def read_by_sender(self) -> dict[str, tuple[int, int]]:
        """{node name: (data segments, bytes)} sent to node ports so far."""
        out = _ipt("-n", "-v", "-x", "-L", PEER).stdout
        by_gid: dict[int, tuple[int, int]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0].isdigit() and "match" in parts:
                gid = int(parts[parts.index("match") + 1])
                by_gid[gid] = (int(parts[0]), int(parts[1]))
        return {n: by_gid.get(g, (0, 0)) for n, g in self.gids.items() if g is not None}

    def read(self) -> tuple[int, int]:
        """(data segments, bytes) sent between nodes so far."""
        per = self.read_by_sender().values()
        return sum(p for p, _ in per), sum(b for _, b in per)

    def close(self) -> None:
        _drop_chain(PEER)


class Partition:
    """Cut traffic between two groups of nodes in both directions (loopback, by gid owner)."""

    def __init__(self) -> None:
        _drop_chain(PART)
        _ensure_chain(PART)

    def cut(self, side_a: list[Proc], side_b: list[Proc]) -> None:
        for a in side_a:
            for b in side_b:
                for src, dst in ((a, b), (b, a)):
                    if src.gid is None:
                        raise RuntimeError("nodes were not started with their own gid")
                    _ipt(
                        "-A",
                        PART,
                        "-o",
                        "lo",
                        "-p",
                        "tcp",
                        "-m",
                        "owner",
                        "--gid-owner",
                        str(src.gid),
                        "--dport",
                        str(dst.port),
                        "-j",
                        "DROP",
                    )

    def heal(self) -> None:
        _ipt("-F", PART)

    def dropped_packets(self) -> int:
        out = _ipt("-n", "-v", "-x", "-L", PART).stdout
        return sum(
            int(ln.split()[0]) for ln in out.splitlines() if ln.split() and ln.split()[0].isdigit()
        )

    def close(self) -> None:
        _drop_chain(PART)


def cleanup() -> None:
    """Remove both chains (atexit); harmless when they do not exist."""
    if os.geteuid() == 0 and shutil.which("iptables"):
        _drop_chain(CHAIN)
        _drop_chain(PART)
        _drop_chain(PEER)
