"""Tombstone collection (pure): which deletes this replica may forget, and when.

A tombstone for key k may be dropped once nothing can bring an older version of k back here:

* every replica of our shard holds it (or something newer): each peer's claim on our stream,
  as carried by *its own latest push* (``Replica.pushed``), is at or past the tombstone's
  position.  A push built before that one (a retried call overtaken in the network) is
  refused by ``Replica.on_sync``, and so is anything from a replaced incarnation, so no push
  already under way can carry an older version;
* no custody is pending for k: no debt or pull covers it, no fence exists, and this node is
  not in the middle of a view change or handing keys off (old owners may still hold k);
* it is older than ``grace``: a client token may still name it.  A dependency on a key
  absent here whose version is at or below ``Replica.collect_horizon`` (now minus ``grace``)
  counts as met, as a collected delete.  The price: a write partitioned away for longer than
  ``grace`` and then depended on reads as a delete (as Cassandra's gc_grace).
"""

from __future__ import annotations

from .clock import LOGICAL_BITS
from .replica import Replica


def horizon(now_ms: int, grace_ms: int) -> int:
    """The hlc at or below which a tombstone is old enough to collect."""
    return max(0, now_ms - grace_ms) << LOGICAL_BITS


def collectable(replica: Replica, now_ms: int, grace_ms: int, settled: bool) -> list[str]:
    """Tombstones this replica may drop now (``settled``: no view change or handoff under
    way at this node)."""
    custody = replica.custody
    if not settled or replica.view is None or custody.fences:
        return []
    claims: list[int] = []
    for peer in replica.peers:
        pushed = replica.pushed.get(peer.id)
        if pushed is None or pushed[0] != replica.peer_origin.get(peer.id):
            return []  # no proof yet from this peer's current incarnation
        claims.append(pushed[1])
    upto = min(claims, default=replica.store.head)
    old = horizon(now_ms, grace_ms)
    out = []
    for key, entry in replica.store.entries.items():
        if (
            entry.value is None
            and entry.seq <= upto
            and entry.version.hlc <= old
            and replica.owns(key)
            and not custody.awaiting(key)
            and not custody.unfenced(key)
        ):
            out.append(key)
    return out


def collect(replica: Replica, now_ms: int, grace_ms: int, settled: bool) -> list[str]:
    """Drop what ``collectable`` allows; returns the keys dropped."""
    keys = collectable(replica, now_ms, grace_ms, settled)
    for key in keys:
        replica.store.remove(key)
    replica.collect_horizon = max(replica.collect_horizon, horizon(now_ms, grace_ms))
    return keys
