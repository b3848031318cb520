"""The durable job journal: every job the daemon acknowledges, in SQLite.

Rule 1: a job is journaled before it is acknowledged. `Journal.submit` commits the insert
with `synchronous=FULL` (WAL fsync) before it returns, so an acknowledged job survives a
process crash and a power cut (docs/architecture.md §8: "none is lost").
Rule 2: job state moves only along `TRANSITIONS` (h11 `_state.py` style). Anything else
raises `IllegalTransition`; the stored row is left untouched.
Rule 3: one job id is one job. The same id with the same kind and params returns the stored
record (idempotent resubmit, within the retention window); with different ones it raises
`JobConflict`.
Rule 4: the journal is synchronous and reads no clock; callers pass `now_ms` (the daemon
calls it through `trio.to_thread.run_sync`). Params and results are opaque bytes: this
module never decodes them and never logs them (sizes and digests only).

Thread-safety: one connection (`check_same_thread=False`) guarded by a `threading.Lock`,
rather than a connection per call, because (a) SQLite admits one writer at a time anyway,
so per-call connections win no write parallelism; (b) every transition is a read-check-write
that must be atomic, which the lock plus `BEGIN IMMEDIATE` gives cheaply (IMMEDIATE also
covers another process on the same file, e.g. a CLI reading the journal); (c) a fresh
connection per call would redo the open, the pragmas and the WAL-index mapping, and lose
the statement cache, for calls that otherwise take microseconds.

Restart policy (see `Journal.settle_interrupted`): a job left ACCEPTED or RUNNING by a
previous process is re-run while `attempts < max_attempts`, else failed with a reason that
names the attempt. `attempts` starts at 1 and each requeue adds one, so `max_attempts` is
the total number of runs a job may get. A job interrupted before it ever ran counts as an
attempt too: a job that crashes the daemon during planning must not loop forever.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from nexusd.errors import NexusError

if TYPE_CHECKING:
    import builtins
    from collections.abc import Collection, Iterator, Mapping

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
DEFAULT_INTERRUPTED_REASON = "daemon restarted while the job was running"
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class JournalError(NexusError):
    """The job journal failed (cannot open, closed, SQLite error, unknown schema)."""

    code: ClassVar[str] = "journal_error"


class InvalidJob(JournalError):
    """A job field or query argument outside its domain; the message names the field."""

    code: ClassVar[str] = "invalid_job"


class UnknownJob(JournalError):
    """No job with this id in the journal (never submitted, or pruned)."""

    code: ClassVar[str] = "unknown_job"


class JobConflict(JournalError):
    """A job id resubmitted with a different kind or different params."""

    code: ClassVar[str] = "job_conflict"


class IllegalTransition(JournalError):
    """An operation the job's current state does not allow (e.g. succeed after fail)."""

    code: ClassVar[str] = "illegal_transition"


class JobState(enum.Enum):
    """Where a job is in its life; the value is what the journal stores."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the job is finished: it has no outgoing transition."""
        return not TRANSITIONS[self]


class JobEvent(enum.Enum):
    """What can happen to a job; one per mutating `Journal` method."""

    START = "start"  # mark_running
    PROGRESS = "progress"  # set_progress
    SUCCEED = "succeed"
    FAIL = "fail"  # fail, fail_interrupted
    CANCEL = "cancel"
    REQUEUE = "requeue"  # re-run after a restart


