"""Tests of the durable job journal (nexusd/jobs/journal.py)."""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexusd.jobs.journal import (
    TRANSITIONS,
    IllegalTransition,
    InvalidJob,
    JobConflict,
    JobEvent,
    JobState,
    Journal,
    JournalError,
    SubmitStatus,
    UnknownJob,
    new_job_id,
    next_state,
    params_digest,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# fsync on the disk behind tmp_path costs ~5 ms per commit on this machine; on tmpfs it is
# free and SQLite does exactly the same work otherwise. Fall back to tmp_path elsewhere.
_FAST_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    if _FAST_DIR is None:
        yield tmp_path / "jobs.sqlite3"
        return
    with tempfile.TemporaryDirectory(dir=_FAST_DIR, prefix="nexus-journal-") as d:
        yield Path(d) / "jobs.sqlite3"


@pytest.fixture
def journal(db_path: Path) -> Iterator[Journal]:
    with Journal(db_path) as j:
        yield j


def _run(j: Journal, job_id: str, now_ms: int = 10) -> None:
    j.submit(job_id, "embed", b"p-" + job_id.encode(), now_ms)
    j.mark_running(job_id, now_ms + 1)


# -- submit and idempotency --------------------------------------------------------------


def test_submit_new_then_resubmit_returns_stored_result(journal: Journal) -> None:
    first = journal.submit("job-1", "generate", b"\x93params", 100)
    assert first.status is SubmitStatus.NEW
    assert first.record.state is JobState.ACCEPTED
    assert first.record.params_digest == params_digest(b"\x93params")
    assert first.record.attempts == 1
    journal.mark_running("job-1", 101)
    journal.succeed("job-1", b"the result", 102)

    again = journal.submit("job-1", "generate", b"\x93params", 200)
    assert again.status is SubmitStatus.EXISTING_DONE
    assert again.record.result == b"the result"
    assert again.record.progress == 1.0
    assert again.record == journal.get("job-1")


def test_resubmit_of_open_job_is_existing_running(journal: Journal) -> None:
    journal.submit("j", "embed", b"x", 1)
    assert journal.submit("j", "embed", b"x", 2).status is SubmitStatus.EXISTING_RUNNING
    journal.mark_running("j", 3)
    outcome = journal.submit("j", "embed", b"x", 4)
    assert outcome.status is SubmitStatus.EXISTING_RUNNING
    assert outcome.record.state is JobState.RUNNING


def test_resubmit_of_failed_job_returns_the_failure(journal: Journal) -> None:
    journal.submit("j", "embed", b"x", 1)
    journal.fail("j", "no route to atom 3", 2)
    outcome = journal.submit("j", "embed", b"x", 3)
    assert outcome.status is SubmitStatus.EXISTING_DONE
    assert outcome.record.error == "no route to atom 3"


def test_same_id_different_params_is_a_conflict(journal: Journal) -> None:
    journal.submit("job-7", "generate", b"a", 1)
    with pytest.raises(JobConflict, match=r"job job-7: resubmitted with different params"):
        journal.submit("job-7", "generate", b"b", 2)
    with pytest.raises(JobConflict, match=r"job job-7: resubmitted as kind 'embed'"):
        journal.submit("job-7", "embed", b"a", 3)
    assert journal.get("job-7").params == b"a"
    assert journal.get("job-7").updated_ms == 1


def test_new_job_id_is_uuid4_hex_and_accepted(journal: Journal) -> None:
    job_id = new_job_id()
    assert len(job_id) == 32
    assert int(job_id, 16) >= 0
    assert journal.submit(job_id, "classify", b"", 1).status is SubmitStatus.NEW


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda j: j.submit("", "embed", b"", 1), "job id"),
        (lambda j: j.submit("a b", "embed", b"", 1), "job id"),
        (lambda j: j.submit("x" * 129, "embed", b"", 1), "job id"),
        (lambda j: j.submit("a", "Embed!", b"", 1), "kind"),
        (lambda j: j.submit("a", "embed", "text", 1), "params must be bytes"),
        (lambda j: j.submit("a", "embed", b"", -1), "created_ms"),
        (lambda j: j.list(limit=0), "limit"),
        (lambda j: j.settle_interrupted(1, max_attempts=0), "max_attempts"),
        (lambda j: j.prune(-5), "older_than_ms"),
    ],
)
def test_invalid_arguments_raise_invalid_job(
    journal: Journal, call: Callable[[Journal], object], match: str
) -> None:
    with pytest.raises(InvalidJob, match=match):
        call(journal)
    assert journal.list() == []


# -- transitions ------------------------------------------------------------------------------


