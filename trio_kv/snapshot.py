"""A replica's view state as JSON, and back: what a restarted node needs to rejoin its view and
resume a view change without a new ``PUT /view``.

The view served, the one being changed to, the epochs, and custody (debts, pull rounds, pulls
not yet finished, fences, views lived), with every view stored once by id.
"""

from __future__ import annotations

from typing import Any

from .handoff import Custody, Debt, DebtId, Fence, Pull, Scope
from .replica import Replica
from .view import View, parse_view


def dump(replica: Replica) -> dict[str, Any]:
    views: dict[str, Any] = {}

    def vid(view: View | None) -> str | None:
        if view is None:
            return None
        views.setdefault(view.view_id, view.to_json())
        return view.view_id

    def scope(s: Scope) -> list[Any]:
        return [vid(s[0]), s[1]]

    def debt(d: Debt) -> list[Any]:
        return [scope(d.source), scope(d.scope)]

    c = replica.custody
    return {
        "view": vid(replica.view),
        "epoch": replica.epochs.epoch,
        "target_epoch": replica.epochs.target,
        "epoch_seen": replica.epochs.seen,
        "custody": {
            "target": vid(c.target),
            "shard": c.shard,
            "debts": [debt(d) for d in c.debts.values()],
            "rounds": [[list(i), n] for i, n in c.rounds.items()],
            "unvouched": [[list(i), sorted(m)] for i, m in c.unvouched.items()],
            "pulls": [[p.member.id, debt(p.debt), p.round] for p in c.pulls.values()],
            "fences": [[vid(f.view), [scope(s) for s in f.within], sorted(f.waiting_on)]
                       for f in c.fences],
            "lived": sorted(c.lived),
        },
        "views": views,
    }


def restore(replica: Replica, state: dict[str, Any], vnodes: int) -> None:
    """Put ``replica`` back in the state ``dump`` saw (its data is loaded separately).

    Raises ``ValueError``/``KeyError``/``TypeError`` on a malformed state.
    """
    views = {vid: parse_view({"view": raw}, vnodes) for vid, raw in state["views"].items()}
    for vid, view in views.items():
        if view.view_id != vid:
            raise ValueError(f"view {vid} does not hash to its id")

    def view_of(vid: str | None) -> View | None:
        return None if vid is None else views[vid]

    def scope(raw: list[Any]) -> Scope:
        view = views[raw[0]]
        if raw[1] not in view.shards:
            raise ValueError(f"no shard {raw[1]!r} in view {raw[0]}")
        return view, str(raw[1])

    def debt(raw: list[Any]) -> Debt:
        return Debt(scope(raw[0]), scope(raw[1]))

    def ident(raw: list[Any]) -> DebtId:
        a, b, c, d = (str(x) for x in raw)
        return a, b, c, d

    cs = state["custody"]
    custody = Custody(replica.node_id)
    custody.target = view_of(cs["target"])
    custody.shard = cs["shard"]
    for raw in cs["debts"]:
        d = debt(raw)
        custody.debts[d.ident] = d
    custody.rounds = {ident(i): int(n) for i, n in cs["rounds"]}
    custody.unvouched = {ident(i): {int(m) for m in ms} for i, ms in cs["unvouched"]}
    for member_id, raw, rnd in cs["pulls"]:
        d = debt(raw)
        member = d.source[0].member(int(member_id))
        if member is None:
            raise ValueError(f"pull from {member_id}, not a member of its debt's view")
        custody.pulls[(member.id, d.ident)] = Pull(member, d, int(rnd))
    custody.fences = [
        Fence(views[v], tuple(scope(s) for s in within), {int(m) for m in waiting})
        for v, within, waiting in cs["fences"]
    ]
    custody.lived = {str(v) for v in cs["lived"]}
    replica.custody = custody
    replica.epochs.epoch = int(state["epoch"])
    replica.epochs.target = int(state["target_epoch"])
    replica.epochs.seen = int(state["epoch_seen"])
    served = view_of(state["view"])
    replica.view = served
    if served is not None:
        replica.shard = served.shard_of(replica.node_id)
        replica.peers = [
            m for m in served.shards.get(replica.shard or "", ()) if m.id != replica.node_id
        ]