TRANSITIONS: Mapping[JobState, Mapping[JobEvent, JobState]] = {
    JobState.ACCEPTED: {
        JobEvent.START: JobState.RUNNING,
        JobEvent.FAIL: JobState.FAILED,  # e.g. no route, or interrupted before it ran
        JobEvent.CANCEL: JobState.CANCELLED,
        JobEvent.REQUEUE: JobState.ACCEPTED,
    },
    JobState.RUNNING: {
        JobEvent.PROGRESS: JobState.RUNNING,
        JobEvent.SUCCEED: JobState.SUCCEEDED,
        JobEvent.FAIL: JobState.FAILED,
        JobEvent.CANCEL: JobState.CANCELLED,
        JobEvent.REQUEUE: JobState.ACCEPTED,
    },
    JobState.SUCCEEDED: {},
    JobState.FAILED: {},
    JobState.CANCELLED: {},
}
_OPEN_STATES = (JobState.ACCEPTED, JobState.RUNNING)
_DONE_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def next_state(job_id: str, state: JobState, event: JobEvent) -> JobState:
    """The state `event` moves a job in `state` to.

    Raises:
        IllegalTransition: `event` is not allowed in `state`.
    """
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "nothing (finished)"
        msg = f"job {job_id}: cannot {event.value} a job that is {state.value}; allowed: {allowed}"
        raise IllegalTransition(msg) from None


def params_digest(params: bytes) -> str:
    """BLAKE2b-256 of the canonical params bytes, as 64 lowercase hex chars."""
    return hashlib.blake2b(params, digest_size=32).hexdigest()


def new_job_id() -> str:
    """A fresh job id (uuid4 hex) for a client that did not choose one."""
    return uuid.uuid4().hex


def _check_ms(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidJob(f"{name}: expected an int >= 0 (ms), got {value!r}")


def check_job_id(job_id: object) -> None:
    """Raise `InvalidJob` unless `job_id` is 1-128 chars of [A-Za-z0-9._:-], alnum first."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidJob(f"job id: expected 1-128 chars of [A-Za-z0-9._:-], got {job_id!r:.80}")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """One journaled job. Params and result are opaque bytes, left out of `repr`."""

    job_id: str
    kind: str
    params: bytes = field(repr=False)
    params_digest: str
    state: JobState
    created_ms: int
    updated_ms: int
    result: bytes | None = field(default=None, repr=False)
    error: str | None = None
    progress: float = 0.0
    attempts: int = 1

    def __post_init__(self) -> None:
        check_job_id(self.job_id)
        if not isinstance(self.kind, str) or not _KIND_RE.fullmatch(self.kind):
            raise InvalidJob(
                f"job {self.job_id}: kind must match [a-z][a-z0-9_]{{0,31}}, got {self.kind!r:.40}"
            )
        if not isinstance(self.params, bytes):
            raise InvalidJob(
                f"job {self.job_id}: params must be bytes, got {type(self.params).__name__}"
            )
        if self.params_digest != params_digest(self.params):
            raise InvalidJob(f"job {self.job_id}: params_digest does not match the params bytes")
        if not isinstance(self.state, JobState):
            raise InvalidJob(f"job {self.job_id}: state must be a JobState, got {self.state!r}")
        _check_ms("created_ms", self.created_ms)
        _check_ms("updated_ms", self.updated_ms)
        if self.updated_ms < self.created_ms:
            raise InvalidJob(
                f"job {self.job_id}: updated_ms {self.updated_ms} < created_ms {self.created_ms}"
            )
        self._check_outcome()
        p = self.progress
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise InvalidJob(f"job {self.job_id}: progress must be a number in [0, 1], got {p!r}")
        if (
            not isinstance(self.attempts, int)
            or isinstance(self.attempts, bool)
            or self.attempts < 1
        ):
            raise InvalidJob(
                f"job {self.job_id}: attempts must be an int >= 1, got {self.attempts!r}"
            )

    def _check_outcome(self) -> None:
        # result iff SUCCEEDED, error iff FAILED: the transition table's invariants.
        succeeded, failed = self.state is JobState.SUCCEEDED, self.state is JobState.FAILED
        if succeeded != isinstance(self.result, bytes) or (
            self.result is not None and not succeeded
        ):
            raise InvalidJob(
                f"job {self.job_id}: expected a result (bytes) exactly when succeeded, "
                f"got result={type(self.result).__name__} in state {self.state.value}"
            )
        if failed != (isinstance(self.error, str) and bool(self.error)) or (
            self.error is not None and not failed
        ):
            raise InvalidJob(
                f"job {self.job_id}: expected a non-empty error exactly when failed, "
                f"got error={self.error!r:.60} in state {self.state.value}"
            )


class SubmitStatus(enum.Enum):
    """What `Journal.submit` did."""

    NEW = "new"  # journaled now: the caller must run it
    EXISTING_RUNNING = "existing_running"  # same job already accepted or running
    EXISTING_DONE = "existing_done"  # same job already finished: return its outcome


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """The result of `Journal.submit`: what happened and the stored record."""

    status: SubmitStatus
    record: JobRecord

    def __post_init__(self) -> None:
        expected = {
            SubmitStatus.NEW: (JobState.ACCEPTED,),
            SubmitStatus.EXISTING_RUNNING: _OPEN_STATES,
            SubmitStatus.EXISTING_DONE: _DONE_STATES,
        }[self.status]
        if self.record.state not in expected:
            raise InvalidJob(
                f"submit outcome {self.status.value} with a {self.record.state.value} job"
            )


@dataclass(frozen=True, slots=True)
class Recovery:
    """What `Journal.settle_interrupted` did with the jobs a previous process left open."""

    requeued: tuple[JobRecord, ...]  # now ACCEPTED with attempts + 1: the daemon re-runs them
    failed: tuple[JobRecord, ...]  # now FAILED: out of attempts


_COLUMNS = (
    "job_id, kind, params, params_digest, state, created_ms, updated_ms, "
    "result, error, progress, attempts"
)

# Migration i takes the schema from version i to i + 1; statements run one by one inside
# one IMMEDIATE transaction (executescript would COMMIT it early).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            params BLOB NOT NULL,
            params_digest TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s.value}'" for s in JobState)})),
            created_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            result BLOB,
            error TEXT,
            progress REAL NOT NULL CHECK (progress BETWEEN 0.0 AND 1.0),
            attempts INTEGER NOT NULL CHECK (attempts >= 1))""",
        "CREATE INDEX jobs_by_state ON jobs (state, updated_ms)",
    ),
)


