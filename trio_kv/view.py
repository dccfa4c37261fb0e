"""Views: which nodes form which shards, validated once at the edge, and what a change moves."""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .ring import HASH_SPACE, Ring

LEGACY_SHARD_NAME = "shard1"


class ViewError(ValueError):
    """The view body is not a valid view; the message is shown to the operator."""


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    address: str


@dataclass(frozen=True)
class View:
    shards: dict[str, tuple[Member, ...]]
    vnodes: int = field(default=128, compare=False)

    @functools.cached_property
    def view_id(self) -> str:
        """Same view, same id on every node: lets peers notice they disagree."""
        canonical = sorted(
            (name, sorted((m.id, m.address) for m in members))
            for name, members in self.shards.items()
        )
        return hashlib.blake2b(json.dumps(canonical).encode(), digest_size=8).hexdigest()

    @functools.cached_property
    def ring(self) -> Ring:
        return _ring(frozenset(self.shards), self.vnodes)

    @functools.cached_property
    def _shard_of_node(self) -> dict[int, str]:
        return {m.id: name for name, members in self.shards.items() for m in members}

    @functools.cached_property
    def _members(self) -> dict[int, Member]:
        return {m.id: m for members in self.shards.values() for m in members}

    def shard_of(self, node_id: int) -> str | None:
        return self._shard_of_node.get(node_id)

    def member(self, node_id: int) -> Member | None:
        return self._members.get(node_id)

    def members(self) -> list[Member]:
        return list(self._members.values())

    @functools.cached_property
    def _addresses(self) -> frozenset[str]:
        return frozenset(m.address for m in self._members.values())

    def addresses(self) -> frozenset[str]:
        return self._addresses

    def shard_for(self, key: str) -> str:
        return self.ring.shard_for(key)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [{"address": m.address, "id": m.id} for m in members]
            for name, members in self.shards.items()
        }


@functools.lru_cache(maxsize=64)
def _ring(shard_names: frozenset[str], vnodes: int) -> Ring:
    """Rings depend on shard names only; peers' messages carry the same few views again and
    again."""
    return Ring(shard_names, vnodes)


MAX_NODE_ID = (1 << 53) - 1
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _parse_id(raw: object) -> int:
    if isinstance(raw, str) and raw.strip().isdigit() and raw.strip().isascii():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ViewError("node ids must be non-negative integers (or strings of digits)")
    if not 0 <= raw <= MAX_NODE_ID:
        raise ViewError(f"node id {raw} is out of range (0 to 2**53-1)")
    return raw


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if len(host) > 253:
        return False
    return all(_HOSTNAME.fullmatch(label) for label in host.split("."))


def _parse_address(raw: object) -> str:
    """``host:port`` only: a hostname, an IPv4 address or a bracketed IPv6 address, and a
    port; no scheme, user or path (peers build URLs from it)."""
    if not isinstance(raw, str) or not raw.strip():
        raise ViewError("node addresses must be non-empty 'host:port' strings")
    text = raw.strip()
    host, sep, port = text.rpartition(":")
    if (
        not sep
        or not port.isascii()
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or not _valid_host(host)
    ):
        raise ViewError(f"node address {raw[:100]!r} is not of the form 'host:port'")
    return text


def _parse_members(name: str, raw: object) -> tuple[Member, ...]:
    if not isinstance(raw, list):
        raise ViewError(f"shard {name[:100]!r} must be a list of {{address, id}} objects")
    if not raw:
        raise ViewError(f"shard {name[:100]!r} is empty")
    members = []
    for item in raw:
        if not isinstance(item, dict) or "address" not in item or "id" not in item:
            raise ViewError(f"shard {name[:100]!r} must be a list of {{address, id}} objects")
        members.append(Member(id=_parse_id(item["id"]), address=_parse_address(item["address"])))
    return tuple(members)


