"""Start-up of a node's durable state, and the tombstone collector (shell side).

Load the data directory, rejoin the view it recorded (no new ``PUT /view``), resume a view
change that was under way, then catch up from peers as any restarted replica does: peers see a
new stream incarnation and resend what it may lack.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from .config import Config
from .messages import dumps
from .persist import Persister
from .replica import Replica
from .storage import Storage
from .tombstones import collect, horizon

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("trio_kv.recovery")


class Durable:
    """The durability half of a node (a mixin of ``Node``): the persister, start-up recovery,
    and the one wait every answer that claims data makes (``durable``)."""

    config: Config
    replica: Replica
    persist: Persister

    def _persister(self) -> Persister:
        cfg = self.config
        assert cfg.node_id is not None
        durable = bool(cfg.data_dir) and cfg.durability != "none"
        storage = Storage(cfg.data_dir, cfg.node_id) if durable else None
        self.persist = Persister(storage, cfg.durability, cfg.dedup_entries)
        return self.persist

    async def _recover(self, nursery: trio.Nursery) -> None:
        await recover(self, nursery)  # type: ignore[arg-type]

    async def durable(self) -> None:
        """Return once every change made so far is on disk (at once without a data dir)."""
        if self.persist.enabled:
            await self.persist.commit(self.replica)


class AppliedAnswers(OrderedDict[tuple[str, bytes], Any]):
    """Answers to forwarded writes by (write id, fingerprint), each also staged for the next
    commit (the write's own): a retry after a restart must not apply the write twice."""

    def __init__(self, persist: Persister) -> None:
        super().__init__()
        self.persist = persist

    def __setitem__(self, key: tuple[str, bytes], reply: Any) -> None:
        super().__setitem__(key, reply)
        if self.persist.enabled and getattr(reply, "status", 0) == 200:
            body = reply.raw if reply.raw is not None else dumps(reply.payload)
            self.persist.remember(key[0], key[1], reply.status, body)

    def restore(self, key: tuple[str, bytes], reply: Any) -> None:
        super().__setitem__(key, reply)


async def recover(node: Node, nursery: trio.Nursery) -> None:
    from .node import Reply

    cfg = node.config
    persist, replica = node.persist, node.replica
    if not persist.enabled:
        reason = "durability none" if cfg.data_dir else "no --data-dir"
        log.warning("node %s: data in memory only (%s): a restart starts empty",
                    node.node_id, reason)
    else:
        await persist.open(replica, cfg.vnodes)
        # A fresh stream name per start; the persisted count keeps it unique even if the
        # wall clock went back.
        replica.origin = f"{node.node_id}.{persist.incarnation}.{replica.origin.split('.', 1)[1]}"
        nursery.start_soon(persist.run)
        applied = node._applied
        assert isinstance(applied, AppliedAnswers)
        for write_id, fingerprint, status, body in persist.loaded_applied:
            applied.restore((write_id, fingerprint), Reply(status, raw=body))
        view, target = replica.view, replica.custody.target
        log.info(
            "node %s: %s %s (%s mode): %d keys loaded in %.2fs, view %s, epoch %s", node.node_id,
            "created" if persist.created else "opened", persist.storage and persist.storage.path,
            persist.mode, persist.loaded_keys, persist.load_seconds,
            view.view_id if view else None, replica.epoch,
        )
        if view is not None:
            node._installs += 1
            node._finish_progress()  # handoffs or pulls left unfinished are retried
        if target is not None and (view is None or target.view_id != view.view_id):
            log.info("node %s: resuming the change to view %s", node.node_id, target.view_id)
            nursery.start_soon(node.put_view, target)
    nursery.start_soon(node._supervise, "tombstone collector", _collector, node)


async def _collector(node: Node) -> None:
    """Every ``tombstone_interval``, drop tombstones ``tombstones.collectable`` allows."""
    cfg = node.config
    grace_ms = int(cfg.tombstone_grace * 1000)
    while True:
        now = node.wall_ms()
        replica = node.replica
        replica.collect_horizon = max(replica.collect_horizon, horizon(now, grace_ms))
        settled = node._ready.is_set() and node.progress.state == "idle"
        keys = collect(replica, now, grace_ms, settled)
        if keys:
            node.persist.tombstones_collected += len(keys)
            log.debug("node %s: collected %d tombstones", node.node_id, len(keys))
            await node.durable()
        await trio.sleep(cfg.tombstone_interval)
