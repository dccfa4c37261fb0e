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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .clock import HybridClock, Version
from .epochs import Epochs
from .handoff import Custody, Pull
from .messages import SyncBatch, SyncReply, WireError
from .metadata import Deps, TokenRules, merge_deps
from .store import Entry, Store
from .view import Member, View


@dataclass(frozen=True, slots=True)
class ReplicaLimits:
    batch_entries: int = 2000
    batch_bytes: int = 4 << 20  # one sync batch, encoded
    page_entries: int = 1000  # one handoff batch or pull page
    page_bytes: int = 4 << 20
    token: TokenRules = field(default_factory=TokenRules)



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
        self.epochs = Epochs()
        # Tombstone collection (tombstones.py): each peer's claim on our stream as carried by
        # its own latest push (origin, claim), and the peer incarnations that were replaced.
        self.pushed: dict[int, tuple[str, int]] = {}
        self.retired: set[str] = set()
        # A dependency on a key absent here at or below this hlc names a collected tombstone.
        self.collect_horizon = 0
        # Installs so far: an entry's ``source`` names the stream it came from under this one
        # (older tags count as none), so installing a view need not walk the store.
        self.generation = 0

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

    def peer_serves(self, member: int, view_id: str) -> bool:
        """A member of a fencing view serves ours; True if a fence lifted.

        While fenced, our pushes skipped the fenced keys yet covered their stream positions,
        so a peer's confirmation says nothing about them.  Lifted, they are ours again: they
        take new positions, are pushed again and count as stable only once confirmed (the
        simulator found a read served stale after a fence lifted, staggered views)."""
        before = list(self.custody.fences)
        self.custody.peer_serves(member, view_id, self.view)
        lifted = [f for f in before if all(f is not g for g in self.custody.fences)]
        if not lifted:
            return False
        for key in [k for k in self.store.entries if any(f.covers(k) for f in lifted)]:
            self.store.touch(key)
        return True

    # ----------------------------------------------------------------- epochs
    @property
    def epoch(self) -> int:
        """Our view's epoch (``epochs.py``): every peer message carries it."""
        return self.epochs.epoch

    def observe_epoch(self, peer: int, epoch: int, view_id: str) -> None:
        target = self.custody.target
        self.epochs.observe(peer, epoch, view_id, self.view.view_id if self.view else None,
                            target.view_id if target else None)

    def epoch_for(self, view: View) -> int:
        """The epoch our messages about ``view`` carry: our view's, or, for the view we are
        changing to, one above every epoch heard of (so a refusal raises it)."""
        if self.view is not None and self.view.view_id == view.view_id:
            return self.epoch
        return self.epochs.change()

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

    def foreign(self, entry: Entry) -> list[str]:
        """The keys of other shards ``entry`` depends on: only their owners can prove those
        dependencies stable (``core/crossdeps.py`` asks them)."""
        view, shard = self.view, self.shard
        if view is None or shard is None or not entry.deps:
            return []
        return [k for k in entry.deps if view.shard_for(k) != shard]

    def answer_stable(self, deps: Iterable[tuple[str, Version]]) -> list[bool]:
        """Another shard asks which of these are stable here: exactly what ``prune`` drops."""
        return [self.owns(k) and self.stable(k, v) for k, v in deps]

    def drop_deps(self, key: str, stable: Mapping[str, Version]) -> int:
        """Drop from ``key``'s stored causal past every dependency at or below a version its
        owner said is stable (monotone in the version: a replica holding v or newer also holds
        something at or above every older version).  Not restamped: the entry's
        version and stream position are unchanged, and the information dropped is redundant;
        not persisted either (a restart asks again).  Returns how many were dropped."""
        entry = self.store.get(key)
        if entry is None or not entry.deps:
            return 0
        kept = {k: v for k, v in entry.deps.items() if not (k in stable and v <= stable[k])}
        dropped = len(entry.deps) - len(kept)
        if dropped:
            entry.deps = kept
            entry.encoded = -1  # its wire size changed
        return dropped

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

    def write(self, key: str, value: str | None, deps: Deps, now_ms: int) -> Deps | None:
        """Apply a client write (``None`` deletes); returns the token to hand back, or None
        (nothing written) when that token would exceed the token limits: every reader of
        the value gets its dependencies, so they are bounded like any token.

        The version is above every dependency and the key's current version whatever our
        clock says, so a write after a read always wins."""
        current = self.store.get(key)
        floor = max((v.hlc for v in deps.values()), default=0)
        if current is not None:
            floor = max(floor, current.version.hlc)
        past = self.prune({k: v for k, v in deps.items() if k != key})
        version = Version(self.clock.peek(now_ms, floor), self.node_id)
        if not self.limits.token.fits({**past, key: version}):
            return None
        self.clock.tick(now_ms, floor)
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

    def _ships(self, peer_id: int) -> Callable[[str, Entry], bool]:
        """Whether ``batch_for`` sends ``peer_id`` an entry: not one the peer sent us, and
        of our shard."""
        origin = self.peer_origin.get(peer_id)
        skip = f"{self.generation}/{origin}" if origin is not None else None
        return lambda key, entry: entry.source != skip and self.owns(key)

    def to_ship(self, peer_id: int, after: int) -> bool:
        """Whether our stream after position ``after`` holds an entry to send ``peer_id``."""
        ships = self._ships(peer_id)
        return any(ships(key, entry) for _seq, key, entry in self.store.since(after))

    def batch_for(self, peer_id: int, max_bytes: int = 0) -> SyncBatch | None:
        """Our stream after what ``peer_id`` has confirmed, bounded in entries and encoded
        bytes (``max_bytes``, when a peer refused a larger batch); None without a view."""
        if self.view is None:
            return None
        limit = min(max_bytes or self.limits.batch_bytes, self.limits.batch_bytes)
        after = self.claims.get(peer_id, 0)
        ships = self._ships(peer_id)
        entries: list[tuple[str, Entry]] = []
        positions: list[int] = []
        size = 0
        upto = after
        for seq, key, entry in self.store.since(after):
            if not ships(key, entry):
                upto = seq
                continue  # the peer sent it to us, or it is not this shard's: nothing to ship
            wire = entry.wire_size(key)
            if entries and (len(entries) >= self.limits.batch_entries or size + wire > limit):
                break
            upto = seq
            entries.append((key, entry))
            positions.append(seq)
            size += wire
        else:
            upto = self.store.head
        return SyncBatch(
            self.node_id, self.origin, self.view.view_id, after, upto, entries, dict(self.seen),
            positions, self.epoch,
        )

    def on_sync(self, batch: SyncBatch) -> tuple[SyncReply, list[str]]:
        """Merge a peer's push atomically; returns the reply and the keys that changed."""
        view_id = self.view.view_id if self.view else ""
        if batch.view_id != view_id or all(p.id != batch.sender for p in self.peers):
            return SyncReply(self.origin, view_id, 0, False, self.epoch), []
        claim = batch.seen.get(self.origin, 0)
        if claim > self.store.head:
            # Believing it would count writes the peer never got as stable (and prune them).
            raise WireError(
                f"node {batch.sender} claims position {claim} of our stream; it is at "
                f"{self.store.head}"
            )
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
        changed = self.merge(accepted, source=f"{self.generation}/{batch.origin}",
                             own_only=True)
        if batch.after <= self.seen.get(batch.origin, 0) < upto:
            self.seen[batch.origin] = upto
        seen = self.seen.get(batch.origin, 0)
        return SyncReply(self.origin, view_id, seen, True, self.epoch), changed

    def on_sync_reply(self, peer_id: int, reply: SyncReply) -> bool:
        """Note how far the peer merged our stream; True if that is further than before."""
        if reply.accepted and self.view is not None and reply.view_id == self.view.view_id:
            before = self.claims.get(peer_id, 0)
            self.claims[peer_id] = min(reply.seen, self.store.head)
            self.peer_origin[peer_id] = reply.origin
            return self.claims[peer_id] > before
        return False

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
    def begin_change(self, old: View | None, new: View, held_data: bool) -> list[Pull]:
        """The pulls that give us custody of our range under ``new`` (see ``Custody``)."""
        self.epochs.change()
        return self.custody.begin(old, new, held_data)

    def install_view(self, view: View) -> None:
        """Serve ``view`` from now on.

        Every stream summary is reset (DESIGN invariant 5): claims about what a peer holds were
        made for the old keyspace, so they are re-earned by a full exchange under the new one.
        """
        if self.view is None or self.view.view_id != view.view_id:
            self.custody.installed(view)
            self.epochs.installed(view.view_id)
        self.custody.target = view
        self.view = view
        self.shard = view.shard_of(self.node_id)
        self.peers = [m for m in view.shards.get(self.shard or "", ()) if m.id != self.node_id]
        self.seen = {}
        self.claims = {}
        self.peer_origin = {}
        self.pushed = {}
        self.generation += 1  # every entry's source is forgotten