class Journal:
    """The job journal of one node, in a SQLite file in WAL mode.

    Args:
        path: the database file (`NodePaths.jobs_db`); created 0600 if missing. Its
            directory must exist.
        busy_timeout_s: how long a write waits for another process holding the file.

    Raises:
        JournalError: the file cannot be opened, is not a journal, is from a newer
            nexusd, or the filesystem refuses WAL mode.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        with _map_sqlite(self._path, "open"):
            # Pre-create 0600: params may hold private prompts. SQLite gives -wal/-shm the
            # main file's mode.
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                self._version = _setup(conn)
            except BaseException:  # cleanup, then re-raise: not a boundary
                conn.close()
                raise
        self._conn: sqlite3.Connection | None = conn
        log.info("journal_opened", path=str(self._path), schema_version=self._version)

    def __repr__(self) -> str:
        status = "open" if self._conn is not None else "closed"
        return f"<Journal {status} path={str(self._path)!r} schema={self._version}>"

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent. Later calls raise `JournalError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- submit ---------------------------------------------------------------------------

    def submit(self, job_id: str, kind: str, params: bytes, now_ms: int) -> SubmitOutcome:
        """Journal a job durably, or return the stored one for an idempotent resubmit.

        The insert is committed and fsynced before this returns, so the caller may
        acknowledge the job once it has the outcome. Use `new_job_id()` when the client
        chose no id.

        Returns:
            `NEW` (the caller must run it), `EXISTING_RUNNING` or `EXISTING_DONE` (same
            id, kind and params already journaled: the stored record, with its result or
            error when finished; a failed job is not retried by a resubmit).

        Raises:
            JobConflict: the id is journaled with a different kind or params.
            InvalidJob: a malformed id, kind, params or time.
        """
        digest = params_digest(params) if isinstance(params, bytes) else ""
        fresh = JobRecord(
            job_id=job_id,
            kind=kind,
            params=params,
            params_digest=digest,
            state=JobState.ACCEPTED,
            created_ms=now_ms,
            updated_ms=now_ms,
        )
        with self._tx("submit") as conn:
            old = _load(conn, job_id)
            if old is None:
                conn.execute(
                    f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _row(fresh),
                )
                log.debug("job_journaled", job=job_id, kind=kind, params_bytes=len(params))
                return SubmitOutcome(SubmitStatus.NEW, fresh)
        if old.kind != kind:
            raise JobConflict(
                f"job {job_id}: resubmitted as kind {kind!r}, journaled as {old.kind!r}"
            )
        if old.params_digest != digest:
            raise JobConflict(
                f"job {job_id}: resubmitted with different params "
                f"(journaled digest {old.params_digest[:16]}, got {digest[:16]})"
            )
        done = old.state.is_terminal
        return SubmitOutcome(
            SubmitStatus.EXISTING_DONE if done else SubmitStatus.EXISTING_RUNNING, old
        )

    # -- transitions ----------------------------------------------------------------------

    def mark_running(self, job_id: str, now_ms: int) -> JobRecord:
        """ACCEPTED -> RUNNING. Raises `UnknownJob`, `IllegalTransition`."""
        return self._transition(job_id, JobEvent.START, now_ms)

    def set_progress(self, job_id: str, progress: float, now_ms: int) -> JobRecord:
        """Record progress in [0, 1] of a RUNNING job.

        Not fsynced (`synchronous=NORMAL` for this write): progress lost to a power cut is
        harmless and the fsync would cost milliseconds per update. The next durable
        commit syncs it anyway.

        Raises:
            InvalidJob: `progress` outside [0, 1] or not a number.
            UnknownJob, IllegalTransition: as for every transition.
        """
        return self._transition(job_id, JobEvent.PROGRESS, now_ms, durable=False, progress=progress)

    def succeed(self, job_id: str, result: bytes, now_ms: int) -> JobRecord:
        """RUNNING -> SUCCEEDED with the result bytes; progress becomes 1."""
        return self._transition(job_id, JobEvent.SUCCEED, now_ms, result=result, progress=1.0)

    def fail(self, job_id: str, reason: str, now_ms: int) -> JobRecord:
        """ACCEPTED or RUNNING -> FAILED with a non-empty reason."""
        return self._transition(job_id, JobEvent.FAIL, now_ms, error=reason)

    def cancel(self, job_id: str, now_ms: int) -> JobRecord:
        """ACCEPTED or RUNNING -> CANCELLED. Cancelling a finished job is illegal."""
        return self._transition(job_id, JobEvent.CANCEL, now_ms)

    def requeue(self, job_id: str, now_ms: int) -> JobRecord:
        """ACCEPTED or RUNNING -> ACCEPTED for a re-run: attempts + 1, progress 0."""
        return self._transition(job_id, JobEvent.REQUEUE, now_ms)

    # -- restart ----------------------------------------------------------------------------

    def recover(self, now_ms: int) -> builtins.list[JobRecord]:
        """Every job a previous process left ACCEPTED or RUNNING, oldest first.

        Read-only: the daemon decides per job (`requeue` then re-run, or `fail`), or
        applies the default policy in one step with `settle_interrupted`.
        """
        _check_ms("now_ms", now_ms)
        with self._read("recover") as conn:
            jobs = _load_open(conn)
        if jobs:
            oldest_ms = now_ms - min(j.updated_ms for j in jobs)
            log.info("jobs_interrupted", count=len(jobs), oldest_update_age_ms=oldest_ms)
        return jobs

    def fail_interrupted(
        self, now_ms: int, reason: str = DEFAULT_INTERRUPTED_REASON
    ) -> builtins.list[JobRecord]:
        """Fail every ACCEPTED or RUNNING job with "<reason> (attempt N)", in one transaction."""
        return list(self.settle_interrupted(now_ms, max_attempts=1, reason=reason).failed)

    def settle_interrupted(
        self, now_ms: int, *, max_attempts: int, reason: str = DEFAULT_INTERRUPTED_REASON
    ) -> Recovery:
        """Apply the restart policy to every job left open, in one transaction.

        A job with `attempts < max_attempts` is requeued (attempts + 1, state ACCEPTED)
        and must be re-run from its params by the caller; the others are failed with
        "<reason> (attempt N of M)" (or "(attempt N)" when `max_attempts` is 1).

        Raises:
            InvalidJob: `max_attempts` < 1.
        """
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidJob(f"max_attempts: expected an int >= 1, got {max_attempts!r}")
        requeued, failed = [], []
        with self._tx("settle_interrupted") as conn:
            for job in _load_open(conn):
                if job.attempts < max_attempts:
                    requeued.append(self._apply(conn, job, JobEvent.REQUEUE, now_ms))
                    continue
                limit = f" of {max_attempts}" if max_attempts > 1 else ""
                why = f"{reason} (attempt {job.attempts}{limit})"
                failed.append(self._apply(conn, job, JobEvent.FAIL, now_ms, error=why))
        if requeued or failed:
            log.info("jobs_settled", requeued=len(requeued), failed=len(failed))
        return Recovery(tuple(requeued), tuple(failed))

    # -- queries and retention ---------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The stored record. Raises `UnknownJob`."""
        check_job_id(job_id)
        with self._read("get") as conn:
            return _require(conn, job_id)

    def counts(self) -> dict[JobState, int]:
        """Number of jobs per state (every state present), e.g. for metrics."""
        with self._read("counts") as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {JobState(state): n for state, n in rows}
        return {s: found.get(s, 0) for s in JobState}

    def prune(self, older_than_ms: int) -> int:
        """Delete finished jobs last updated before `older_than_ms` (now - retention).

        Open jobs are never pruned. A pruned id may be submitted again as a new job.

        Returns:
            How many jobs were deleted.
        """
        _check_ms("older_than_ms", older_than_ms)
        marks = ", ".join("?" * len(_DONE_STATES))
        with self._tx("prune") as conn:
            cur = conn.execute(
                f"DELETE FROM jobs WHERE state IN ({marks}) AND updated_ms < ?",
                (*(s.value for s in _DONE_STATES), older_than_ms),
            )
        if cur.rowcount:
            log.info("jobs_pruned", count=cur.rowcount, older_than_ms=older_than_ms)
        return cur.rowcount

    def list(
        self, limit: int = 50, states: Collection[JobState] | None = None
    ) -> builtins.list[JobRecord]:
        """Up to `limit` jobs, newest submission first, optionally only in `states`.

        "Newest" is submission order, not `created_ms`, so a wall clock stepping back
        does not reorder the list.

        Raises:
            InvalidJob: `limit` < 1 or `states` holds something other than JobState.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidJob(f"limit: expected an int >= 1, got {limit!r}")
        chosen = tuple(JobState) if states is None else tuple(states)
        if not all(isinstance(s, JobState) for s in chosen):
            raise InvalidJob(f"states: expected JobState members, got {chosen!r:.120}")
        if not chosen:
            return []
        marks = ", ".join("?" * len(chosen))
        with self._read("list") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?",
                (*(s.value for s in chosen), limit),
            ).fetchall()
        return [_record(r) for r in rows]

    # -- internals -----------------------------------------------------------------------------

    def _transition(
        self, job_id: str, event: JobEvent, now_ms: int, *, durable: bool = True, **changes: object
    ) -> JobRecord:
        check_job_id(job_id)
        with self._tx(event.value, durable=durable) as conn:
            return self._apply(conn, _require(conn, job_id), event, now_ms, **changes)

    def _apply(
        self,
        conn: sqlite3.Connection,
        old: JobRecord,
        event: JobEvent,
        now_ms: int,
        **changes: object,
    ) -> JobRecord:
        """Validate `event` on `old`, build the new record (validated), write it."""
        _check_ms("now_ms", now_ms)
        state = next_state(old.job_id, old.state, event)
        if event is JobEvent.REQUEUE:
            changes.update(attempts=old.attempts + 1, progress=0.0)
        # Wall clocks step back; keeping each job's times monotone keeps the
        # created <= updated invariant and retention sane.
        updated_ms = max(now_ms, old.updated_ms)
        new = replace(old, state=state, updated_ms=updated_ms, **changes)  # type: ignore[arg-type]
        conn.execute(
            "UPDATE jobs SET state = ?, updated_ms = ?, result = ?, error = ?, progress = ?, "
            "attempts = ? WHERE job_id = ?",
            (
                new.state.value,
                new.updated_ms,
                new.result,
                new.error,
                new.progress,
                new.attempts,
                new.job_id,
            ),
        )
        log.debug("job_transition", job=new.job_id, job_event=event.value, state=new.state.value)
        return new

    @contextlib.contextmanager
    def _read(self, op: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock; each statement is its own (autocommit) read transaction."""
        with self._lock, _map_sqlite(self._path, op):
            if self._conn is None:
                raise JournalError(f"job journal {self._path}: {op} after close")
            yield self._conn

    @contextlib.contextmanager
    def _tx(self, op: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one IMMEDIATE transaction; commit on success, else roll back.

        IMMEDIATE takes the write lock up front, so a read-check-write cannot interleave
        with another process's writer (that would be SQLITE_BUSY mid-transaction).
        """
        with self._read(op) as conn:
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with _immediate(conn):
                    yield conn
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")


@contextlib.contextmanager
def _map_sqlite(path: Path, op: str) -> Iterator[None]:
    """Convert sqlite3 and OS errors to `JournalError` at the module boundary."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise JournalError(f"job journal {path}: {op} failed: {type(exc).__name__}: {exc}") from exc


def _setup(conn: sqlite3.Connection) -> int:
    """Set the pragmas and migrate the schema; returns the schema version."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"job journal: expected WAL journal mode, the filesystem gave {mode!r}")
    conn.execute("PRAGMA synchronous = FULL")
    with _immediate(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"job journal: schema version {version} is newer than this nexusd "
                f"supports ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            for statements in _MIGRATIONS[version:]:
                for sql in statements:
                    conn.execute(sql)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return SCHEMA_VERSION


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One IMMEDIATE transaction: commit on success, else roll back (a failed COMMIT too)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:  # cleanup, then re-raise: not a boundary
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _row(r: JobRecord) -> tuple[object, ...]:
    return (
        r.job_id,
        r.kind,
        r.params,
        r.params_digest,
        r.state.value,
        r.created_ms,
        r.updated_ms,
        r.result,
        r.error,
        r.progress,
        r.attempts,
    )


def _record(row: tuple[Any, ...]) -> JobRecord:  # Any: the DB decode boundary
    """A row in `_COLUMNS` order to a record; `JobRecord.__post_init__` checks every field.

    Raises:
        InvalidJob: the stored row is not a valid job (a corrupt or hand-edited journal).
    """
    (
        job_id,
        kind,
        params,
        digest,
        state,
        created_ms,
        updated_ms,
        result,
        error,
        progress,
        attempts,
    ) = row
    try:
        job_state = JobState(state)
    except ValueError:
        raise InvalidJob(f"job {job_id!r}: stored state {state!r} is not a JobState") from None
    return JobRecord(
        job_id=job_id,
        kind=kind,
        params=params,
        params_digest=digest,
        state=job_state,
        created_ms=created_ms,
        updated_ms=updated_ms,
        result=result,
        error=error,
        progress=progress,
        attempts=attempts,
    )


def _load(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return None if row is None else _record(row)


def _require(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    job = _load(conn, job_id)
    if job is None:
        raise UnknownJob(f"job {job_id}: not in the journal (never submitted, or pruned)")
    return job


def _load_open(conn: sqlite3.Connection) -> list[JobRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE state IN (?, ?) ORDER BY seq ASC",
        tuple(s.value for s in _OPEN_STATES),
    ).fetchall()
    return [_record(r) for r in rows]