def test_full_lifecycle_and_progress(journal: Journal) -> None:
    journal.submit("j", "train", b"cfg", 1)
    assert journal.mark_running("j", 2).state is JobState.RUNNING
    assert journal.set_progress("j", 0.25, 3).progress == 0.25
    done = journal.succeed("j", b"", 4)
    assert (done.state, done.result, done.error, done.updated_ms) == (
        JobState.SUCCEEDED,
        b"",
        None,
        4,
    )


@pytest.mark.parametrize(
    ("setup", "call", "match"),
    [
        ("fail", lambda j: j.succeed("j", b"r", 9), "cannot succeed a job that is failed"),
        ("succeed", lambda j: j.fail("j", "late", 9), "cannot fail a job that is succeeded"),
        ("succeed", lambda j: j.cancel("j", 9), "cannot cancel a job that is succeeded"),
        ("cancel", lambda j: j.mark_running("j", 9), "cannot start a job that is cancelled"),
        ("run", lambda j: j.mark_running("j", 9), "cannot start a job that is running"),
        ("accept", lambda j: j.succeed("j", b"r", 9), "cannot succeed a job that is accepted"),
        ("accept", lambda j: j.set_progress("j", 0.5, 9), "cannot progress a job that is acc"),
        ("fail", lambda j: j.requeue("j", 9), "cannot requeue a job that is failed"),
    ],
)
def test_illegal_transitions_raise_and_leave_the_row(
    journal: Journal, setup: str, call: Callable[[Journal], object], match: str
) -> None:
    journal.submit("j", "embed", b"x", 1)
    if setup != "accept":
        journal.mark_running("j", 2)
    if setup == "fail":
        journal.fail("j", "boom", 3)
    elif setup == "succeed":
        journal.succeed("j", b"ok", 3)
    elif setup == "cancel":
        journal.cancel("j", 3)
    before = journal.get("j")
    with pytest.raises(IllegalTransition, match=match):
        call(journal)
    assert journal.get("j") == before


