"""Start-up of a node's durable state (shell side): the persister, loading the data
directory, and handing the core what it recovered.

Load the data directory, rejoin the view it recorded (no new ``PUT /view``), resume a view
change that was under way (the core decides: ``Core.recovered``), then catch up from peers as
any restarted replica does: peers see a new stream incarnation and resend what it may lack.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from .config import Config
from .messages import dumps
from .persist import Persister
from .storage import Storage

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("trio_kv.recovery")


def persister(cfg: Config) -> Persister:
    assert cfg.node_id is not None
    durable = bool(cfg.data_dir) and cfg.durability != "none"
    storage = Storage(cfg.data_dir, cfg.node_id) if durable else None
    return Persister(storage, cfg.durability, cfg.dedup_entries, cfg.max_commit_seconds)


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
    from .core import Reply

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
        applied = node.core.requests.applied
        assert isinstance(applied, AppliedAnswers)
        for write_id, fingerprint, status, body in persist.loaded_applied:
            applied.restore((write_id, fingerprint), Reply(status, raw=body))
        view = replica.view
        log.info(
            "node %s: %s %s (%s mode): %d keys loaded in %.2fs, view %s, epoch %s", node.node_id,
            "created" if persist.created else "opened", persist.storage and persist.storage.path,
            persist.mode, persist.loaded_keys, persist.load_seconds,
            view.view_id if view else None, replica.epoch,
        )
    node.recovered()
