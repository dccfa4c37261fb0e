"""Peer messages and the one JSON codec: the trust boundary between nodes.

Every exchange is a frozen dataclass; ``to_wire`` and ``from_wire`` are the only code that knows
its JSON shape.  ``from_wire`` validates everything against ``WireRules`` (types, ranges, sizes,
timestamps not too far ahead of our clock) and raises ``WireError``, so a malformed or hostile
peer message is a 400 at the edge and never reaches the replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import orjson

from .clock import Version
from .handoff import Report, Scope
from .metadata import MAX_NODE_ID, Deps, MetadataError, TokenRules, check_deps, check_version
from .store import Entry
from .view import View, ViewError, parse_view

MAX_INT = (1 << 53) - 1  # stream positions, epochs: exact in every JSON implementation
MAX_NAME = 128  # origins and view ids
MAX_SCOPES = 16  # scopes of one pull, debts of one report


class WireError(ValueError):
    """A peer message does not have the expected shape."""


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


@dataclass(frozen=True, slots=True)
class WireRules:
    """What a peer message may hold, from the receiver's config and clock."""

    token: TokenRules
    max_value_bytes: int
    latest_hlc: int  # no timestamp above this (our wall clock plus max_clock_skew)
    vnodes: int = 128
    max_view_nodes: int = 1024


def _int(raw: Mapping[str, Any], name: str, high: int = MAX_INT) -> int:
    value = raw.get(name)
    if type(value) is not int or not 0 <= value <= high:
        raise WireError(f"'{name}' must be an integer from 0 to {high}")
    return value


def _name(raw: Mapping[str, Any], name: str, empty: bool = True) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or len(value) > MAX_NAME or (not empty and not value):
        raise WireError(f"'{name}' must be a string of at most {MAX_NAME} characters")
    return value


