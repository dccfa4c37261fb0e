"""Delay packets by a fixed time through NFQUEUE, for kernels without ``sch_netem``.

``tc qdisc ... netem delay`` is the normal way to add latency, but some kernels (this CI's
among them) are built without ``sch_netem``.  iptables' ``NFQUEUE`` target hands every packet
to a userspace program that decides when to let it go; holding each packet for N ms before
accepting it is the same latency netem would add on egress.  This module speaks the
nfnetlink_queue protocol directly over a netlink socket, so it needs nothing but the standard
library: it is copied into containers and run there with the image's own ``python3``.

Run as ``python3 delayer.py --queue Q --ms N`` inside the network namespace whose iptables
send packets to queue Q (``-j NFQUEUE --queue-num Q --queue-bypass``).  Packets leave in the
order they arrived (verdicts are given in batches, "every id up to X"), so TCP sees a clean
constant delay, never reordering.  If this process dies, ``--queue-bypass`` lets traffic through
undelayed instead of black-holing it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
QUEUE_MAXLEN = 20_000
MAX_BACKLOG = 100_000


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes as the kernel expects."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int) -> bytes:
    """A netlink message carrying an nfgenmsg header (family, version, queue number)."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags,
                         seq, 0)
    return header + body


def _attrs(data: bytes) -> dict[int, bytes]:
    """Parse a run of netlink attributes into {type: payload}."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out


class Delayer:
    """Bound to one NFQUEUE; accepts every queued packet ``delay`` seconds after it arrived."""

    def __init__(self, queue: int, delay: float) -> None:
        self.queue = queue
        self.delay = delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.pending: collections.deque[tuple[float, int]] = collections.deque()
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop_on_signals(self) -> None:
        """SIGTERM/SIGINT end :meth:`run` promptly, releasing held packets instead of dropping."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def handler(_sig: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _send(self, msg_type: int, attrs: bytes, ack: bool = False) -> None:
        self.seq += 1
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        self.sock.send(_message(msg_type, self.queue, attrs, self.seq, flags))
        if ack:
            self._expect_ack()

    def _expect_ack(self) -> None:
        """Read until the kernel's answer to our config request; raise if it refused."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, msg_type, _flags, seq, _pid = struct.unpack_from("=IHHII", data, pos)
                if msg_type == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("=i", data, pos + 16)
                    if err != 0:
                        raise OSError(-err, f"nfqueue config refused: {os.strerror(-err)}")
                    return
                pos += (length + 3) & ~3
        raise TimeoutError("no answer from nfnetlink_queue")

    def bind(self) -> None:
        """Take over the queue: metadata-only copies, a long queue, fail-open when full."""
        cmd = struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)
        self._send(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_CMD, cmd), ack=True)
        params = struct.pack(">IB", 0, NFQNL_COPY_META)
        self._send(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_PARAMS, params), ack=True)
        self._send(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN)),
                   ack=True)
        flags = struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)
        self._send(NFQNL_MSG_CONFIG, _attr(NFQA_CFG_MASK, flags) + _attr(NFQA_CFG_FLAGS, flags),
                   ack=True)

    def _receive(self) -> None:
        """Queue every packet announced in one datagram with its release time."""
        data = self.sock.recv(1 << 20)
        now = time.monotonic()
        pos = 0
        while pos + 16 <= len(data):
            length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, pos)
            if length < 16:
                break
            if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = _attrs(data[pos + 20 : pos + length])
                hdr = attrs.get(NFQA_PACKET_HDR)
                if hdr is not None:
                    (packet_id,) = struct.unpack_from(">I", hdr)
                    self.pending.append((now + self.delay, packet_id))
            pos += (length + 3) & ~3
        while len(self.pending) > MAX_BACKLOG:  # bound memory: release the oldest at once
            self._accept_upto(self.pending.popleft()[1])

    def _accept_upto(self, packet_id: int) -> None:
        verdict = struct.pack(">II", NF_ACCEPT, packet_id)
        self._send(NFQNL_MSG_VERDICT_BATCH, _attr(NFQA_VERDICT_HDR, verdict))

    def _release_due(self) -> None:
        now = time.monotonic()
        last: int | None = None
        while self.pending and self.pending[0][0] <= now:
            last = self.pending.popleft()[1]
        if last is not None:
            self._accept_upto(last)

    def run(self, stop_after: float | None = None) -> None:
        """Serve until stopped (or ``stop_after`` seconds), releasing packets on time."""
        end = None if stop_after is None else time.monotonic() + stop_after
        while not self.stopping and (end is None or time.monotonic() < end):
            timeout = 1.0
            if self.pending:
                timeout = max(0.0, self.pending[0][0] - time.monotonic())
            readable, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
            if self.sock in readable:
                self._receive()
            self._release_due()
        if self.pending:  # let held packets go rather than have the kernel drop them
            self._accept_upto(self.pending[-1][1])
            self.pending.clear()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``delayer.py --queue Q --ms N``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--ms", type=float, required=True)
    parser.add_argument("--pidfile", help="write our pid here once bound (for containers)")
    args = parser.parse_args(argv)
    delayer = Delayer(args.queue, args.ms / 1000.0)
    delayer.stop_on_signals()
    delayer.bind()
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(args.pidfile + ".tmp", args.pidfile)
    print(f"delayer: queue {args.queue}, {args.ms:g} ms, bound", flush=True)
    delayer.run()
    if args.pidfile:
        with contextlib.suppress(OSError):
            os.unlink(args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
