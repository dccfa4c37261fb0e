"""The sans-IO replica: every decision about data, causality and replication.

No trio, no HTTP, no clock reads: the shell passes ``now_ms`` in and moves the messages this
class builds.  Everything here is synchronous, so each method is atomic with respect to the
shell's tasks (DESIGN invariant 6: a merge changes data and summary with no await between).

Causality (per key, pruned once stable):
* A client's token holds, per key of its causal past not yet on every replica, the version it
  must observe.  A read of key k waits until this replica's version of k is >= that version
  (any version winning in the conflict order satisfies it), so reads wait only for real
  dependencies on the key read.
* A dependency is *stable* once every replica of the key's shard holds that version or a newer
  one; it is then dropped from tokens.  Stability is proven with the replication stream: peer P
  claims "seen your stream up to n", and our entry for k sits at stream position <= n.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .clock import HybridClock, Version
from .handoff import Custody, Pull, Report, Scope, in_scopes
from .messages import SyncBatch, SyncReply
from .metadata import Deps, merge_deps
from .store import Entry, Store
from .view import Member, View


@dataclass(frozen=True, slots=True)
class ReplicaLimits:
    batch_entries: int = 2000
    batch_bytes: int = 4 << 20


@dataclass(frozen=True, slots=True)
class NewerView:
    """A peer serves a different view with a higher epoch: ours is probably stale."""

    epoch: int
    view_id: str
    peer: int


class Replica:
    def __init__(self, node_id: int, origin: str, limits: ReplicaLimits | None = None) -> None:
        self.node_id = node_id
        self.origin = origin  # this incarnation's stream name: never reused across restarts
        self.limits = limits or ReplicaLimits()
        self.clock = HybridClock()
        self.store = Store()
        self.view: View | None = None
        self.shard: str | None = None
        self.peers: list[Member] = []
        self.seen: dict[str, int] = {}  # origin -> how far we merged that origin's stream
        self.claims: dict[int, int] = {}  # peer id -> how far that peer merged OUR stream
        self.peer_origin: dict[int, str] = {}
        self.custody = Custody(node_id)  # debts to old owners, fences for new ones
        self.epoch = 0  # of our view; see observe_epoch
        self.target_epoch = 0  # of the view we are changing to
        self.epoch_seen = 0  # the highest epoch peers showed for other views
        self.newer_view: NewerView | None = None
        # Tombstone collection (tombstones.py): each peer's claim on our stream as carried by
        # its own latest push (origin, claim), and the peer incarnations that were replaced.
        self.pushed: dict[int, tuple[str, int]] = {}
        self.retired: set[str] = set()
        # A dependency on a key absent here at or below this hlc names a collected tombstone.
        self.collect_horizon = 0

    # ----------------------------------------------------------------- ownership
    def owns(self, key: str) -> bool:
        return (
            self.view is not None
            and self.view.shard_for(key) == self.shard
            and self.fence_for(key) is None
        )

    def fence_for(self, key: str) -> View | None:
        """The newer view whose owners pulled ``key`` from us, if any: requests go there."""
        return self.custody.fence_for(key) if self.custody.fences else None

    def fence(self, view: View, within: list[Scope]) -> None:
        """Owners under ``view`` pulled these keys from us: from now on requests for them go
        there, or writes acknowledged here could be missed by reads there once stable."""
        self.custody.fence(view, within, self.view)

    def peer_serves(self, member: int, view_id: str) -> None:
        self.custody.peer_serves(member, view_id, self.view)

    # ----------------------------------------------------------------- epochs
    def observe_epoch(self, peer: int, epoch: int, view_id: str) -> None:
        """Epochs are Lamport clocks over view installs: a view is installed at an epoch above
        every epoch its node has heard of, and replicas of one view converge to the highest
        epoch any of them gave it.  So a peer on another view with a higher epoch installed
        it after hearing of ours, or concurrently: either way ours is not the newer one."""
        if self.view is not None and view_id == self.view.view_id:
            self.epoch = max(self.epoch, epoch)
        elif self.custody.target is not None and view_id == self.custody.target.view_id:
            self.target_epoch = max(self.target_epoch, epoch)
        else:
            self.epoch_seen = max(self.epoch_seen, epoch)
            if epoch > self.epoch and (self.newer_view is None or epoch > self.newer_view.epoch):
                self.newer_view = NewerView(epoch, view_id, peer)

    def change_epoch(self) -> int:
        """The epoch of the view we are changing to: above everything heard of so far."""
        self.target_epoch = max(self.target_epoch, self.epoch + 1, self.epoch_seen + 1)
        return self.target_epoch

    def epoch_for(self, view: View) -> int:
        """The epoch our messages about ``view`` carry: our view's, or, for the view we are
        changing to, one above every epoch heard of (so a refusal raises it)."""
        if self.view is not None and self.view.view_id == view.view_id:
            return self.epoch
        return self.change_epoch()

    def stale_puller(self, view_id: str, epoch: int) -> bool:
        """A pull for a view older than ours (another view, lower epoch).  Serving it would
        fence us, sending our keys back to owners under that older view."""
        return self.view is not None and view_id != self.view.view_id and epoch < self.epoch

    # ----------------------------------------------------------------- causality
    def unmet(self, key: str, deps: Mapping[str, Version]) -> bool:
        """True while a dependency on ``key`` is not yet visible here."""
        needed = deps.get(key)
        if needed is None:
            return False
        entry = self.store.get(key)
        if entry is None:
            return needed.hlc > self.collect_horizon
        return entry.version < needed

    def unmet_in_shard(self, deps: Mapping[str, Version]) -> list[str]:
        return [k for k in deps if self.owns(k) and self.unmet(k, deps)]

    def stable(self, key: str, version: Version) -> bool:
        entry = self.store.get(key)
        if entry is None:
            return version.hlc <= self.collect_horizon and self.owns(key)
        if entry.version < version:
            return False
        if self.custody.pulls and self.custody.unfenced(key):
            return False
        return all(self.claims.get(p.id, 0) >= entry.seq for p in self.peers)

    def prune(self, deps: Mapping[str, Version]) -> Deps:
        """Drop dependencies every replica of their (our) shard already satisfies."""
        return {k: v for k, v in deps.items() if not (self.owns(k) and self.stable(k, v))}

    # ----------------------------------------------------------------- client operations
    def read(self, key: str, deps: Deps) -> tuple[Entry | None, Deps]:
        """The current entry (maybe a tombstone) and the token to return.

        The token gains the entry's own causal past, so later reads elsewhere wait for it.
        A key never written here leaves the token unchanged.
        """
        entry = self.store.get(key)
        if entry is None:
            return None, deps
        return entry, self.prune(merge_deps(deps, entry.deps, {key: entry.version}))

    def write(self, key: str, value: str | None, deps: Deps, now_ms: int) -> Deps:
        """Apply a client write (``None`` deletes); returns the token to hand back."""
        current = self.store.get(key)
        floor = max((v.hlc for v in deps.values()), default=0)
        if current is not None:
            floor = max(floor, current.version.hlc)
        version = Version(self.clock.tick(now_ms, floor), self.node_id)
        past = self.prune({k: v for k, v in deps.items() if k != key})
        self.store.put(key, Entry(version, value, past))
        return self.prune({**past, key: version})

    def is_live(self, key: str) -> bool:
        entry = self.store.get(key)
        return entry is not None and entry.value is not None

    def items(self, deps: Deps) -> tuple[dict[str, str], Deps]:
        """Every live key of this shard, and a token covering what was returned."""
        items: dict[str, str] = {}
        pasts: list[Mapping[str, Version]] = [deps]
        current: Deps = {}
        for key, entry in self.store.entries.items():
            if not self.owns(key):
                continue
            current[key] = entry.version
            if entry.deps:
                pasts.append(entry.deps)
            if entry.value is not None:
                items[key] = entry.value
        return items, self.prune(merge_deps(*pasts, current))

    # ----------------------------------------------------------------- replication
    def has_news_for(self, peer_id: int) -> bool:
        return self.store.head > self.claims.get(peer_id, 0)

    def batch_for(self, peer_id: int) -> SyncBatch | None:
        """Our stream after what ``peer_id`` has confirmed, bounded; None without a view."""
        if self.view is None:
            return None
        after = self.claims.get(peer_id, 0)
        skip = self.peer_origin.get(peer_id)
        entries: list[tuple[str, Entry]] = []
        positions: list[int] = []
        size = 0
        upto = after
        for seq, key, entry in self.store.since(after):
            if len(entries) >= self.limits.batch_entries or size >= self.limits.batch_bytes:
                break
            upto = seq
            if entry.source == skip or not self.owns(key):
                continue  # the peer sent it to us, or it is not this shard's: nothing to ship
            entries.append((key, entry))
            positions.append(seq)
            size += entry.size
        else:
            upto = self.store.head
        return SyncBatch(
            self.node_id, self.origin, self.view.view_id, after, upto, entries, dict(self.seen),
            positions, self.epoch,
        )

    def _is_peer(self, node_id: int) -> bool:
        return any(p.id == node_id for p in self.peers)

    def on_sync(self, batch: SyncBatch) -> tuple[SyncReply, list[str]]:
        """Merge a peer's push atomically; returns the reply and the keys that changed."""
        view_id = self.view.view_id if self.view else ""
        if batch.view_id != view_id or not self._is_peer(batch.sender):
            return SyncReply(self.origin, view_id, 0, False, self.epoch), []
        claim = batch.seen.get(self.origin, 0)
        pushed = self.pushed.get(batch.sender)
        if batch.origin in self.retired or (
            pushed is not None and pushed[0] == batch.origin and claim < pushed[1]
        ):
            # Built before a push we already merged (a retried call overtaken by the next
            # one): its entries may predate deletes since collected.  Nothing in it is news.
            return SyncReply(self.origin, view_id, self.seen.get(batch.origin, 0), True,
                             self.epoch), []
        self.pushed[batch.sender] = (batch.origin, claim)
        self.claims[batch.sender] = claim
        previous = self.peer_origin.get(batch.sender)
        if previous is not None and previous != batch.origin:
            self.seen.pop(previous, None)  # the peer restarted: its old stream is gone
            self.retired.add(previous)
        self.peer_origin[batch.sender] = batch.origin
        # A key fenced here (a new owner pulled it) is not merged, and our confirmation stops
        # just before it: confirming past it would let the sender count a write we will
        # neither serve nor hand on as being on every replica, and prune it from tokens.
        accepted, upto = batch.entries, batch.upto
        for i, (key, _entry) in enumerate(batch.entries):
            if self.fence_for(key):
                accepted, upto = batch.entries[:i], batch.positions[i] - 1
                break
        changed = self.merge(accepted, source=batch.origin, own_only=True)
        if batch.after <= self.seen.get(batch.origin, 0) < upto:
            self.seen[batch.origin] = upto
        seen = self.seen.get(batch.origin, 0)
        return SyncReply(self.origin, view_id, seen, True, self.epoch), changed

    def on_sync_reply(self, peer_id: int, reply: SyncReply) -> None:
        if reply.accepted and self.view is not None and reply.view_id == self.view.view_id:
            self.claims[peer_id] = reply.seen
            self.peer_origin[peer_id] = reply.origin

    def merge(
        self, entries: Iterable[tuple[str, Entry]], source: str = "", own_only: bool = False
    ) -> list[str]:
        """Last-writer-wins merge of received versions (copied: the store owns its entries)."""
        changed = []
        for key, entry in entries:
            if own_only and not self.owns(key):
                continue
            self.clock.observe(entry.version.hlc)
            if self.store.put(key, Entry(entry.version, entry.value, entry.deps, source=source)):
                changed.append(key)
        return changed

    # ----------------------------------------------------------------- view change
    def awaiting_handoff(self, key: str | None) -> bool:
        """True while ``key`` (any key, for None) may have writes, even stable ones, that its
        old owners have not handed over yet: answering from here could miss them."""
        return self.custody.awaiting(key)

    def begin_change(self, old: View | None, new: View, held_data: bool) -> list[Pull]:
        """The pulls that give us custody of our range under ``new`` (see ``Custody``)."""
        self.change_epoch()
        return self.custody.begin(old, new, held_data)

    def pulled(self, pull: Pull, report: Report) -> list[Pull]:
        """The pull finished; returns the pulls its source's report adds (see ``Custody``)."""
        return self.custody.pulled(pull, report)

    def install_view(self, view: View) -> None:
        """Serve ``view`` from now on.

        Every stream summary is reset (DESIGN invariant 5): claims about what a peer holds were
        made for the old keyspace, so they are re-earned by a full exchange under the new one.
        """
        if self.view is None or self.view.view_id != view.view_id:
            self.custody.installed(view)
            self.epoch = self.change_epoch()
            if self.newer_view is not None and (
                self.newer_view.view_id == view.view_id or self.newer_view.epoch < self.epoch
            ):
                self.newer_view = None
        self.custody.target = view
        self.view = view
        self.shard = view.shard_of(self.node_id)
        self.peers = [m for m in view.shards.get(self.shard or "", ()) if m.id != self.node_id]
        self.seen = {}
        self.claims = {}
        self.peer_origin = {}
        self.pushed = {}
        for entry in self.store.entries.values():
            entry.source = ""

    def foreign_keys(self, view: View) -> dict[str, list[str]]:
        """Keys held here whose owner under ``view`` is another shard, by target shard."""
        mine = view.shard_of(self.node_id)
        out: dict[str, list[str]] = defaultdict(list)
        for key in self.store.entries:
            shard = view.shard_for(key)
            if shard != mine:
                out[shard].append(key)
        return dict(out)

    def entries_for(self, keys: Iterable[str]) -> list[tuple[str, Entry]]:
        return [(k, e) for k in keys if (e := self.store.get(k)) is not None]

    def pull_page(
        self, within: list[Scope], after_key: str, limit: int
    ) -> tuple[list[tuple[str, Entry]], str | None]:
        """Entries held here in every scope of ``within``, in key order, after a cursor."""
        keys = sorted(
            k for k in self.store.entries if k > after_key and in_scopes(k, within)
        )
        page = keys[:limit]
        more = page[-1] if len(keys) > limit else None
        return self.entries_for(page), more

    def drop_if_unchanged(self, sent: Iterable[tuple[str, Entry]], view: View) -> None:
        """Forget keys handed off under ``view``, unless a newer version arrived since."""
        mine = view.shard_of(self.node_id)
        for key, entry in sent:
            current = self.store.get(key)
            if (
                current is not None
                and current.version == entry.version
                and view.shard_for(key) != mine
            ):
                self.store.remove(key)