def _object(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise WireError(f"{what} must be a JSON object")
    return raw


def _view(raw: Any, rules: WireRules) -> View:
    try:
        return parse_view({"view": raw}, rules.vnodes, rules.max_view_nodes)
    except ViewError as exc:
        raise WireError(f"malformed view: {exc}") from exc


# ------------------------------------------------------------------- entries
def entry_to_wire(key: str, e: Entry) -> list[Any]:
    deps = {k: [v.hlc, v.node] for k, v in e.deps.items()} if e.deps else None
    return [key, e.value, e.version.hlc, e.version.node, deps]


def entry_from_wire(raw: Any, rules: WireRules) -> tuple[str, Entry]:
    if not isinstance(raw, list) or len(raw) != 5:
        raise WireError("an entry must be [key, value, timestamp, node, deps]")
    key, value, hlc, node, deps = raw
    token = rules.token
    if not isinstance(key, str) or not key or len(key.encode()) > token.max_key_bytes:
        raise WireError("an entry's key is not a string of 1 to max_key_bytes bytes")
    if value is not None and (
        not isinstance(value, str)
        or (len(value) * 4 > rules.max_value_bytes and len(value.encode()) > rules.max_value_bytes)
    ):
        raise WireError("an entry's value is not a string of at most max_value_bytes")
    try:
        version = check_version(hlc, node, rules.latest_hlc)
        parsed: Deps = check_deps(deps, token, rules.latest_hlc) if deps else {}
    except MetadataError as exc:
        raise WireError(f"entry {key[:100]!r}: {exc}") from exc
    return key, Entry(version, value, parsed)


Digests = list[tuple[str, Version]]  # keys and the versions a node holds (no values)


def digests_to_wire(digests: Digests) -> list[list[Any]]:
    return [[k, v.hlc, v.node] for k, v in digests]


def digests_from_wire(raw: Any, rules: WireRules, what: str) -> Digests:
    if not isinstance(raw, list):
        raise WireError(f"'{what}' must be a list of [key, timestamp, node]")
    out: Digests = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise WireError(f"'{what}' must be a list of [key, timestamp, node]")
        key, hlc, node = item
        if not isinstance(key, str) or not key or len(key.encode()) > rules.token.max_key_bytes:
            raise WireError(f"a key of '{what}' is not a string of 1 to max_key_bytes bytes")
        try:
            out.append((key, check_version(hlc, node, rules.latest_hlc)))
        except MetadataError as exc:
            raise WireError(f"'{what}' {key[:100]!r}: {exc}") from exc
    return out


def entries_to_wire(entries: list[tuple[str, Entry]]) -> list[list[Any]]:
    return [entry_to_wire(k, e) for k, e in entries]


def entries_from_wire(raw: Any, rules: WireRules) -> list[tuple[str, Entry]]:
    if not isinstance(raw, list):
        raise WireError("'entries' must be a list")
    return [entry_from_wire(e, rules) for e in raw]


# ------------------------------------------------------------------- replication
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
            "entries": entries_to_wire(self.entries),
            "seen": self.seen,
            "positions": self.positions,
        }

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules) -> SyncBatch:
        raw = _object(raw, "a sync batch")
        after, upto = _int(raw, "after"), _int(raw, "upto")
        if after > upto:
            raise WireError("'after' is past 'upto'")
        entries = entries_from_wire(raw.get("entries"), rules)
        positions = raw.get("positions")
        if (
            not isinstance(positions, list)
            or len(positions) != len(entries)
            or not all(type(p) is int for p in positions)
            or not all(a < b for a, b in pairwise([after, *positions, upto + 1]))
        ):
            raise WireError("'positions' must rise strictly within (after, upto], one per entry")
        seen = _object(raw.get("seen"), "'seen'")
        if len(seen) > 4 * rules.max_view_nodes or not all(
            isinstance(k, str) and len(k) <= MAX_NAME and type(v) is int and 0 <= v <= MAX_INT
            for k, v in seen.items()
        ):
            raise WireError("'seen' must map origins to stream positions")
        return cls(
            sender=_int(raw, "sender", MAX_NODE_ID),
            origin=_name(raw, "origin", empty=False),
            view_id=_name(raw, "view_id"),
            after=after,
            upto=upto,
            entries=entries,
            seen=dict(seen),
            positions=positions,
            epoch=_int(raw, "epoch"),
        )


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
        raw = _object(raw, "a sync reply")
        accepted = raw.get("accepted")
        if not isinstance(accepted, bool):
            raise WireError("'accepted' must be true or false")
        return cls(_name(raw, "origin"), _name(raw, "view_id"), _int(raw, "seen"), accepted,
                   _int(raw, "epoch"))


# ------------------------------------------------------------------- view changes
@dataclass(frozen=True, slots=True)
class Whoami:
    """Who sends a view-change message, and on which view and epoch."""

    node: int
    epoch: int
    view_id: str  # "" with no view

    def to_wire(self) -> dict[str, Any]:
        return {"from": self.node, "epoch": self.epoch, "view_id": self.view_id}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Whoami:
        return cls(_int(raw, "from", MAX_NODE_ID), _int(raw, "epoch"), _name(raw, "view_id"))


def scope_to_wire(scope: Scope) -> list[Any]:
    view, shard = scope
    return [view.to_json(), shard]


def scope_from_wire(raw: Any, rules: WireRules) -> Scope:
    if not isinstance(raw, list) or len(raw) != 2:
        raise WireError("a scope must be [view, shard]")
    view = _view(raw[0], rules)
    shard = raw[1]
    if not isinstance(shard, str) or shard not in view.shards:
        raise WireError("malformed scope: its shard is not in its view")
    return view, shard


