"""Start-up of a node's durable state, and the tombstone collector (shell side).

Load the data directory, rejoin the view it recorded (no new ``PUT /view``), resume a view
change that was under way, then catch up from peers as any restarted replica does: peers see a
new stream incarnation and resend what it may lack.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .tombstones import collect, horizon

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("trio_kv.recovery")


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
        for write_id, status, body in persist.loaded_applied:
            node._applied[write_id] = Reply(status, raw=body)
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
            node._ready = trio.Event()  # data requests wait for the change, as before the crash
            nursery.start_soon(node.put_view, target)
    nursery.start_soon(_collector, node)


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
            node.tombstones_collected += len(keys)
            log.debug("node %s: collected %d tombstones", node.node_id, len(keys))
            await node._durable()
        await trio.sleep(cfg.tombstone_interval)