def test_transition_table_shape() -> None:
    for state in JobState:
        assert state.is_terminal == (
            state in {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
        )
    assert next_state("j", JobState.RUNNING, JobEvent.REQUEUE) is JobState.ACCEPTED
    with pytest.raises(IllegalTransition, match=r"job j: .* allowed: nothing \(finished\)"):
        next_state("j", JobState.CANCELLED, JobEvent.CANCEL)


@pytest.mark.parametrize(
    ("running", "call", "match"),
    [
        (True, lambda j: j.set_progress("j", 1.5, 3), "progress"),
        (True, lambda j: j.set_progress("j", math.nan, 3), "progress"),
        (True, lambda j: j.fail("j", "", 3), "non-empty error"),
        (True, lambda j: j.succeed("j", "text", 3), "result"),
        (False, lambda j: j.mark_running("j", -1), "now_ms"),
    ],
)
def test_bad_transition_values_raise_and_leave_the_row(
    journal: Journal, running: bool, call: Callable[[Journal], object], match: str
) -> None:
    journal.submit("j", "embed", b"x", 1)
    if running:
        journal.mark_running("j", 2)
    before = journal.get("j")
    with pytest.raises(InvalidJob, match=match):
        call(journal)
    assert journal.get("j") == before


def test_unknown_job(journal: Journal) -> None:
    with pytest.raises(UnknownJob, match="job nope: not in the journal"):
        journal.get("nope")
    with pytest.raises(UnknownJob):
        journal.cancel("nope", 1)


def test_clock_stepping_back_keeps_job_times_monotone(journal: Journal) -> None:
    journal.submit("j", "embed", b"x", 1000)
    assert journal.mark_running("j", 400).updated_ms == 1000


# -- durability and recovery ------------------------------------------------------------------


def test_wal_mode_full_sync_and_private_file(journal: Journal, db_path: Path) -> None:
    journal.submit("j", "embed", b"x", 1)
    journal.mark_running("j", 2)
    journal.set_progress("j", 0.5, 3)  # a NORMAL-sync write; FULL must be restored after it
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    # The accept step's guarantee is this connection's setting (2 == FULL); private by intent.
    assert journal._conn is not None
    assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_crash_without_close_second_journal_recovers(db_path: Path) -> None:
    crashed = Journal(db_path)  # never closed before the "restart": simulates a crash
    crashed.submit("queued", "embed", b"a", 10)
    _run(crashed, "running", 20)
    crashed.set_progress("running", 0.7, 25)
    _run(crashed, "done", 30)
    crashed.succeed("done", b"r", 31)

    with Journal(db_path) as restarted:
        found = restarted.recover(now_ms=100)
        assert [j.job_id for j in found] == ["queued", "running"]  # oldest first
        assert [j.state for j in found] == [JobState.ACCEPTED, JobState.RUNNING]
        assert restarted.get("done").result == b"r"
    crashed.close()


@pytest.mark.slow  # ~0.5 s of interpreter start-up; the in-process crash test above is fast
def test_killed_process_loses_no_acknowledged_job(db_path: Path) -> None:
    # A real crash: the child journals a job, prints the ack, then SIGKILLs itself.
    code = (
        "import os, signal, sys\n"
        "from nexusd.jobs.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.submit('acked', 'generate', b'prompt', 5)\n"
        "j.mark_running('acked', 6)\n"
        "print('ack', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(db_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == -9
    assert proc.stdout.splitlines()[-1] == b"ack"  # earlier lines: the child's logs
    with Journal(db_path) as j:
        assert [r.job_id for r in j.recover(10)] == ["acked"]


def test_fail_interrupted_names_the_attempt(journal: Journal) -> None:
    journal.submit("a", "embed", b"x", 1)
    _run(journal, "b")
    journal.requeue("b", 20)
    failed = journal.fail_interrupted(30)
    assert {r.job_id: r.error for r in failed} == {
        "a": "daemon restarted while the job was running (attempt 1)",
        "b": "daemon restarted while the job was running (attempt 2)",
    }
    assert journal.recover(31) == []
    assert journal.get("b").state is JobState.FAILED


def test_requeue_increments_attempts_and_resets_progress(journal: Journal) -> None:
    _run(journal, "j")
    journal.set_progress("j", 0.9, 15)
    again = journal.requeue("j", 20)
    assert (again.state, again.attempts, again.progress) == (JobState.ACCEPTED, 2, 0.0)
    assert journal.mark_running("j", 21).attempts == 2
    assert journal.requeue("j", 22).attempts == 3


def test_settle_interrupted_reruns_under_max_attempts_else_fails(journal: Journal) -> None:
    _run(journal, "fresh")
    _run(journal, "retried")
    journal.requeue("retried", 15)
    journal.mark_running("retried", 16)
    journal.submit("done", "embed", b"d", 17)
    journal.cancel("done", 18)

    settled = journal.settle_interrupted(100, max_attempts=2)
    assert [(r.job_id, r.state, r.attempts) for r in settled.requeued] == [
        ("fresh", JobState.ACCEPTED, 2)
    ]
    assert [(r.job_id, r.error) for r in settled.failed] == [
        ("retried", "daemon restarted while the job was running (attempt 2 of 2)")
    ]
    assert journal.get("done").state is JobState.CANCELLED


# -- queries and retention ---------------------------------------------------------------------


def test_list_is_newest_first_with_filter_and_limit(journal: Journal) -> None:
    for i, t in enumerate([50, 10, 30]):  # submission order wins over created_ms
        journal.submit(f"j{i}", "embed", b"x", t)
    journal.cancel("j1", 60)
    assert [r.job_id for r in journal.list()] == ["j2", "j1", "j0"]
    assert [r.job_id for r in journal.list(limit=2)] == ["j2", "j1"]
    assert [r.job_id for r in journal.list(states={JobState.CANCELLED})] == ["j1"]
    assert journal.list(states=()) == []
    counts = journal.counts()
    assert counts[JobState.ACCEPTED] == 2
    assert counts[JobState.CANCELLED] == 1


def test_prune_removes_only_finished_jobs_past_retention(journal: Journal) -> None:
    journal.submit("old-done", "embed", b"x", 1)
    journal.cancel("old-done", 2)
    journal.submit("old-open", "embed", b"x", 1)
    journal.submit("new-done", "embed", b"x", 1)
    journal.fail("new-done", "boom", 500)
    assert journal.prune(older_than_ms=100) == 1
    assert sorted(r.job_id for r in journal.list()) == ["new-done", "old-open"]
    # A pruned id is free again: a new job, not the old result.
    assert journal.submit("old-done", "embed", b"other", 600).status is SubmitStatus.NEW


# -- the file and its lifetime --------------------------------------------------------------


def test_newer_schema_is_refused(db_path: Path) -> None:
    Journal(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(JournalError, match="schema version 99 is newer"):
        Journal(db_path)


def test_reopen_keeps_jobs_and_schema(db_path: Path) -> None:
    with Journal(db_path) as j:
        j.submit("j", "embed", b"x", 1)
    with Journal(db_path) as j:
        assert j.get("j").params == b"x"
        assert "schema=1" in repr(j)


def test_missing_directory_and_closed_journal_raise(db_path: Path) -> None:
    with pytest.raises(JournalError, match="open failed"):
        Journal(db_path.parent / "missing" / "jobs.sqlite3")
    (db_path.parent / "garbage").write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="open failed: DatabaseError"):
        Journal(db_path.parent / "garbage")
    j = Journal(db_path)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="after close"):
        j.get("j")
    assert "closed" in repr(j)


def test_record_repr_hides_payloads(journal: Journal) -> None:
    rec = journal.submit("j", "embed", b"secret prompt", 1).record
    assert "secret" not in repr(rec)


def test_threads_share_one_journal(journal: Journal) -> None:
    statuses: list[SubmitStatus] = []

    def worker(n: int) -> None:
        statuses.append(journal.submit("shared", "embed", b"same", n).status)
        for i in range(5):
            _run(journal, f"w{n}-{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s.value for s in statuses) == ["existing_running"] * 3 + ["new"]
    assert journal.counts()[JobState.RUNNING] == 20


# -- property: any sequence of operations stays consistent with the transition table ---------

_IDS = st.sampled_from(["a", "b", "c"])


class JournalMachine(RuleBasedStateMachine):
    """Drives a journal with random legal and illegal operations against a model."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory(dir=_FAST_DIR, prefix="nexus-journal-")
        self.path = Path(self._dir.name) / "jobs.sqlite3"
        self.journals = [Journal(self.path)]
        self.now = 0
        # job id -> (state, attempts, params, updated_ms): the model
        self.model: dict[str, tuple[JobState, int, bytes, int]] = {}

    @property
    def journal(self) -> Journal:
        return self.journals[-1]

    @rule(dt=st.integers(-20, 50))
    def tick(self, dt: int) -> None:
        self.now = max(0, self.now + dt)

    @rule(job_id=_IDS, params=st.sampled_from([b"p", b"q"]))
    def submit(self, job_id: str, params: bytes) -> None:
        known = self.model.get(job_id)
        if known is not None and known[2] != params:
            with pytest.raises(JobConflict):
                self.journal.submit(job_id, "embed", params, self.now)
            return
        outcome = self.journal.submit(job_id, "embed", params, self.now)
        if known is None:
            assert outcome.status is SubmitStatus.NEW
            self.model[job_id] = (JobState.ACCEPTED, 1, params, self.now)
        else:
            done = known[0].is_terminal
            assert outcome.status is (
                SubmitStatus.EXISTING_DONE if done else SubmitStatus.EXISTING_RUNNING
            )

    @rule(job_id=_IDS, event=st.sampled_from(list(JobEvent)))
    def act(self, job_id: str, event: JobEvent) -> None:
        j, now = self.journal, self.now
        call: Callable[[], object] = {
            JobEvent.START: lambda: j.mark_running(job_id, now),
            JobEvent.PROGRESS: lambda: j.set_progress(job_id, 0.5, now),
            JobEvent.SUCCEED: lambda: j.succeed(job_id, b"r", now),
            JobEvent.FAIL: lambda: j.fail(job_id, "boom", now),
            JobEvent.CANCEL: lambda: j.cancel(job_id, now),
            JobEvent.REQUEUE: lambda: j.requeue(job_id, now),
        }[event]
        known = self.model.get(job_id)
        if known is None:
            with pytest.raises(UnknownJob):
                call()
            return
        state, attempts, params, updated = known
        if event not in TRANSITIONS[state]:
            with pytest.raises(IllegalTransition):
                call()
            return
        call()
        attempts += event is JobEvent.REQUEUE
        self.model[job_id] = (TRANSITIONS[state][event], attempts, params, max(updated, now))

    @rule()
    def crash_and_restart(self) -> None:
        self.journals.append(Journal(self.path))  # the old one stays open, as after a crash

    @rule(max_attempts=st.integers(1, 3))
    def settle(self, max_attempts: int) -> None:
        self.journal.settle_interrupted(self.now, max_attempts=max_attempts)
        for job_id, (state, attempts, params, updated) in list(self.model.items()):
            if not state.is_terminal:
                requeue = attempts < max_attempts
                new = JobState.ACCEPTED if requeue else JobState.FAILED
                self.model[job_id] = (new, attempts + requeue, params, max(updated, self.now))

    @rule(back=st.integers(-10, 60))  # negative: a cutoff past every job
    def prune(self, back: int) -> None:
        cutoff = max(0, self.now - back)
        self.journal.prune(cutoff)
        for job_id, (state, _, _, updated) in list(self.model.items()):
            if state.is_terminal and updated < cutoff:
                del self.model[job_id]

    @invariant()
    def journal_matches_model(self) -> None:
        stored = {r.job_id: r for r in self.journal.list(limit=10)}  # records re-validate
        assert {k: (r.state, r.attempts, r.params, r.updated_ms) for k, r in stored.items()} == (
            self.model
        )

    def teardown(self) -> None:
        for j in self.journals:
            j.close()
        self._dir.cleanup()


# The default run stays near the unit-test budget; the slow run explores much further.
test_journal_state_machine = JournalMachine.TestCase
test_journal_state_machine.settings = settings(
    max_examples=10, stateful_step_count=15, deadline=None
)


class _DeepJournalMachine(JournalMachine):
    """The same machine; a distinct class so that its TestCase carries its own settings."""


test_journal_state_machine_deep = pytest.mark.slow(_DeepJournalMachine.TestCase)
test_journal_state_machine_deep.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
