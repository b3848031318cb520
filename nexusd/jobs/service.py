"""Job lifecycle: journal before acknowledging, run once, survive restarts, cancel.

Rule 1: a job is journaled (SQLite, fsync) before anything runs or is acknowledged; its
id is an idempotency key: the same id with the same parameters returns the stored result
(or joins the running job), the same id with other parameters is a `conflict`.
Rule 2: jobs run in the service's nursery, not in the client's connection: a client that
goes away does not cancel its job; `nexusd cancel` does.
Rule 3: after a restart every job a previous process acknowledged is re-run (attempts <
max_attempts) or failed with a reason; none is lost. A job interrupted by a shutdown stays
open in the journal for exactly that reason.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
import trio

from mesh.errors import MalformedMessage
from mesh.wire import decode_any, encode

from ..api.records import (
    REPLY_TYPES,
    CancelRequest,
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    JobRow,
    JobsReply,
    JobsRequest,
    OkReply,
    ProgressEvent,
    ResultRequest,
    RouteEvent,
    TokenEvent,
    TrainProgressEvent,
    TrainRequest,
)
from ..api.server import ApiServer, Emit
from ..errors import NEXUS_ERRORS, ApiError
from ..metrics import Metrics
from .engine import JobEngine
from .journal import (
    IllegalTransition,
    InvalidJob,
    JobConflict,
    JobState,
    Journal,
    SubmitStatus,
    UnknownJob,
    new_job_id,
)

log = structlog.get_logger(__name__)

JOB_KINDS: dict[type, str] = {
    GenerateRequest: "generate",
    EmbedRequest: "embed",
    ClassifyRequest: "classify",
    TrainRequest: "train",
}
REQUEST_OF_KIND = {v: k for k, v in JOB_KINDS.items()}


@dataclass(slots=True, kw_only=True)
class _Running:
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)
    listeners: list[Emit] = field(default_factory=list)
    reply: object | None = None
    error: ApiError | None = None
    user_cancelled: bool = False
    kind: str = ""
    started_ms: int = 0
    route: RouteEvent | None = None  # the latest route (opened, or after a failover)
    tokens: int = 0  # generated tokens streamed so far
    progress: ProgressEvent | None = None
    losses: list[TrainProgressEvent] = field(default_factory=list)  # last LOSS_POINTS steps


LOSS_POINTS = 500  # training steps kept per running job for the dashboard's loss curve


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningJob:
    """A running job as the dashboard shows it (a snapshot; the job goes on)."""

    job_id: str
    kind: str
    started_ms: int
    route: RouteEvent | None
    tokens: int
    progress: ProgressEvent | None
    losses: tuple[TrainProgressEvent, ...]


def now_ms() -> int:
    return int(time.time() * 1000)


class JobService:
    """Owns running jobs and their journal; serves the job requests of the local API."""

    def __init__(
        self, engine: JobEngine, journal: Journal, metrics: Metrics, *, max_attempts: int = 3
    ) -> None:
        self.engine = engine
        self.journal = journal
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        # Fetches a mesh model's manifest and tokenizer when this node lacks them.
        self.prepare: Callable[[str], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        return f"JobService(running={sorted(self._running)})"

    @property
    def running(self) -> int:
        return len(self._running)

    async def drain(self) -> None:
        """Wait until every running job has finished (the daemon bounds this by its grace)."""
        while self._running:
            await next(iter(self._running.values())).done.wait()

    def snapshot(self) -> list[RunningJob]:
        """The running jobs with their current route, progress and recent losses."""
        return [
            RunningJob(
                job_id=job_id,
                kind=r.kind,
                started_ms=r.started_ms,
                route=r.route,
                tokens=r.tokens,
                progress=r.progress,
                losses=tuple(r.losses),
            )
            for job_id, r in self._running.items()
        ]

    def register(self, api: ApiServer) -> None:
        for request_type in JOB_KINDS:
            api.route(request_type, self._submit)
        api.route(JobsRequest, self._jobs)
        api.route(CancelRequest, self._cancel)
        api.route(ResultRequest, self._result)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Recover interrupted jobs, then hold the nursery jobs run in."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            recovery = await trio.to_thread.run_sync(
                lambda: self.journal.settle_interrupted(now_ms(), max_attempts=self._max_attempts)
            )
            for rec in recovery.failed:
                self._metrics.inc("jobs_total", outcome="failed_on_restart")
                log.warning("job_failed_on_restart", job=rec.job_id, reason=rec.error)
            for rec in recovery.requeued:
                try:
                    req = decode_any(rec.params, tuple(JOB_KINDS))
                except MalformedMessage as exc:
                    await trio.to_thread.run_sync(
                        self.journal.fail, rec.job_id, f"unreadable params: {exc}", now_ms()
                    )
                    continue
                log.info("job_resumed", job=rec.job_id, kind=rec.kind, attempt=rec.attempts)
                self._start(rec.job_id, req)
            task_status.started()
            await trio.sleep_forever()

    async def _submit(self, req: Any, emit: Emit) -> object:
        kind = JOB_KINDS[type(req)]
        job_id = req.job_id or new_job_id()
        params = encode(dataclasses.replace(req, job_id=job_id))
        try:
            outcome = await trio.to_thread.run_sync(
                self.journal.submit, job_id, kind, params, now_ms()
            )
        except JobConflict as exc:
            raise ApiError("conflict", str(exc)) from None
        except InvalidJob as exc:
            raise ApiError("bad_request", str(exc)) from None
        if outcome.status is SubmitStatus.EXISTING_DONE:
            return self._stored_outcome(outcome.record)
        running = self._running.get(job_id)
        if running is None:
            # Either it finished between the journal read and now (return what it did), or
            # an earlier process accepted it and recovery has not resumed it (resume it).
            rec = await trio.to_thread.run_sync(self.journal.get, job_id)
            if rec.state.is_terminal:
                return self._stored_outcome(rec)
            running = self._start(job_id, dataclasses.replace(req, job_id=job_id))
        running.listeners.append(emit)
        await running.done.wait()
        if running.error is not None:
            raise running.error
        return running.reply

    def _start(self, job_id: str, req: Any) -> _Running:
        assert self._nursery is not None, "JobService.run must be started first"
        running = _Running(scope=trio.CancelScope(), kind=JOB_KINDS[type(req)], started_ms=now_ms())
        self._running[job_id] = running
        self._nursery.start_soon(self._run_job, job_id, req, running)
        return running

    async def _run_job(self, job_id: str, req: Any, running: _Running) -> None:
        kind = JOB_KINDS[type(req)]
        runners: dict[str, Callable[[Any, str, Emit], Awaitable[object]]] = {
            "generate": self.engine.generate,
            "embed": self.engine.embed,
            "classify": self.engine.classify,
            "train": self.engine.train,
        }
        run = runners[kind]

        async def fan_out(event: object) -> None:
            _observe(running, event)
            for listener in list(running.listeners):
                try:
                    await listener(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    running.listeners.remove(listener)  # that client left; the job goes on

        structlog.contextvars.bind_contextvars(job=job_id)
        try:
            with running.scope:
                await trio.to_thread.run_sync(self.journal.mark_running, job_id, now_ms())
                log.info("job_started", kind=kind)
                if self.prepare is not None and isinstance(getattr(req, "model", None), str):
                    await self.prepare(req.model)
                running.reply = await run(req, job_id, fan_out)
                await trio.to_thread.run_sync(
                    self.journal.succeed, job_id, encode(running.reply), now_ms()
                )
                self._metrics.inc("jobs_total", outcome="succeeded", kind=kind)
                log.info("job_succeeded", kind=kind)
            if running.scope.cancelled_caught:
                running.error = ApiError("failed", f"job {job_id} was cancelled")
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.journal.cancel, job_id, now_ms())
                self._metrics.inc("jobs_total", outcome="cancelled", kind=kind)
        except ApiError as exc:
            running.error = exc
            await self._fail(job_id, kind, f"{exc.code}: {exc.message}")
        except NEXUS_ERRORS as exc:
            running.error = ApiError("failed", f"{type(exc).__name__}: {exc}")
            await self._fail(job_id, kind, str(running.error))
        except Exception as exc:  # boundary: one job's bug must not take the daemon down
            log.exception("job_crashed", kind=kind)
            running.error = ApiError("internal", f"job crashed ({type(exc).__name__}); see log")
            await self._fail(job_id, kind, f"internal: {type(exc).__name__}: {exc}")
        finally:
            structlog.contextvars.unbind_contextvars("job")
            self._running.pop(job_id, None)
            running.done.set()

    async def _fail(self, job_id: str, kind: str, reason: str) -> None:
        self._metrics.inc("jobs_total", outcome="failed", kind=kind)
        log.warning("job_failed", kind=kind, reason=reason)
        try:
            await trio.to_thread.run_sync(self.journal.fail, job_id, reason, now_ms())
        except IllegalTransition as exc:  # it finished (or was cancelled) meanwhile
            log.warning("job_fail_not_recorded", reason=str(exc))

    def _stored_outcome(self, rec: Any) -> object:
        if rec.state is JobState.SUCCEEDED and rec.result is not None:
            return decode_any(rec.result, REPLY_TYPES)
        reason = rec.error or rec.state.value
        raise ApiError("failed", f"job {rec.job_id} {rec.state.value}: {reason}")

    async def _jobs(self, req: JobsRequest, _emit: Emit) -> JobsReply:
        if not 1 <= req.limit <= 1000:
            raise ApiError("bad_request", f"limit: expected 1..1000, got {req.limit}")
        recs = await trio.to_thread.run_sync(lambda: self.journal.list(limit=req.limit))
        return JobsReply(
            tuple(
                JobRow(
                    job_id=r.job_id,
                    kind=r.kind,
                    state=r.state.value,
                    created_ms=r.created_ms,
                    updated_ms=r.updated_ms,
                    attempts=r.attempts,
                    error=r.error or "",
                )
                for r in recs
            )
        )

    async def _cancel(self, req: CancelRequest, _emit: Emit) -> OkReply:
        running = self._running.get(req.job_id)
        if running is None:
            try:
                rec = await trio.to_thread.run_sync(self.journal.get, req.job_id)
            except UnknownJob:
                raise ApiError("not_found", f"no job {req.job_id!r}") from None
            raise ApiError("conflict", f"job {req.job_id} is already {rec.state.value}")
        running.user_cancelled = True
        running.scope.cancel()
        await running.done.wait()
        rec = await trio.to_thread.run_sync(self.journal.get, req.job_id)
        if rec.state is not JobState.CANCELLED:  # it finished before the cancel took hold
            raise ApiError("conflict", f"job {req.job_id} finished first: {rec.state.value}")
        return OkReply(f"job {req.job_id} cancelled")

    async def _result(self, req: ResultRequest, _emit: Emit) -> object:
        running = self._running.get(req.job_id)
        if running is not None:
            await running.done.wait()
        try:
            rec = await trio.to_thread.run_sync(self.journal.get, req.job_id)
        except UnknownJob:
            raise ApiError("not_found", f"no job {req.job_id!r}") from None
        return self._stored_outcome(rec)


def _observe(running: _Running, event: object) -> None:
    """Keep what the dashboard shows of a running job from its events."""
    if isinstance(event, RouteEvent):
        running.route = event
    elif isinstance(event, TokenEvent):
        running.tokens += 1
    elif isinstance(event, ProgressEvent):
        running.progress = event
    elif isinstance(event, TrainProgressEvent):
        running.losses.append(event)
        del running.losses[:-LOSS_POINTS]
