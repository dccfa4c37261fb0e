"""The on-disk engine: one SQLite file in WAL mode per node (``<data-dir>/kv.sqlite``).

Synchronous and blocking by design: every function here runs on a worker thread (see
``persist.py``), never on the trio thread while requests are served.

Why SQLite: it is in the standard library, crash-safe (WAL, ``synchronous=FULL``: a commit is
on disk when ``COMMIT`` returns), checks itself (``PRAGMA quick_check``), and group commit makes
its per-commit fsync cost irrelevant under concurrency (measurements in docs/DESIGN.md).

A file is never silently empty: it is created under a temporary name with its format row and
renamed into place, so a ``kv.sqlite`` without a format row, or one SQLite cannot read, is
damaged and refused with an error that names it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "trio-kv/1"  # bump on any change to the schema or to what a row means
FILENAME = "kv.sqlite"

Row = tuple[str, int, int, str | None, bytes | None]
"""(key, hlc, node, value or None for a tombstone, deps as JSON bytes or None)."""
Applied = tuple[str, bytes, int, bytes]
"""(write id, request fingerprint, status, body): the answer to a forwarded write, so a retry
is not applied twice."""


class StorageError(Exception):
    """The data directory cannot be used; the message names the file and why."""


@dataclass
class Loaded:
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)  # oldest first
    created: bool = False  # a new, empty data directory


_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE kv (
    key TEXT PRIMARY KEY, hlc INTEGER NOT NULL, node INTEGER NOT NULL,
    value TEXT, deps BLOB
) WITHOUT ROWID;
CREATE TABLE applied (
    seq INTEGER PRIMARY KEY, write_id TEXT NOT NULL, fingerprint BLOB NOT NULL,
    status INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (write_id, fingerprint)
);
"""


class Storage:
    """One connection, used by one thread at a time (the persister serialises commits)."""

    def __init__(self, data_dir: str | os.PathLike[str], node_id: int, sync: bool = True) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / FILENAME
        self.node_id = node_id
        self.sync = sync
        self.conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ open and load
    def open(self) -> Loaded:
        """Open (creating a fresh file if there is none), check, and load everything."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.dir}: cannot create the data directory: {exc}") from exc
        created = not self.path.exists()
        if created:
            self._create()
        try:
            loaded = self._load()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StorageError(f"{self.path}: damaged or not a trio-kv data file ({exc}); "
                               "restore it or move it away to start this node empty") from exc
        loaded.created = created
        return loaded

    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a commit that returned survives power
        # loss; NORMAL would only survive a process crash.
        conn.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'OFF'}")
        return conn

    def _create(self) -> None:
        tmp = self.path.with_name(FILENAME + ".new")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO meta VALUES (?, ?)",
                             [("format", FORMAT), ("node_id", str(self.node_id))])
            conn.execute("COMMIT")
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _load(self) -> Loaded:
        if self.path.stat().st_size == 0:
            raise StorageError(f"{self.path}: empty file (truncated?); a trio-kv data file "
                               "always holds its format row")
        self.conn = conn = self._connect(self.path)
        check = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise StorageError(f"{self.path}: failed its integrity check: {'; '.join(check[:5])}")
        try:
            meta = dict(conn.execute("SELECT name, value FROM meta"))
        except sqlite3.OperationalError as exc:
            raise StorageError(f"{self.path}: not a trio-kv data file ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise StorageError(f"{self.path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                               "(damaged, or written by another version)")
        if meta.get("node_id") != str(self.node_id):
            raise StorageError(f"{self.path}: belongs to node {meta.get('node_id')}, not to node "
                               f"{self.node_id}")
        rows: list[Row] = list(conn.execute("SELECT key, hlc, node, value, deps FROM kv"))
        applied: list[Applied] = list(
            conn.execute("SELECT write_id, fingerprint, status, body FROM applied ORDER BY seq")
        )
        return Loaded(rows, meta, applied)

    # ------------------------------------------------------------------ write
    def commit(self, upserts: Iterable[Row], deletes: Iterable[str], meta: dict[str, str],
               applied: Iterable[Applied] = (), keep_applied: int = 10_000) -> None:
        """One transaction; durable when it returns (with ``sync``).  Of the answers to
        forwarded writes, the newest ``keep_applied`` are kept."""
        conn = self.conn
        assert conn is not None, "open() first"
        conn.execute("BEGIN")
        try:
            conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)", upserts)
            conn.executemany("DELETE FROM kv WHERE key = ?", ((k,) for k in deletes))
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            if applied:
                conn.executemany(
                    "INSERT OR REPLACE INTO applied (write_id, fingerprint, status, body) "
                    "VALUES (?, ?, ?, ?)",
                    applied,
                )
                conn.execute("DELETE FROM applied WHERE seq <= "
                             "(SELECT MAX(seq) FROM applied) - ?", (keep_applied,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def stats(self) -> dict[str, Any]:
        """Bytes on disk (main file and WAL), for GET /view and the bench."""
        sizes = {}
        for name in (FILENAME, FILENAME + "-wal"):
            p = self.dir / name
            sizes[name] = p.stat().st_size if p.exists() else 0
        return {"path": str(self.path), "bytes": sum(sizes.values())}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