def _scopes(raw: Any, rules: WireRules, what: str) -> tuple[Scope, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_SCOPES:
        raise WireError(f"'{what}' must be a list of at most {MAX_SCOPES} scopes")
    return tuple(scope_from_wire(s, rules) for s in raw)


def report_to_wire(report: Report) -> dict[str, Any]:
    return {
        "view": report.view.to_json() if report.view else None,
        "shard": report.shard,
        "debts": [scope_to_wire(s) for s in report.debts],
    }


def report_from_wire(raw: Any, rules: WireRules) -> Report:
    """A pulled node's report; the view and shard must agree (the shard is absent only when
    the node is not in its view)."""
    raw = _object(raw, "a report")
    view = _view(raw["view"], rules) if raw.get("view") is not None else None
    shard = raw.get("shard")
    if shard is not None and (view is None or shard not in view.shards):
        raise WireError("malformed report: its shard is not in its view")
    return Report(view, shard, _scopes(raw.get("debts"), rules, "debts"))


@dataclass(frozen=True, slots=True)
class PullRequest:
    """A new owner under ``view`` asks for the keys we hold in every scope of ``within``
    (which fences them here), in ring order after ``after``.  ``known``: what it holds there
    after ``after`` (all of it if ``complete``), which is not sent again."""

    view: View
    within: tuple[Scope, ...]
    after: str
    limit: int
    sender: Whoami
    max_bytes: int = 0  # 0: the server's own page size
    known: Digests = field(default_factory=list)
    complete: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {"view": self.view.to_json(), "within": [scope_to_wire(s) for s in self.within],
                "after": self.after, "limit": self.limit, "max_bytes": self.max_bytes,
                "known": digests_to_wire(self.known), "complete": self.complete,
                **self.sender.to_wire()}

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules) -> PullRequest:
        raw = _object(raw, "a pull")
        view = _view(raw.get("view"), rules)
        within = _scopes(raw.get("within"), rules, "within")
        if not within:
            raise WireError("malformed pull: no scope to pull")
        after = raw.get("after")
        if not isinstance(after, str) or len(after.encode()) > rules.token.max_key_bytes:
            raise WireError("'after' must be a key")
        sender = Whoami(_int(raw, "from", MAX_NODE_ID), _int(raw, "epoch"), view.view_id)
        max_bytes = _int(raw, "max_bytes") if "max_bytes" in raw else 0
        known = digests_from_wire(raw.get("known", []), rules, "known")
        complete = raw.get("complete", True)
        if not isinstance(complete, bool):
            raise WireError("'complete' must be true or false")
        return cls(view, within, after, _int(raw, "limit"), sender, max_bytes, known,
                   complete)


@dataclass(frozen=True, slots=True)
class PullPage:
    """One page of a pull; ``next`` is the cursor of the next page, or None with the report.
    ``stale`` (no entries): we serve a newer view than the puller's; it must catch up."""

    sender: Whoami
    entries: list[tuple[str, Entry]]
    next: str | None
    report: Report | None
    stale: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.stale:
            return {"stale": self.sender.to_wire()}
        body: dict[str, Any] = {"entries": entries_to_wire(self.entries), "next": self.next,
                                **self.sender.to_wire()}
        if self.report is not None:
            body["report"] = report_to_wire(self.report)
        return body

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules) -> PullPage:
        raw = _object(raw, "a pull page")
        if "stale" in raw:
            return cls(Whoami.from_wire(_object(raw["stale"], "'stale'")), [], None, None, True)
        nxt = raw.get("next")
        if nxt is not None and not isinstance(nxt, str):
            raise WireError("'next' must be a key or null")
        report = None if nxt is not None else report_from_wire(raw.get("report"), rules)
        return cls(Whoami.from_wire(raw), entries_from_wire(raw.get("entries"), rules), nxt,
                   report)


@dataclass(frozen=True, slots=True)
class Handoff:
    """Keys an old owner hands to a new one; acknowledged once merged.  An *offer* names
    versions only: the receiver answers which of them to ``send`` (it lacks them) and, if
    ``patient``, which it will pull from us itself (``later``); it holds the others."""

    sender: Whoami
    entries: list[tuple[str, Entry]]
    offer: Digests | None = None
    patient: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.offer is not None:
            return {"offer": digests_to_wire(self.offer), "patient": self.patient,
                    **self.sender.to_wire()}
        return {"entries": entries_to_wire(self.entries), **self.sender.to_wire()}

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules) -> Handoff:
        raw = _object(raw, "a handoff")
        if "offer" in raw:
            patient = raw.get("patient", False)
            if not isinstance(patient, bool):
                raise WireError("'patient' must be true or false")
            offer = digests_from_wire(raw["offer"], rules, "offer")
            return cls(Whoami.from_wire(raw), [], offer, patient)
        return cls(Whoami.from_wire(raw), entries_from_wire(raw.get("entries"), rules))