def parse_view(body: object, vnodes: int = 128, max_nodes: int = 1024) -> View:
    """Validate a ``PUT /view`` body; unknown extra fields are ignored."""
    if not isinstance(body, dict) or "view" not in body:
        raise ViewError("body must be a JSON object with a 'view' field")
    raw = body["view"]
    if isinstance(raw, list):
        raw = {LEGACY_SHARD_NAME: raw}
    if not isinstance(raw, dict) or not raw:
        raise ViewError("'view' must be a non-empty object of shards or a list of nodes")
    if len(raw) > max_nodes or sum(len(m) for m in raw.values() if isinstance(m, list)) > max_nodes:
        raise ViewError(f"a view names at most {max_nodes} nodes (max_view_nodes)")
    shards: dict[str, tuple[Member, ...]] = {}
    for name, members in raw.items():
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ViewError("shard names must be non-empty strings of at most 256 characters")
        shards[name] = _parse_members(name, members)
    ids = [m.id for ms in shards.values() for m in ms]
    if len(ids) != len(set(ids)):
        raise ViewError("every node id must appear once in the view")
    addresses = [m.address for ms in shards.values() for m in ms]
    if len(addresses) != len(set(addresses)):
        raise ViewError("every node address must appear once in the view")
    return View(shards=shards, vnodes=vnodes)


@dataclass(frozen=True, slots=True)
class Move:
    """Keys hashing into ``[start, end)`` change owner from ``source`` to ``target`` shard."""

    start: int
    end: int
    source: str
    target: str
    senders: tuple[Member, ...]
    receivers: tuple[Member, ...]


def _owner_at(ring: Ring, point: int) -> str:
    return ring.owners[bisect.bisect_left(ring.positions, point) % len(ring.owners)]


def _overlay(old: Ring, new: Ring) -> list[tuple[int, int, str, str]]:
    """The hash space cut at every point of both rings: ``(start, end, old_owner, new_owner)``."""
    cuts = sorted({0, HASH_SPACE} | {p + 1 for p in old.positions} | {p + 1 for p in new.positions})
    return [
        (start, end, _owner_at(old, start), _owner_at(new, start))
        for start, end in itertools.pairwise(cuts)
        if start < HASH_SPACE
    ]


def plan_moves(old: View | None, new: View) -> list[Move]:
    """Every hash range whose owning shard differs between ``old`` and ``new``.

    Adjacent ranges with the same source and target are coalesced.  With no old view there is
    nothing known to move.
    """
    if old is None or old.view_id == new.view_id:
        return []
    moves: list[Move] = []
    for start, end, source, target in _overlay(old.ring, new.ring):
        if source == target:
            continue
        last = moves[-1] if moves else None
        if last and last.end == start and last.source == source and last.target == target:
            moves[-1] = Move(last.start, end, source, target, last.senders, last.receivers)
        else:
            moves.append(Move(start, end, source, target, old.shards[source], new.shards[target]))
    return moves


def shards_within(view: View, within: Sequence[tuple[View, str]]) -> set[str]:
    """Shards of ``view`` owning some key that every ``(v, shard)`` of ``within`` gives to
    ``shard``: where custody of a range of one view lies under another."""
    rings = [view.ring, *(v.ring for v, _ in within)]
    cuts = sorted({0}.union(*({p + 1 for p in r.positions} for r in rings)))
    return {
        _owner_at(view.ring, start)
        for start in cuts
        if start < HASH_SPACE and all(_owner_at(v.ring, start) == s for v, s in within)
    }


def ranges_within(within: Sequence[tuple[View, str]]) -> list[tuple[int, int]]:
    """The hash ranges of the keys every ``(view, shard)`` of ``within`` gives to ``shard``:
    what a pull page or a handoff reads from the store's ring order (``Store.walk``)."""
    return list(_ranges(tuple((frozenset(v.shards), v.vnodes, s) for v, s in within)))


@functools.lru_cache(maxsize=256)
def _ranges(within: tuple[tuple[frozenset[str], int, str], ...]) -> tuple[tuple[int, int], ...]:
    rings = [(_ring(names, vnodes), shard) for names, vnodes, shard in within]
    cuts = sorted({0, HASH_SPACE}.union(*({p + 1 for p in r.positions} for r, _ in rings)))
    out: list[tuple[int, int]] = []
    for start, end in itertools.pairwise(cuts):
        if start >= HASH_SPACE or not all(_owner_at(r, start) == s for r, s in rings):
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)
