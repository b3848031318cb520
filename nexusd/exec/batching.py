"""Batching the decode steps of concurrent sessions on one host (issue #15, item 2).

Rule 1: a step that can join a batch (`atoms.batched.batchable`: one new token per row)
waits at most `window_s` for steps of other sessions, and not at all when fewer than two
sessions stepped recently (an idle host or a lone session pays nothing). It waits only for
the sessions that are due: each session's steps arrive here about once per period (a
running average of the gaps between its decode steps; the gap after its first step, which
holds its prefill and first checks, does not count), so a session whose next step is
expected after the window ends is not awaited; one without a period yet, or due (or
overdue) within the window, is, until the window ends; a session the host has dropped is
forgotten at once. The wait ends as soon as no awaited session is missing. Waiting for
every recently active session instead made streams that had drifted a cycle apart wait
out the window at every hop for steps that could not come in it (traced under 8
concurrent generations: the median first step of a batch waited 5.9 ms of a 5 ms window).
Rule 2: whoever gets the device first runs every waiting step of its span and key (up to
`max_batch`) as ONE forward (`atoms.batched.run_batched`); steps that arrive while the
device is busy simply wait, and the next holder takes them together (continuous batching
in Orca's sense, Yu et al., OSDI 2022, §3.2: the batch is re-formed at every step).
Rule 3: a batch that fails is undone (each cache's lengths restored; its pages stay with
their sessions) and its steps run one by one, so one session's bad step fails only itself.
Rule 4: one step alone runs exactly the unbatched code (`single`): bit-identical to a host
without batching.
Rule 5 (inline steps): a step runs on the event loop's own thread instead of a worker
thread when it is alone on an idle host (fewer than two sessions active, as in Rule 1) and
its span's recent steps of its shape took at most `inline_max_s` each (a running average;
the first step of a shape always goes to a worker, which measures it). That saves the two
thread hand-offs of `trio.to_thread` per step (the worker's wake-up and the loop's), which
on a loaded 2-core machine cost a single stream over three daemons 12 % of its tokens/s
(README, "Speed"); the price is a loop that does not read its sockets for those few
milliseconds, which an idle host does not miss. Under concurrency (two or more active
sessions) every step goes to a worker, so steps arriving during a computation still queue
here and form the next batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import torch
import trio

from atoms.batched import BatchItem, batch_key, run_batched
from atoms.errors import AtomError

if TYPE_CHECKING:
    from atoms.span import Span

log = structlog.get_logger(__name__)
STEP_ERRORS = (AtomError, ValueError, RuntimeError)  # what a forward raises on bad input
ACTIVE_S = 1.0  # a session that stepped this recently counts as company for a batch
PERIOD_SMOOTHING = 0.5  # weight of the latest gap in a session's arrival period


@dataclass(slots=True)
class _Arrivals:
    """When a session's latest step arrived, how many gaps it has had, and its running
    period (None until a gap after the first one)."""

    last: float
    gaps: int = 0
    period: float | None = None


@dataclass(eq=False, slots=True, kw_only=True)
class BatchedStep:
    """One session's step waiting for the device, and then its outcome.

    Args:
        span: the span the step runs on (steps batch only with steps of an equal span).
        item: the step as a batch member.
        single: runs the step alone, exactly as an unbatched host would.
        batchable: whether it may join others (`atoms.batched.batchable`); if not, it
            runs alone at its turn, without waiting for company.
        session: the session the step belongs to (any hashable key): its arrivals tell
            when its next step is due (Rule 1).
    """

    span: Span
    item: BatchItem
    single: Callable[[], torch.Tensor]
    batchable: bool
    session: Hashable = None  # whose step (Rule 1's arrival periods); None: not tracked
    queued_at: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0
    out: torch.Tensor | None = None
    error: Exception | None = None
    done: bool = False

    @property
    def key(self) -> tuple[object, ...]:
        if not self.batchable:
            return (id(self),)
        s = self.span
        return (s.model_id, s.start, s.end, *batch_key(self.item))


class StepBatcher:
    """Runs steps on the device, one batch per turn of the device limiter.

    Args:
        limiter: the device's CapacityLimiter (torch work runs behind it).
        window_s: how long a step waits for company (0: never).
        max_batch: most steps in one batch.
        active: how many sessions stepped recently on this host (the company to expect).
        on_batch: called with (steps, seconds) after every run (metrics, load meter).
        inline_max_s: Rule 5's bound on a step computed on the loop's thread (0: never).
    """

    def __init__(
        self,
        *,
        limiter: trio.CapacityLimiter,
        window_s: float,
        max_batch: int,
        active: Callable[[], int],
        on_batch: Callable[[int, float], None],
        inline_max_s: float = 0.0,
    ) -> None:
        if window_s < 0 or max_batch < 1 or inline_max_s < 0:
            raise ValueError(
                "batcher needs window_s >= 0, max_batch >= 1 and inline_max_s >= 0, got "
                f"{window_s}, {max_batch}, {inline_max_s}"
            )
        self._limiter = limiter
        self._window = window_s
        self._max = max_batch
        self._active = active
        self._on_batch = on_batch
        self._waiting: list[BatchedStep] = []
        self._arrived = trio.Event()
        self._gathering: trio.Event | None = None
        self._inline_max = inline_max_s
        self._step_s: dict[tuple[object, ...], float] = {}  # Rule 5: recent seconds per key
        self._arrivals: dict[Hashable, _Arrivals] = {}  # Rule 1: per session
        self.inline_steps = 0  # steps computed on the loop's thread (Rule 5)

    def __repr__(self) -> str:
        return f"StepBatcher({len(self._waiting)} waiting, window {self._window * 1e3:.1f} ms)"

    async def run(self, step: BatchedStep) -> torch.Tensor:
        """Compute `step` (alone or in a batch) and return its output.

        Raises:
            AtomError, ValueError, RuntimeError: the step's own forward failed.

        Cancellation: a cancelled step leaves the queue; a batch already on the device
        finishes (torch threads are not abandoned), and its results are delivered.
        """
        step.queued_at = time.perf_counter()
        self._arrival(step.session)
        self._waiting.append(step)
        self._arrived.set()
        try:
            if step.batchable:
                await self._gather()
            while not step.done:
                async with self._limiter:
                    if not step.done:
                        await self._execute(self._take(step))
        finally:
            if not step.done and step in self._waiting:
                self._waiting.remove(step)
        if step.error is not None:
            raise step.error
        assert step.out is not None
        return step.out

    def _arrival(self, session: Hashable) -> None:
        """Note a step of `session` arriving now (its period, Rule 1); forget sessions that
        have not stepped for `ACTIVE_S`."""
        if session is None:
            return
        now = trio.current_time()
        seen = self._arrivals.get(session)
        if seen is None:
            stale = [k for k, a in self._arrivals.items() if now - a.last > ACTIVE_S]
            for k in stale:
                del self._arrivals[k]
            self._arrivals[session] = _Arrivals(now)
            return
        gap, old = now - seen.last, seen.period
        seen.gaps += 1
        if seen.gaps >= 2:  # the first gap holds the prefill and its checks
            seen.period = gap if old is None else old + PERIOD_SMOOTHING * (gap - old)
        seen.last = now

    def forget(self, session: Hashable) -> None:
        """`session` has ended here: no step of it is awaited any more."""
        self._arrivals.pop(session, None)

    def _awaited(self, end: float, now: float) -> bool:
        """Whether a session is still awaited by a gather that ends at `end` (Rule 1): one
        that stepped recently, has no step waiting, and is due before `end` (or has no
        period yet)."""
        here = {s.session for s in self._waiting}
        for session, a in self._arrivals.items():
            if session in here or now - a.last > ACTIVE_S:
                continue
            if a.period is None or a.last + a.period <= end:
                return True
        return False

    async def _gather(self) -> None:
        """The first waiting step holds the others back while sessions are due (Rule 1)."""
        if self._gathering is not None:
            await self._gathering.wait()
            return
        if self._window <= 0 or min(self._max, self._active()) < 2:
            return
        self._gathering = trio.Event()
        end = trio.current_time() + self._window
        try:
            with trio.move_on_at(end):
                while len(self._waiting) < self._max and self._awaited(end, trio.current_time()):
                    self._arrived = trio.Event()
                    await self._arrived.wait()
        finally:
            self._gathering.set()
            self._gathering = None

    def _take(self, step: BatchedStep) -> list[BatchedStep]:
        key = step.key
        batch = [s for s in self._waiting if s.key == key][: self._max]
        if step not in batch:
            batch[-1:] = [step]
        for s in batch:
            self._waiting.remove(s)
        return batch

    async def _execute(self, batch: list[BatchedStep]) -> None:
        t0 = time.perf_counter()
        if self._inline(batch):
            _compute(batch)  # Rule 5: on this thread, the loop held for the step
            self.inline_steps += 1
        else:
            await trio.to_thread.run_sync(_compute, batch)  # the device is held by the caller
        for s in batch:
            s.done = True
        if len(batch) == 1 and batch[0].batchable and batch[0].error is None:
            s = batch[0]
            took = s.finished - s.started
            last = self._step_s.get(s.key)
            self._step_s[s.key] = took if last is None else 0.7 * last + 0.3 * took
        self._on_batch(len(batch), time.perf_counter() - t0)

    def _inline(self, batch: list[BatchedStep]) -> bool:
        """Rule 5: a lone step of a measured, fast-enough shape on an idle host."""
        if self._inline_max <= 0 or len(batch) != 1 or not batch[0].batchable:
            return False
        recent = self._step_s.get(batch[0].key)
        return recent is not None and recent <= self._inline_max and self._active() < 2


def _compute(batch: list[BatchedStep]) -> None:
    """Worker thread: run the batch, or its steps one by one (alone, or after a failure)."""
    start = time.perf_counter()
    if len(batch) > 1:
        caches = [s.item.cache for s in batch if s.item.cache is not None]
        saved = [dict(c.lengths) for c in caches]
        try:
            with torch.inference_mode():
                outs = run_batched(batch[0].span, [s.item for s in batch])
        except STEP_ERRORS as exc:
            for cache, lengths in zip(caches, saved, strict=True):
                cache.lengths = lengths  # undo: the pages written past them are rewritten
            log.info("batch_failed_retrying_alone", steps=len(batch), reason=str(exc))
        else:
            end = time.perf_counter()
            for s, out in zip(batch, outs, strict=True):
                s.out, s.started, s.finished, s.batch_size = out, start, end, len(batch)
            return
    for s in batch:
        s.started = time.perf_counter()
        try:
            with torch.inference_mode():
                s.out = s.single()
        except STEP_ERRORS as exc:
            s.error = exc
        s.finished, s.batch_size = time.perf_counter(), 1
