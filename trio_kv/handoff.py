"""Custody of keys across view changes (pure: no I/O, no time).

Which old owners a node must pull the keys it newly owns from, when it may serve them, and
what it tells nodes that pull from it in turn.

The rule that keeps causality: a write may already be pruned from every client's token as
stable, and then only the members of the shard that held it have it.  A node may serve a key
only once some member of *every* shard that could hold such a write for it has handed the key
over.  Those obligations are ``Debt``s.  They are kept across view changes until settled, and a
node that is pulled from reports its own unsettled debts, so they pass down a chain of changes
(A -> B -> C when B never got A's keys) instead of being forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from .view import Member, View, shards_within

Scope = tuple[View, str]
"""The keys ``view`` assigns to ``shard``."""

DebtId = tuple[str, str, str, str]


def _same(a: Scope, b: Scope) -> bool:
    return a[0].view_id == b[0].view_id and a[1] == b[1]


def in_scopes(key: str, scopes: Iterable[Scope]) -> bool:
    return all(view.shard_for(key) == shard for view, shard in scopes)


@dataclass(frozen=True)
class Debt:
    """Keys of ``source`` that also fall in ``scope`` (the range this node took custody of)
    may have writes only ``source``'s members hold; they are not served here until one of
    those members has handed them over."""

    source: Scope
    scope: Scope

    @cached_property
    def ident(self) -> DebtId:
        return (self.source[0].view_id, self.source[1], self.scope[0].view_id, self.scope[1])

    @property
    def within(self) -> tuple[Scope, Scope]:
        return (self.source, self.scope)

    def covers(self, key: str) -> bool:
        return in_scopes(key, self.within)

    def members(self) -> tuple[Member, ...]:
        view, shard = self.source
        return view.shards[shard]


@dataclass(frozen=True)
class Report:
    """What a node that was pulled from vouches for: it holds every write that could have been
    pruned as stable for the keys ``view`` assigns to ``shard``, except the keys of ``debts``.
    ``view`` is the view it serves or is changing to (None: it never had one)."""

    view: View | None
    shard: str | None
    debts: tuple[Scope, ...] = ()


@dataclass
class Fence:
    """Keys in every scope of ``within`` were pulled from us by owners under ``view``: we
    forward them there.  ``waiting_on`` are those owners not yet seen serving our own view."""

    view: View
    within: tuple[Scope, ...]
    waiting_on: set[int]

    def covers(self, key: str) -> bool:
        return in_scopes(key, self.within)

    def owners(self) -> list[Scope]:
        """Shards of ``view`` holding the fenced keys now."""
        return [(self.view, s) for s in sorted(shards_within(self.view, self.within))]


@dataclass(frozen=True, eq=False)
class Pull:
    """Fetch ``debt``'s keys from ``member``.  ``round`` counts how often the debt had been
    owed when the pull began: a pull begun before the debt was owed again cannot settle it
    (a key may have been handed on and dropped in between), and repeated rounds back off."""

    member: Member
    debt: Debt
    round: int


@dataclass
class Custody:
    """One node's debts (incoming) and fences (outgoing)."""

    node_id: int
    target: View | None = None  # the view served, or being changed to
    shard: str | None = None
    debts: dict[DebtId, Debt] = field(default_factory=dict)  # not yet settled
    rounds: dict[DebtId, int] = field(default_factory=dict)  # times owed, while any pending
    unvouched: dict[DebtId, set[int]] = field(default_factory=dict)  # members owing it too
    pulls: dict[tuple[int, DebtId], Pull] = field(default_factory=dict)  # not yet finished
    fences: list[Fence] = field(default_factory=list)
    lived: set[str] = field(default_factory=set)  # views this incarnation installed
    reached: set[Pull] = field(default_factory=set)  # pulls answered once: member fenced

    # ----------------------------------------------------------------- incoming
    def begin(self, old: View | None, new: View, held_data: bool) -> list[Pull]:
        """Start taking custody of our range under ``new``; returns the pulls to make.

        ``old`` is the view our keys came from (ours, or one learned from peers; None for a
        fresh cluster).  Unsettled debts of earlier changes are kept: the keys they cover may
        be ours again, or may be pulled from us by their new owners.
        """
        self.target, self.shard = new, new.shard_of(self.node_id)
        if self.shard is None:
            return []
        scope: Scope = (new, self.shard)
        sources: list[Scope]
        started: list[Pull] = []
        if old is None:
            # Fresh, or restarted empty: our shard's peers may hold writes pruned as stable.
            sources = [scope]
        else:
            sources = [(old, s) for s in sorted(shards_within(old, [scope]))]
            mine = old.shard_of(self.node_id)
            if held_data and mine is not None and any(s == mine for _v, s in sources):
                sources = [(v, s) for v, s in sources if s != mine]
                started += self._fence_departed(Debt((old, mine), scope), new)
        for source in sources:
            started += self._owe(Debt(source, scope), amnesiac=old is None or not held_data)
        for source in self._fenced_owners(scope):
            started += self._owe(Debt(source, scope))
        return started

    def _fenced_owners(self, scope: Scope) -> list[Scope]:
        """Keys pulled from us by a view we then skipped may have changed at their new owners."""
        return [
            owner for f in self.fences for owner in f.owners()
            if shards_within(owner[0], [owner, *f.within, scope])
        ]

    def _fence_departed(self, debt: Debt, new: View) -> list[Pull]:
        """We hold our old shard's keys, but its members that leave our shard still serve them
        until they install ``new``: pull from them too (which fences them), owing nothing.
        Until then our writes to those keys are not counted as stable (``unfenced``)."""
        departed = [
            m for m in debt.members()
            if m.id != self.node_id and new.shard_of(m.id) != self.shard
        ]
        return self._pull_from(debt, departed) if departed else []

    def _pull_from(self, debt: Debt, members: list[Member]) -> list[Pull]:
        """Pulls of ``debt`` from ``members``, in a new round (one in flight restarts when
        it finishes)."""
        rnd = self.rounds[debt.ident] = self.rounds.get(debt.ident, 0) + 1
        self.unvouched.pop(debt.ident, None)
        started = []
        for member in members:
            if (member.id, debt.ident) not in self.pulls:
                started.append(pull := Pull(member, debt, rnd))
                self.pulls[(member.id, debt.ident)] = pull
        return started

    def _owe(self, debt: Debt, amnesiac: bool = False) -> list[Pull]:
        """Owe ``debt`` unless we hold what it stands for: if we are a member of its shard in
        a view this incarnation installed (or is installing), every write that became stable
        there was confirmed by us, so we hold it or handed it on (which our report tells).
        ``amnesiac``: this node holds nothing of its own past (fresh, or restarted empty)."""
        if debt.ident in self.debts:
            return []
        view, _shard = debt.source
        lived = view.view_id in self.lived or (
            self.target is not None and view.view_id == self.target.view_id
        )
        if not amnesiac and lived and any(m.id == self.node_id for m in debt.members()):
            return []
        others = [m for m in debt.members() if m.id != self.node_id]
        if not others:  # we were its only member: what it held, we hold
            return []
        self.debts[debt.ident] = debt
        return self._pull_from(debt, others)

    def pulled(self, pull: Pull, report: Report) -> list[Pull]:
        """``pull`` fetched every key of its debt its member holds; the member vouched with
        ``report``.

        Settles the debt (one member is enough), and takes on what the member could not
        vouch for: the keys its view gives other shards, and its own debts.  Returns the pulls
        to make next.
        """
        key = (pull.member.id, pull.debt.ident)
        if self.pulls.get(key) is not pull:
            return []
        del self.pulls[key]
        self.reached.discard(pull)
        debt = pull.debt
        if pull.round != self.rounds.get(debt.ident):  # owed again meanwhile: pull again
            again = self.pulls[key] = Pull(pull.member, debt, self.rounds[debt.ident])
            return [again]
        started: list[Pull] = []
        if debt.ident in self.debts:
            inherited: list[Scope] = list(report.debts)
            if report.view is not None:
                inherited += [
                    (report.view, s) for s in sorted(shards_within(report.view, debt.within))
                    if s != report.shard
                ]
            vouches = True
            for source in inherited:
                if _same(source, debt.source):
                    vouches = False  # it owes that shard itself (it never installed that view)
                elif shards_within(source[0], [source, *debt.within]):
                    started += self._owe(Debt(source, debt.scope))
            # A member that owes the debt's own shard cannot settle it; but once every other
            # member has been pulled, we hold all they hold, which is every write that shard
            # could have made stable (each member confirmed it).
            heard = self.unvouched.setdefault(debt.ident, set())
            if not vouches:
                heard.add(pull.member.id)
            others = {m.id for m in debt.members() if m.id != self.node_id}
            if vouches or heard >= others:
                del self.debts[debt.ident]
                del self.unvouched[debt.ident]
        if not self.debts and not self.pulls:
            self.rounds.clear()
            self.unvouched.clear()
        return started

    def awaiting(self, key: str | None) -> bool:
        """True while ``key`` (any key, for None) may have writes we were not handed yet."""
        if not self.debts:
            return False
        return key is None or any(d.covers(key) for d in self.debts.values())

    def unfenced(self, key: str) -> bool:
        """True while an old owner of ``key`` has not been pulled from (and so fenced): it may
        still serve the key, so a write here must stay in tokens, not be pruned as stable."""
        return any(p.debt.covers(key) for p in self.pulls.values() if p not in self.reached)

    def answered(self, pull: Pull) -> None:
        """``pull``'s member answered a page of it, so it is fenced for the pull's keys (it
        made the fence durable first): writes here need not wait for the rest of the pull
        to count as stable.  Not persisted: after a restart, every pull counts again."""
        if self.pulls.get((pull.member.id, pull.debt.ident)) is pull:
            self.reached.add(pull)

    def pending_members(self) -> list[int]:
        return sorted({m for m, _ in self.pulls})

    def pending(self) -> list[Pull]:
        """Every pull not yet finished, to (re)start."""
        return list(self.pulls.values())

    # ----------------------------------------------------------------- outgoing
    def report(self) -> Report:
        owed = [d.source for d in self.debts.values()]
        owed += [owner for f in self.fences for owner in f.owners()]
        return Report(self.target, self.shard, tuple(owed))

    def fence(self, view: View, within: Sequence[Scope], current: View | None) -> None:
        """Owners under ``view`` pulled the keys of ``within`` from us (on ``current``)."""
        if current is None or current.view_id == view.view_id:
            return
        within = tuple(within)
        ids = [(v.view_id, s) for v, s in within]
        for f in self.fences:
            if f.view.view_id == view.view_id and [(v.view_id, s) for v, s in f.within] == ids:
                return
        fence = Fence(view, within, set())
        fence.waiting_on = {
            m.id for _v, s in fence.owners() for m in view.shards[s] if m.id != self.node_id
        }
        self.fences.append(fence)

    def fence_for(self, key: str) -> View | None:
        for f in self.fences:
            if f.covers(key):
                return f.view
        return None

    def peer_serves(self, member: int, view_id: str, current: View | None) -> None:
        """Once every owner of a fence's keys serves our own view, the fence is moot."""
        if current is None or view_id != current.view_id:
            return
        for f in self.fences:
            f.waiting_on.discard(member)
        self.fences = [f for f in self.fences if f.waiting_on]

    def installed(self, view: View) -> None:
        """Serving ``view`` now: fences become debts for whatever of their keys we own."""
        self.lived.add(view.view_id)
        shard = view.shard_of(self.node_id)
        if shard is not None:
            for owner in self._fenced_owners((view, shard)):
                self._owe(Debt(owner, (view, shard)))
        self.fences = []