@dataclass(frozen=True, slots=True)
class OfferReply:
    """Which keys of an offer (by index) the receiver lacks, and which it will pull itself."""

    send: list[int]
    later: list[int]

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "send": self.send, "later": self.later}

    @classmethod
    def from_wire(cls, raw: Any, offered: int) -> OfferReply:
        raw = _object(raw, "an offer's answer")
        lists = []
        for name in ("send", "later"):
            value = raw.get(name)
            if not isinstance(value, list) or any(
                type(i) is not int or not 0 <= i < offered for i in value
            ):
                raise WireError(f"'{name}' must be a list of indices into the offer")
            lists.append(value)
        return cls(lists[0], lists[1])


@dataclass(frozen=True, slots=True)
class PeerViewStatus:
    """What a peer's ``GET /view`` says about the view it serves (fence probes, and a fresh
    node learning the previous view)."""

    view: View | None
    epoch: int
    changing: bool  # on its old view, moving to another: it serves neither yet

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules) -> PeerViewStatus:
        raw = _object(raw, "a view status")
        view = _view(raw["view"], rules) if raw.get("view") is not None else None
        change = raw.get("change")
        changing = isinstance(change, dict) and change.get("state") == "changing"
        return cls(view, _int(raw, "epoch"), changing)


# ------------------------------------------------------------------- cross-shard pruning
@dataclass(frozen=True, slots=True)
class StableQuery:
    """"Which of these writes to keys of your shard are on every replica of it?"  Asked by a
    node whose stored values depend on them (``core/crossdeps.py``); a dependency is dropped
    from stored values only on the owning shard's word."""

    sender: int
    deps: list[tuple[str, Version]]

    def to_wire(self) -> dict[str, Any]:
        return {"from": self.sender, "deps": [[k, v.hlc, v.node] for k, v in self.deps]}

    @classmethod
    def from_wire(cls, raw: Any, rules: WireRules, max_deps: int) -> StableQuery:
        raw = _object(raw, "a stability query")
        deps = raw.get("deps")
        if not isinstance(deps, list) or not 0 < len(deps) <= max_deps:
            raise WireError(f"'deps' must be a list of 1 to {max_deps} (stable_query_deps) "
                            "[key, timestamp, node] triples")
        parsed: list[tuple[str, Version]] = []
        for item in deps:
            if not isinstance(item, list) or len(item) != 3:
                raise WireError("a dependency must be [key, timestamp, node]")
            key = item[0]
            if not isinstance(key, str) or not key or len(key.encode(
                "utf-8", "surrogatepass"
            )) > rules.token.max_key_bytes:
                raise WireError("a dependency's key is not a string of 1 to max_key_bytes bytes")
            try:
                parsed.append((key, check_version(item[1], item[2], rules.latest_hlc)))
            except MetadataError as exc:
                raise WireError(f"dependency on {key[:100]!r}: {exc}") from exc
        return cls(_int(raw, "from", MAX_NODE_ID), parsed)


@dataclass(frozen=True, slots=True)
class StableReply:
    """One flag per dependency asked about, in order: true when it is stable at the replier."""

    stable: list[bool]

    def to_wire(self) -> dict[str, Any]:
        return {"stable": self.stable}

    @classmethod
    def from_wire(cls, raw: Any, asked: int) -> StableReply:
        raw = _object(raw, "a stability answer")
        stable = raw.get("stable")
        if (not isinstance(stable, list) or len(stable) != asked
                or not all(isinstance(s, bool) for s in stable)):
            raise WireError(f"'stable' must be a list of {asked} booleans")
        return cls(stable)
