"""Peer messages and the one JSON codec.

Messages are frozen dataclasses; ``to_wire``/``from_wire`` are the only place that knows
their JSON shape, and ``from_wire`` validates, so a malformed peer message is a clean error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .clock import Version
from .handoff import Report, Scope
from .metadata import Deps, deps_from_wire, deps_to_wire
from .store import Entry
from .view import parse_view


class WireError(ValueError):
    """A peer message does not have the expected shape."""


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def entry_to_wire(key: str, e: Entry) -> list[Any]:
    return [key, e.value, e.version.hlc, e.version.node, deps_to_wire(e.deps) if e.deps else None]


def entry_from_wire(raw: Any) -> tuple[str, Entry]:
    try:
        key, value, hlc, node, deps = raw
        if not isinstance(key, str) or not (value is None or isinstance(value, str)):
            raise TypeError
        parsed: Deps = deps_from_wire(deps) if deps else {}
        return key, Entry(Version(int(hlc), int(node)), value, parsed)
    except (TypeError, ValueError) as exc:
        raise WireError("malformed entry") from exc


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """One push of a replica's stream: entries after ``after`` up to and including ``upto``,
    plus the sender's whole version vector (so the receiver learns how far the sender has
    seen *its* stream: one message carries both directions of the summary)."""

    sender: int
    origin: str
    view_id: str
    after: int
    upto: int
    entries: list[tuple[str, Entry]]
    seen: dict[str, int]
    positions: list[int]  # each entry's position in the sender's stream
    epoch: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "origin": self.origin,
            "view_id": self.view_id,
            "epoch": self.epoch,
            "after": self.after,
            "upto": self.upto,
            "entries": [entry_to_wire(k, e) for k, e in self.entries],
            "seen": self.seen,
            "positions": self.positions,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> SyncBatch:
        try:
            return cls(
                sender=int(raw["sender"]),
                origin=str(raw["origin"]),
                view_id=str(raw["view_id"]),
                after=int(raw["after"]),
                upto=int(raw["upto"]),
                entries=[entry_from_wire(e) for e in raw["entries"]],
                seen={str(k): int(v) for k, v in raw["seen"].items()},
                positions=[int(p) for p in raw["positions"]],
                epoch=int(raw["epoch"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireError("malformed sync batch") from exc


@dataclass(frozen=True, slots=True)
class SyncReply:
    origin: str
    view_id: str
    seen: int  # how far the replier has merged the sender's stream
    accepted: bool
    epoch: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"origin": self.origin, "view_id": self.view_id, "seen": self.seen,
                "accepted": self.accepted, "epoch": self.epoch}

    @classmethod
    def from_wire(cls, raw: Any) -> SyncReply:
        try:
            return cls(str(raw["origin"]), str(raw["view_id"]), int(raw["seen"]),
                       bool(raw["accepted"]), int(raw["epoch"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError("malformed sync reply") from exc


def entries_to_wire(entries: list[tuple[str, Entry]]) -> list[list[Any]]:
    return [entry_to_wire(k, e) for k, e in entries]


def entries_from_wire(raw: Any) -> list[tuple[str, Entry]]:
    if not isinstance(raw, list):
        raise WireError("entries must be a list")
    return [entry_from_wire(e) for e in raw]


def scope_to_wire(scope: Scope) -> list[Any]:
    view, shard = scope
    return [view.to_json(), shard]


def scope_from_wire(raw: Any, vnodes: int) -> Scope:
    try:
        view_raw, shard = raw
        view = parse_view({"view": view_raw}, vnodes)
    except (TypeError, ValueError) as exc:  # ViewError is a ValueError
        raise WireError(f"malformed scope: {exc}") from exc
    if not isinstance(shard, str) or shard not in view.shards:
        raise WireError(f"malformed scope: no shard {shard!r} in its view")
    return view, shard


def report_to_wire(report: Report) -> dict[str, Any]:
    return {
        "view": report.view.to_json() if report.view else None,
        "shard": report.shard,
        "debts": [scope_to_wire(s) for s in report.debts],
    }


def report_from_wire(raw: Any, vnodes: int) -> Report:
    """A pulled node's report; the view and shard must agree (the shard is absent only when
    the node is not in its view)."""
    try:
        view = parse_view({"view": raw["view"]}, vnodes) if raw["view"] else None
        shard, debts = raw["shard"], raw["debts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed report: {exc}") from exc
    if shard is not None and (view is None or shard not in view.shards):
        raise WireError("malformed report: its shard is not in its view")
    if not isinstance(debts, list):
        raise WireError("malformed report: debts must be a list")
    return Report(view, shard, tuple(scope_from_wire(d, vnodes) for d in debts))
