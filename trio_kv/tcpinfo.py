"""What Linux's ``struct tcp_info`` tells a peer channel about its connection (``channel.py``'s
stall watcher): whether the kernel is resending what the network drops, and how much it never
sent.  Other systems that have ``TCP_INFO`` lay it out differently: there, and on kernels
before 5.4 (whose struct ends before ``tcpi_snd_wnd``), nothing here is usable."""

from __future__ import annotations

import socket
import struct
import sys

import trio

_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
_TCP_INFO_BYTES = 232


def tcp_stall(info: bytes) -> tuple[float, float] | None:
    """From a Linux ``struct tcp_info``: if the kernel is resending into an open window, the
    seconds since the peer's kernel last acknowledged anything and the path's base
    retransmission timeout (smoothed RTT + 4 x its variance); else None.

    Resending is a timed-out segment still unacknowledged (``tcpi_retransmits``: the network
    dropped it) or a failed probe while the peer's window is open (``tcpi_probes``: the packet
    never left, as when a local firewall drops it).  A peer that stopped reading is not
    resending: it closes its window (zero, or too small to send into) and acknowledges what
    it holds."""
    if len(info) < _TCP_INFO_BYTES:
        return None
    retransmits, probes = info[2], info[3]
    unacked, rtt_us, rttvar_us = (struct.unpack_from("I", info, at)[0] for at in (24, 68, 72))
    last_ack_ms, window = (struct.unpack_from("I", info, at)[0] for at in (56, 228))
    if (retransmits and unacked) or (probes and window):
        return last_ack_ms / 1000, (rtt_us + 4 * rttvar_us) / 1e6
    return None


def tcp_info_usable(sock: trio.socket.SocketType) -> bool:
    """Whether this system gives the ``struct tcp_info`` that ``tcp_stall`` reads."""
    return len(tcp_info(sock)) >= _TCP_INFO_BYTES


def tcp_unsent(info: bytes) -> int:
    """Bytes written to the socket that the kernel has not sent even once
    (``tcpi_notsent_bytes``); 0 if unknown."""
    return struct.unpack_from("I", info, 144)[0] if len(info) >= _TCP_INFO_BYTES else 0


def tcp_info(sock: trio.socket.SocketType) -> bytes:
    if _TCP_INFO is None:
        return b""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except OSError:
        return b""
