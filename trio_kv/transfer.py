"""What a node hands over in a view change, read from its replica (pure): pages for the
pulls it serves, batches for the handoffs it makes, the keys it may then drop, and whether a
pull may be served at all."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .clock import Version
from .handoff import Scope
from .replica import Replica
from .ring import key_hash
from .store import Entry
from .view import View, ranges_within

Entries = list[tuple[str, Entry]]


def bounded(
    entries: Iterable[tuple[str, Entry]], max_entries: int, max_bytes: int
) -> Iterator[list[tuple[str, Entry]]]:
    """Cut ``entries`` into batches of at most ``max_entries`` and ``max_bytes`` encoded; an
    entry larger than a batch goes alone (the receiver's cap allows one entry of any size)."""
    batch: list[tuple[str, Entry]] = []
    size = 0
    for key, entry in entries:
        wire = entry.wire_size(key)
        if batch and (len(batch) >= max_entries or size + wire > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append((key, entry))
        size += wire
    if batch:
        yield batch

def pull_refusal(replica: Replica, sender: int, view: View, within: Iterable[Scope]) -> str | None:
    """Why a pull must be refused, if it must: it redirects our clients (fencing), so its
    views must agree with the ones we know on every node's address, and it must come from
    a node we know, be made for a view we know, or concern keys of a view we know (this is no
    authentication: that is the cluster secret's job; it stops a pull built on an invented
    cluster).  A node outside every view we know may still pull for our own view: one that
    crashed and restarted outside the final view settles the debts it still reports."""
    known = [v for v in (replica.view, replica.custody.target) if v is not None]
    for candidate in (view, *(v for v, _ in within)):
        for mine in known:
            for member in candidate.members():
                other = mine.member(member.id)
                if other is not None and other.address != member.address:
                    return f"it gives node {member.id} another address than our view does"
                if member.address in mine.addresses() and other is None:
                    return f"it gives address {member.address} to another node than ours"
    lived = replica.custody.lived | {v.view_id for v in known}
    if view.view_id in lived or any(v.member(sender) for v in known):
        return None  # a pull for a view we know fences (if at all) towards its real owners
    if any(v.view_id in lived for v, _ in within):
        return None
    return "it comes from a node in no view we know, about keys of no view we know"


def foreign_keys(replica: Replica, view: View) -> dict[str, list[str]]:
    """Keys held here whose owner under ``view`` is another shard, by target shard: read
    from the ring order range by range, so only those keys are walked."""
    mine = view.shard_of(replica.node_id)
    out: dict[str, list[str]] = {}
    for shard in sorted(view.shards):
        if shard != mine:
            keys = list(replica.store.walk(ranges_within([(view, shard)])))
            if keys:
                out[shard] = keys
    return out


def entries_for(replica: Replica, keys: Iterable[str]) -> list[tuple[str, Entry]]:
    return [(k, e) for k in keys if (e := replica.store.get(k)) is not None]


Known = list[tuple[str, Version]]


def known_after(
    replica: Replica, within: Sequence[Scope], after: str, limit: int, max_bytes: int
) -> tuple[Known, bool]:
    """What a puller holds of a pull's range after its cursor, for the next request: at most
    ``limit`` keys and about ``max_bytes``; True if that is all it holds there."""
    known: Known = []
    size = 0
    for key in replica.store.walk(ranges_within(within), after):
        if len(known) >= limit or size >= max_bytes:
            return known, False
        entry = replica.store.entries[key]
        known.append((key, entry.version))
        size += len(key) + 32
    return known, True


def pull_page(
    replica: Replica, within: Sequence[Scope], after_key: str, limit: int, max_bytes: int = 0,
    known: Known | None = None, complete: bool = True,
) -> tuple[list[tuple[str, Entry]], str | None]:
    """Entries held here in every scope of ``within``, in ring order after a cursor, less
    those the puller says it holds (``known``) at the same version or a newer one; at most
    ``limit`` entries and the page byte limit (or ``max_bytes``, if smaller).

    Read from the store's ring order, not by sorting it.  ``known`` lists what the puller
    holds there in that order; unless ``complete``, the page stops at its last key (what
    follows, the puller did not say).  The cursor of the next page is returned while a page
    holds entries, so the last page, with the report, is always empty: the puller asks for
    it only once it merged (and made durable) everything before, which lets a handoff of the
    same keys wait for it (``ViewChanges``).  ``limit`` 0: no entries, same cursor (a pull
    that only fences us until its turn comes)."""
    max_bytes = min(max_bytes or replica.limits.page_bytes, replica.limits.page_bytes)
    limit = min(limit, replica.limits.page_entries)
    if limit <= 0:  # a pull that only fences us for now
        return [], after_key
    known = known or []
    have = dict(known)
    bound = None if complete or not known else known[-1][0]
    bound_pos = (key_hash(bound), bound) if bound is not None else None
    page: list[tuple[str, Entry]] = []
    size = 0
    entries = replica.store.entries
    for key in replica.store.walk(ranges_within(within), after_key):
        if bound_pos is not None and (key_hash(key), key) > bound_pos:
            return page, bound
        entry = entries[key]
        held = have.get(key)
        if held is not None and held >= entry.version:
            continue
        wire = entry.wire_size(key)
        if page and (len(page) >= limit or size + wire > max_bytes):
            return page, page[-1][0]
        page.append((key, entry))
        size += wire
    return page, (page[-1][0] if page else None)
def handoff_batches(replica: Replica, keys: list[str]) -> Iterator[list[tuple[str, Entry]]]:
    """What we hand off, in batches bounded like pull pages (read as they are sent, so a
    key written meanwhile goes at its latest version)."""
    for i in range(0, len(keys), replica.limits.page_entries):
        chunk = entries_for(replica, keys[i : i + replica.limits.page_entries])
        yield from bounded(chunk, replica.limits.page_entries, replica.limits.page_bytes)


def drop_if_unchanged(replica: Replica, sent: Iterable[tuple[str, Entry]], view: View) -> None:
    """Forget keys handed off under ``view``, unless a newer version arrived since."""
    mine = view.shard_of(replica.node_id)
    for key, entry in sent:
        current = replica.store.get(key)
        if (
            current is not None
            and current.version == entry.version
            and view.shard_for(key) != mine
        ):
            replica.store.remove(key)
