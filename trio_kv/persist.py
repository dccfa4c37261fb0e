"""The persister: carries out, on one writer thread, what the replica says changed, and tells
the node when it is durable (raft's Ready: persist, then send, then answer).

The replica's store records each key it changes (``Store.changes``); ``commit`` takes those,
the clock's high-water mark and, when it changed, the view state (``snapshot.py``), queues them
and waits for the transaction that holds them.  Modes (``--durability``):

* ``batch``: everything staged while a commit is on disk joins the next one (group commit), so
  concurrent writers share one fsync and each is answered after the commit holding it.
* ``always``: one transaction (one fsync) per ``commit`` call, in order.
* ``none`` (or no ``--data-dir``): nothing is written; ``commit`` returns at once.

A write error stops the node: after a failed fsync the kernel may have dropped the pages, so
the only honest answers left are none (what PostgreSQL also does).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import trio

from . import snapshot
from .clock import Version
from .metadata import deps_to_wire
from .replica import Replica
from .storage import Applied, Row, Storage, StorageError
from .store import Entry

log = logging.getLogger("trio_kv.persist")

MODES = ("always", "batch", "none")
T = TypeVar("T")


class PersistFailed(Exception):
    """The disk refused a commit: the node must stop answering."""


@dataclass
class _Batch:
    rows: dict[str, Row | None] = field(default_factory=dict)  # None: delete the key
    meta: dict[str, str] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Persister:
    def __init__(
        self, storage: Storage | None, mode: str = "batch", keep_applied: int = 10_000,
        max_commit_seconds: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"durability must be one of {', '.join(MODES)}, not {mode!r}")
        self.storage = storage if mode != "none" else None
        self.mode = mode if storage is not None else "none"
        self._queue: deque[_Batch] = deque()
        self._last: _Batch | None = None  # the batch staged last (committed in order)
        self._wake = trio.Event()
        self._hlc = -1
        self._epochs: tuple[int, int, int] = (-1, -1, -1)
        self.state_dirty = False
        self.keep_applied = keep_applied
        self.max_commit_seconds = max_commit_seconds
        self._applied: list[Applied] = []  # answers to forwarded writes, for the next commit
        self.loaded_applied: list[Applied] = []  # what the data directory remembered
        self.commits = 0
        self.tombstones_collected = 0
        self.loaded_keys = 0
        self.load_seconds = 0.0
        self.incarnation = 0
        self.created = False
        self.closed = False  # the writer stopped: nothing staged from now on is durable
        self.stopped = trio.Event()  # the writer let go of the file
        # Tests on trio's autojump clock only: run the engine on the trio thread, since the
        # clock would jump past every timeout while a worker thread works.
        self.inline = False

    @property
    def enabled(self) -> bool:
        return self.storage is not None

    # ------------------------------------------------------------------ start-up
    async def open(self, replica: Replica, vnodes: int) -> None:
        """Load the data directory into ``replica`` (on a worker thread) and start tracking."""
        if self.storage is None:
            return
        started = time.monotonic()
        loaded = await self._off_loop(self.storage.open)
        self.created = loaded.created
        store, clock = replica.store, replica.clock
        try:
            for key, hlc, node, value, deps in loaded.rows:
                parsed = {k: Version(*v) for k, v in orjson.loads(deps).items()} if deps else {}
                store.put(key, Entry(Version(hlc, node), value, parsed))
                clock.observe(hlc)
            clock.observe(int(loaded.meta.get("hlc", "0")))
            if "state" in loaded.meta:
                snapshot.restore(replica, orjson.loads(loaded.meta["state"]), vnodes)
            self.incarnation = int(loaded.meta.get("incarnations", "0")) + 1
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{self.storage.path}: unreadable contents ({exc!r})") from exc
        self.loaded_keys = len(loaded.rows)
        self.loaded_applied = loaded.applied
        # A new incarnation is on disk before this one mints anything (ids stay unique).
        await self._off_loop(
            self.storage.commit, [], [], {"incarnations": str(self.incarnation)}
        )
        store.changes = {}
        self._hlc = clock.last
        self.load_seconds = time.monotonic() - started

    # ------------------------------------------------------------------ commits
    def _stage(self, replica: Replica) -> _Batch | None:
        """Queue what changed since the last call; the batch to wait for (None: nothing)."""
        changes = replica.store.changes
        meta: dict[str, str] = {}
        if replica.clock.last != self._hlc:
            self._hlc = replica.clock.last
            meta["hlc"] = str(self._hlc)
        epochs = (replica.epochs.epoch, replica.epochs.target, replica.epochs.seen)
        if self.state_dirty or epochs != self._epochs:
            self.state_dirty = False
            self._epochs = epochs
            meta["state"] = orjson.dumps(snapshot.dump(replica)).decode()
        applied, self._applied = self._applied, []
        if not changes and not meta and not applied:
            last = self._last
            return last if last is not None and not last.done.is_set() else None
        rows: dict[str, Row | None] = {}
        if changes:
            for key, entry in changes.items():
                rows[key] = None if entry is None else _row(key, entry)
            replica.store.changes = {}
        if self.mode == "batch" and self._queue:
            batch = self._queue[-1]  # not yet taken by the writer: ride along
            batch.rows.update(rows)
            batch.meta.update(meta)
            batch.applied += applied
        else:
            batch = _Batch(rows, meta, applied)
            self._queue.append(batch)
            self._wake.set()
        self._last = batch
        return batch

    async def commit(self, replica: Replica) -> None:
        """Return once everything the replica changed so far is on disk."""
        if self.storage is None:
            return
        if self.closed:
            raise PersistFailed("the node is stopping: nothing more is written")
        batch = self._stage(replica)
        if batch is None:
            return
        await batch.done.wait()
        if batch.error is not None:
            raise PersistFailed(str(batch.error)) from batch.error

    def remember(self, write_id: str, fingerprint: bytes, status: int, body: bytes) -> None:
        """Record the answer to a forwarded write in the next commit (with the write)."""
        if self.storage is not None:
            self._applied.append((write_id, fingerprint, status, body))

    def pending(self) -> bool:
        """True while some change is not yet durable (readers of it must wait)."""
        if self.storage is None:
            return False
        last = self._last
        return bool(self.state_dirty) or (last is not None and not last.done.is_set())

    async def run(self) -> None:
        """The writer: one transaction at a time on a worker thread, in staging order."""
        storage = self.storage
        if storage is None:
            return
        stuck = False
        try:
            while True:
                while not self._queue:
                    await self._wake.wait()
                    self._wake = trio.Event()
                batch = self._queue[0]
                upserts = [r for r in batch.rows.values() if r is not None]
                deletes = [k for k, r in batch.rows.items() if r is None]
                self._queue.popleft()  # from here on, new changes go into a new batch
                try:
                    # A disk that hangs (a stuck fsync) would hold every ack, sync claim and
                    # handoff forever: past the bound the node stops, loudly, as on an error.
                    with trio.fail_after(self.max_commit_seconds):
                        await self._off_loop(storage.commit, upserts, deletes, batch.meta,
                                             batch.applied, self.keep_applied, abandon=True)
                except Exception as exc:
                    if isinstance(exc, trio.TooSlowError):
                        stuck = True
                        exc = PersistFailed(f"a commit took over {self.max_commit_seconds:g}s "
                                            "(max_commit_seconds): the disk is not answering")
                    batch.error = exc
                    batch.done.set()
                    log.critical("commit to %s failed, stopping: %s", storage.path, exc)
                    raise PersistFailed(f"{storage.path}: {exc}") from exc
                self.commits += 1
                batch.done.set()
        finally:
            self.closed = True
            for waiting in self._queue:  # never acknowledged: a crash loses them too
                waiting.error = PersistFailed("the node stopped before this was written")
                waiting.done.set()
            if not stuck:  # else the abandoned thread still holds the file: leave it
                with trio.CancelScope(shield=True):
                    await self._off_loop(storage.close)
            self.stopped.set()

    async def _off_loop(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        if self.inline:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)

    def stats(self) -> dict[str, Any]:
        if self.storage is None:
            return {"durability": "none", "tombstones_collected": self.tombstones_collected}
        return {"durability": self.mode, "commits": self.commits,
                "tombstones_collected": self.tombstones_collected, **self.storage.stats()}


def _row(key: str, entry: Entry) -> Row:
    deps = orjson.dumps(deps_to_wire(entry.deps)) if entry.deps else None
    return key, entry.version.hlc, entry.version.node, entry.value, deps
