"""The origin's judges: its own computation of a span, from its model files, for spot checks.

Rule 1: a judge is a span loaded from this node's model folder and run on a fresh session
of its own (float32; one step per stored input, as the host ran them); the last
`ARBITER_SPANS` spans loaded stay loaded, so the checks of one job reuse them.
Rule 2: `ready` says whether a check can be judged without loading first (session.py
Rule 6); if not it starts the load in the background nursery `run` holds, once however
often it is asked meanwhile, and a judgement that needs the span then waits for that load.
Without `run` (no background), every judge loads when a check needs it.
Rule 3: one judgement runs at a time (`limiter`): judges share the device with the node's
own hosting, and a check's latency matters less than the steps it runs beside.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import structlog
import torch
import trio

from atoms.errors import AtomError
from atoms.span import Span

from ..errors import NexusError
from ..exec.hosting import SpanHost, session_kv_bytes
from ..exec.session import HopPlan, LocalHop, StepInput
from ..metrics import Metrics
from ..model_registry import ModelRegistry

log = structlog.get_logger(__name__)
ARBITER_SPANS = 2  # spans kept loaded for spot checks' own computation
ARBITER_PAGE_TOKENS = 64  # its one session's pool: a few large pages, sized to the check
JudgeKey = tuple[str, int, int]  # (model, start, end)
JUDGE = b"judge"  # the peer a judgement's private host serves (its only session)


class Judges:
    """This node's judges of spot checks (`session.Verification.arbiter`).

    Args:
        registry: the model folder the spans load from.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._spans: OrderedDict[JudgeKey, Span] = OrderedDict()
        self._limiter = trio.CapacityLimiter(1)
        self._loading: dict[JudgeKey, trio.Event] = {}
        self._failed: set[JudgeKey] = set()
        self._background: trio.Nursery | None = None  # while `run` runs

    def __repr__(self) -> str:
        return f"Judges(loaded={list(self._spans)}, loading={list(self._loading)})"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery background loads run in (Rule 2)."""
        async with trio.open_nursery() as nursery:
            self._background = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._background = None

    async def output(
        self,
        key: JudgeKey,
        inputs: list[StepInput],
        batch: int,
        max_len: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        """This node's own output of `key`'s span for the last of `inputs` (its last position
        only with `last_only`, wire Rule 6), on a fresh session (Rule 1)."""
        loading = self._loading.get(key)
        if loading is not None:  # loading in the background: wait for it rather than twice
            await loading.wait()
        span = self._spans.get(key)
        if span is None:
            span = await trio.to_thread.run_sync(self._registry.load_span, *key)
        self._keep(key, span)  # the most recent judge
        host = SpanHost(
            [span],
            kv_budget_bytes=session_kv_bytes(
                span, batch=batch, max_len=max_len, page_tokens=ARBITER_PAGE_TOKENS
            ),
            kv_page_tokens=ARBITER_PAGE_TOKENS,
            max_sessions=1,
            limiter=self._limiter,
            metrics=Metrics(),
        )
        model_id, start, end = key
        hop = LocalHop(HopPlan(JUDGE, start, end), model_id, host, JUDGE)
        try:
            await hop.open(batch, max_len)
            outs = await hop.replay(0, inputs, per_step_s=0.0, last_only=last_only)
        finally:
            await hop.close()
        return outs[-1]

    def ready(self, key: JudgeKey) -> bool:
        """Whether a check can be judged on `key`'s span without loading it first; if not,
        its load starts in the background (Rule 2). True without a background, or when
        the load failed there (the check then loads it, or reports itself undecided)."""
        if key in self._spans or self._background is None or key in self._failed:
            return True
        if key not in self._loading:
            self._loading[key] = trio.Event()
            self._background.start_soon(self._load, key)
        return False

    def _keep(self, key: JudgeKey, span: Span) -> None:
        """Keep `span` loaded as the most recent of the last `ARBITER_SPANS` judges."""
        self._spans.pop(key, None)
        self._spans[key] = span
        while len(self._spans) > ARBITER_SPANS:
            self._spans.popitem(last=False)

    async def _load(self, key: JudgeKey) -> None:
        t0 = time.perf_counter()
        model, start, end = key
        try:
            span = await trio.to_thread.run_sync(self._registry.load_span, *key)
        except (NexusError, AtomError, OSError, ValueError) as exc:
            self._failed.add(key)
            log.warning("judge_load_failed", model=model, start=start, end=end, reason=str(exc))
        else:
            self._keep(key, span)
            log.info(
                "judge_loaded",
                model=model,
                start=start,
                end=end,
                load_s=round(time.perf_counter() - t0, 3),
            )
        finally:
            self._loading.pop(key).set()
