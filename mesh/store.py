"""SQLite persistence of the replicated state's accepted entries (stdlib sqlite3, WAL).

The daemon saves what `MeshState.apply` accepts and, on start, feeds the stored entries
back through `MeshState.apply`, so every entry is verified again and nothing on disk is
trusted more than a peer would be.

Rule 1: synchronous and blocking; the daemon calls it off the event loop
(`trio.to_thread.run_sync`). One connection, serialised by a lock, so any thread may call.
Rule 2: every write is one transaction: a crash leaves the old rows or the new ones,
never half (WAL journal, synchronous=NORMAL: a power cut may lose the last commit, which
anti-entropy fetches again from peers).
Rule 3: the schema carries a version; a database from a newer version is refused, never
rewritten.
Rule 4: the table holds entries, not derived state: superseded LWW rows are dropped on
save, and `compact` keeps exactly what a state still holds (after prune or revocation).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import structlog

from mesh.errors import MalformedMessage, StateStoreError
from mesh.identity import digest
from mesh.state import LWW_KINDS, MeshState, SignedEntry
from mesh.wire import decode, encode

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
FILENAME = "state.sqlite3"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (fp BLOB PRIMARY KEY, kind INTEGER NOT NULL, "
    "key BLOB NOT NULL, author BLOB NOT NULL, hlc INTEGER NOT NULL, body BLOB NOT NULL) "
    "WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS entries_slot ON entries (kind, key, author, hlc)",
)

_WHERE_SLOT = "FROM entries WHERE kind=? AND key=? AND author=?"
_NEWER = f"SELECT 1 {_WHERE_SLOT} AND hlc>? LIMIT 1"
_DELETE_OLDER = f"DELETE {_WHERE_SLOT} AND hlc<?"
_INSERT = "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?)"


class StateStore:
    """The `entries` table of one node's data dir.

    Args:
        path: the SQLite file (created if missing; its directory must exist).

    Raises:
        StateStoreError: the file cannot be opened, or its schema version is unknown.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateStoreError(f"state store {self.path}: cannot open: {exc}") from None
        try:
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException as exc:  # cleanup (close what we opened), re-raise: not a boundary
            self._conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StateStoreError(f"state store {self.path}: cannot open: {exc}") from None
            raise

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> StateStore:
        """Open (or create) the store in a node's data dir."""
        return cls(Path(data_dir) / FILENAME)

    def _migrate(self) -> None:
        with self._transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            rows = conn.execute("SELECT version FROM schema_version").fetchall()
            if not rows:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif rows != [(SCHEMA_VERSION,)]:
                raise StateStoreError(
                    f"state store {self.path}: expected schema version "
                    f"{SCHEMA_VERSION}, got {[r[0] for r in rows]}"
                )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn, self._lock)

    def save(self, entries: Iterable[SignedEntry]) -> int:
        """Store entries (idempotent) in one transaction; older LWW rows of a slot go.

        Returns:
            How many rows were inserted.
        """
        inserted = 0
        with self._transaction() as conn:
            for e in entries:
                where = (int(e.slot.kind), e.slot.key, e.author, e.hlc)
                if e.slot.kind in LWW_KINDS:
                    if conn.execute(_NEWER, where).fetchone():
                        continue
                    conn.execute(_DELETE_OLDER, where)
                blob = encode(e)
                cur = conn.execute(_INSERT, (digest(blob), *where, blob))
                inserted += cur.rowcount
        return inserted

    def load(self) -> list[SignedEntry]:
        """Every stored entry that still decodes (corrupt rows are logged and skipped)."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT fp, body FROM entries ORDER BY kind, key, author, hlc")
            blobs = rows.fetchall()
        out: list[SignedEntry] = []
        for fp, blob in blobs:
            try:
                out.append(decode(blob, SignedEntry))
            except MalformedMessage as exc:
                log.error("state_store_row_corrupt", fp=bytes(fp[:4]).hex(), reason=str(exc))
        return out

    def restore(self, state: MeshState, now_ms: int) -> list[SignedEntry]:
        """Load every entry into `state` through `MeshState.apply` (re-verified).

        Entries that no longer verify or pass the write rules are dropped and logged.

        Returns:
            The entries the state accepted.
        """
        accepted = state.apply(self.load(), now_ms, skip_invalid=True)
        log.info("state_restored", entries=len(accepted), path=str(self.path))
        return accepted

    def compact(self, state: MeshState) -> int:
        """Delete every row `state` no longer holds (pruned, purged or superseded).

        Returns:
            How many rows were deleted.
        """
        keep = {digest(encode(e)) for e in state.entries()}
        with self._transaction() as conn:
            stored = [bytes(r[0]) for r in conn.execute("SELECT fp FROM entries")]
            gone = [(fp,) for fp in stored if fp not in keep]
            conn.executemany("DELETE FROM entries WHERE fp=?", gone)
        return len(gone)

    def journal_mode(self) -> str:
        """The SQLite journal mode in effect ("wal")."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore(path={str(self.path)!r}, schema={SCHEMA_VERSION})"


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` on any exception, under the lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:  # cleanup, then re-raise: not a boundary
            self._lock.release()
            raise
        return self._conn

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._conn.execute("COMMIT" if et is None else "ROLLBACK")
        finally:
            self._lock.release()
        if isinstance(ev, sqlite3.Error):  # stdlib error -> ours, after the rollback above
            raise StateStoreError(f"state store: {ev}") from ev
