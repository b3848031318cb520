"""Training jobs: `train lm` and `train classify`, run from this node over the mesh.

Rule 1: a run is a pure function of (request, data): the examples of every step follow
from the seed (`atoms.datasets.Order`), dropout seeds from (seed, step, micro-batch), and
gradients add up in the schedule's order; so a run resumed from a checkpoint ends with the
same parameters as an uninterrupted one.
Rule 2: the origin keeps the checkpoints (every `checkpoint_interval` steps, written
atomically, fsynced, the last two kept): when a host dies mid-run its span moves to
another host, which restores the last checkpoint, and the steps since are run again; when
this node dies the journal re-runs the job, which resumes from the same place.
Rule 3: nothing of a run is trusted before it is checked: the data before the first step
(`DataError`), every tensor and count from a host (the pipeline), the loss of every step
(NaN stops the job at that step, the last good checkpoint kept).
Rule 4: the result is a new model version: the parent's atoms with the trained parameters,
saved under the `output` id with its lineage (parent, parent digest, data digest, the
training settings and final metrics) in its config.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import trio
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from atoms.bert import with_classifier_head
from atoms.corpus import corpus_path, read_text
from atoms.datasets import (
    Dataset,
    Examples,
    Order,
    classify_dataset,
    file_digest,
    lm_dataset,
    read_labelled,
)
from atoms.errors import AtomError
from atoms.model import Model
from atoms.span import Span
from atoms.training import OptimConfig, Schedule, apply_trained, micro_batch_seed, renamed
from mesh.closing import close_bounded

from ..api.records import TRAIN_TASKS, HopReport, TrainProgressEvent, TrainReply, TrainRequest
from ..errors import ApiError
from ..exec.adaptive import JOB_CODECS
from ..exec.hosting import ExecRefused
from ..exec.session import HopFailed, HopPlan, JobFailed
from ..exec.train_host import TrainHost, local_link
from ..exec.train_origin import (
    MicroBatch,
    StepReport,
    TrainHop,
    TrainPipeline,
)
from ..exec.train_replicas import Averaging, ReplicaGroup
from ..exec.train_verify import TrainVerifier
from ..exec.train_wire import MAX_TARGETS, SCHEDULES
from ..exec.verify import VerifyPolicy
from ..metrics import Metrics
from ..model_registry import ModelRegistry
from .costs import HopCosts

log = structlog.get_logger(__name__)

Emit = Callable[[object], Awaitable[None]]
KEEP_CHECKPOINTS = 2
MAX_STEPS = 1_000_000
METRICS_FIELDS = (
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_ppl",
    "val_accuracy",
    "tokens",
    "elapsed_s",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """How the run reaches the mesh (the engine provides it)."""

    plan: Callable[[str, frozenset[bytes]], list[HopPlan]]  # (model, excluded) -> hops
    connect: Callable[[HopPlan, str], Awaitable[TrainHop]]  # a hop's training session
    # a host failed, (host, penalty, reason): scored and banned past a threshold
    report: Callable[[bytes, str, str], None]
    name_of: Callable[[bytes], str]
    wait_s: float = 60.0  # how long to wait for a route to appear
    on_route: Callable[[list[HopPlan], str], Awaitable[None]] | None = None  # told each route


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What a request resolves to before anything runs."""

    parent: Model
    first_trainable: int
    causal: bool
    data: Dataset
    optim: OptimConfig
    schedule: Schedule


def validate(req: TrainRequest) -> None:
    """Refuse a request whose settings are out of range (`bad_request` names the field)."""
    checks = [
        (req.task in TRAIN_TASKS, "task", f"one of {TRAIN_TASKS}"),
        (
            bool(req.output) and "/" not in req.output and not req.output.startswith("."),
            "output",
            "a model id without '/'",
        ),
        (req.output != req.model, "output", "an id other than the parent model's"),
        (1 <= req.steps <= MAX_STEPS, "steps", f"1..{MAX_STEPS}"),
        (1 <= req.micro_batch <= 512, "micro_batch", "1..512"),
        (1 <= req.accumulation <= 1024, "accumulation", "1..1024"),
        (2 <= req.seq_len <= 4096, "seq_len", "2..4096"),
        (
            req.micro_batch * req.seq_len <= MAX_TARGETS,
            "micro_batch",
            f"micro_batch x seq_len at most {MAX_TARGETS} (one message carries a loss step's "
            "targets)",
        ),
        (0 <= req.warmup_steps <= req.steps, "warmup_steps", "0..steps"),
        (req.clip >= 0 and math.isfinite(req.clip), "clip", ">= 0 (0: no clipping)"),
        (req.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
        (req.codec in JOB_CODECS, "codec", f"one of {JOB_CODECS}"),
        (req.eval_interval >= 0, "eval_interval", ">= 0"),
        (1 <= req.eval_examples <= 100_000, "eval_examples", "1..100000"),
        (req.checkpoint_interval >= 0, "checkpoint_interval", ">= 0"),
        (0 <= req.seed < 1 << 62, "seed", "0..2^62"),
        (1 <= req.replicas <= 64, "replicas", "1..64"),
        (1 <= req.average_every <= 100_000, "average_every", "1..100000"),
        (
            req.checkpoint_interval % req.average_every == 0,
            "checkpoint_interval",
            "a multiple of average_every (replicas are identical only after a round)",
        ),
        (0 < req.outer_lr <= 2, "outer_lr", "(0, 2]"),
        (0 <= req.outer_momentum < 1, "outer_momentum", "[0, 1)"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise ApiError(
                "bad_request", f"{name}: expected {expected}, got {getattr(req, name)!r}"
            )
    try:
        schedule_of(req)
        optim_of(req)
    except ValueError as exc:
        raise ApiError("bad_request", str(exc)) from None


def schedule_of(req: TrainRequest) -> Schedule:
    """The learning-rate schedule a request asks for (ValueError names a bad knob)."""
    return Schedule(
        lr=req.lr,
        warmup_steps=req.warmup_steps,
        total_steps=req.steps,
        decay=req.decay,
        min_ratio=req.min_lr_ratio,
    )


def optim_of(req: TrainRequest) -> OptimConfig:
    """The optimiser settings a request asks for (ValueError names a bad knob)."""
    return OptimConfig(weight_decay=req.weight_decay, dropout=req.dropout, precision=req.precision)


class CheckpointStore:
    """The checkpoints and metrics of one run, in its own folder.

    A checkpoint is one safetensors file `step-<N>.safetensors` (tensors by absolute atom
    name; metadata: step, and the BLAKE2b digest of the request it belongs to), written to
    a temporary name, fsynced, then renamed: a crash leaves the previous one intact.
    """

    def __init__(self, folder: Path, request_digest: str) -> None:
        self.folder = folder
        self._digest = request_digest
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.folder / f"step-{step:08d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(
            {n: t.contiguous() for n, t in tensors.items()},
            str(tmp),
            metadata={"step": str(step), "request": self._digest},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.folder)
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.safetensors"))

    def latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest checkpoint of this request that reads back whole, or None."""
        for path in reversed(self.checkpoints()):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                tensors = load_file(str(path))
                step = int(path.stem.removeprefix("step-"))
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                log.warning("checkpoint_unreadable", path=str(path), reason=str(exc))
                continue
            if meta.get("request") != self._digest:
                log.warning("checkpoint_of_another_run", path=str(path))
                continue
            return step, tensors
        return None

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.csv"

    def metrics_rows(self) -> list[dict[str, str]]:
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="") as f:
            return list(csv.DictReader(f))

    def rewind_metrics(self, step: int) -> None:
        """Keep the metrics rows of steps <= `step` (a resumed run writes the rest again)."""
        rows = [r for r in self.metrics_rows() if int(r["step"]) <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_path)

    def append_metrics(self, row: dict[str, object]) -> None:
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_FIELDS).writerow(row)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def request_digest(req: TrainRequest) -> str:
    """BLAKE2b of a request's settings (not its job id): a checkpoint names the run it is of."""
    fields = dataclasses.asdict(req)
    fields.pop("job_id")
    if fields["codec"] == "raw":
        fields.pop("codec")  # the default: the digests of runs from before the field hold
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()


def load_data(req: TrainRequest, parent: Model) -> Dataset:
    """Read and encode the request's data (blocking: run it in a thread).

    Raises:
        ApiError(bad_request): the data is missing, empty, not UTF-8, or labels do not fit.
    """
    tok = parent.tokenizer
    if tok is None:
        raise ApiError("bad_request", f"model {parent.model_id} has no tokenizer")
    try:
        if req.task == "lm":
            path = Path(req.data) if req.data else corpus_path()
            val = read_text(Path(req.validation)) if req.validation else None
            return lm_dataset(
                read_text(path),
                tok,
                length=req.seq_len,
                digest=file_digest(path),
                validation_text=val,
            )
        if not req.data:
            raise ApiError(
                "bad_request",
                "data: train classify needs a labelled .jsonl or "
                ".csv file (text and label per row)",
            )
        path = Path(req.data)
        rows = read_labelled(path)
        if req.validation:
            rows = [(t, lab, "train") for t, lab, _ in rows]
            rows += [(t, lab, "validation") for t, lab, _ in read_labelled(Path(req.validation))]
        return classify_dataset(rows, tok, digest=file_digest(path))
    except AtomError as exc:
        raise ApiError("bad_request", f"data: {exc}") from None


def micro_batches(
    data: Examples, order: Order, step: int, accumulation: int, seed: int
) -> list[MicroBatch]:
    out = []
    for k in range(accumulation):
        ex = data.take(order.rows(step * accumulation + k))
        out.append(
            MicroBatch(
                x=ex.inputs, targets=ex.targets, mask=ex.mask, seed=micro_batch_seed(seed, step, k)
            )
        )
    return out


def eval_batches(data: Examples, size: int, limit: int) -> list[MicroBatch]:
    n = min(limit, len(data))
    out = []
    for i in range(0, n, size):
        ex = data.take(range(i, min(i + size, n)))
        out.append(MicroBatch(x=ex.inputs, targets=ex.targets, mask=ex.mask, seed=0))
    return out


class TrainRun:
    """One training job from request to new model (see the module rules)."""

    def __init__(
        self,
        req: TrainRequest,
        job_id: str,
        plan: Plan,
        route: Route,
        *,
        folder: Path,
        emit: Emit,
        max_failovers: int = 8,
        verify: TrainVerifier | None = None,
    ) -> None:
        self.req, self.job_id, self.plan, self.route = req, job_id, plan, route
        self.verify = verify
        self.store = CheckpointStore(folder, request_digest(req))
        self.emit = emit
        self.failovers: list[str] = []
        self._max_failovers = max_failovers
        self._excluded: set[bytes] = set()
        self.costs = HopCosts()
        self.idle: dict[bytes, list[float]] = {}
        self.order = Order(len(plan.data.train), req.micro_batch, req.seed)
        self.tokens = 0
        self.last_loss = math.nan
        self.val: tuple[float, float] = (math.nan, math.nan)  # (loss, accuracy)
        self.resumed_from = -1

    async def run(self) -> tuple[dict[str, torch.Tensor], float]:
        """Train to the last step; returns the trained tensors and the seconds it took."""
        saved = self.store.latest()
        step, state = (saved[0], saved[1]) if saved is not None else (0, None)
        if saved is not None:
            self.resumed_from = step
            self.store.rewind_metrics(step)
            log.info("train_resumed", job=self.job_id, step=step)
            await self.emit(self._progress(step, 0.0, 0.0, resumed_from=step))
        else:
            self.store.rewind_metrics(-1)  # a fresh metrics.csv with its header
        t0 = time.perf_counter()
        while True:
            group = await self._open(step, state)
            try:
                step, state = await self._train(group, step, t0)
                return state, time.perf_counter() - t0
            except HopFailed as exc:
                self._failed(exc)
                saved = self.store.latest()
                step, state = (saved[0], saved[1]) if saved is not None else (0, None)
                self.store.rewind_metrics(step)
                log.warning("train_rerouted", job=self.job_id, resume_step=step, reason=str(exc))
            finally:
                for pipe in group.pipelines:
                    await close_bounded(pipe.close, 10.0)

    def _failed(self, exc: HopFailed) -> None:
        if exc.blame:
            self.route.report(exc.host, exc.penalty, exc.reason)
        if not exc.retryable:
            raise JobFailed(str(exc)) from exc
        self._excluded.add(exc.host)
        self.failovers.append(str(exc))
        if len(self.failovers) > self._max_failovers:
            raise JobFailed(f"gave up after {len(self.failovers)} failovers; last: {exc}")

    async def _plan(self) -> list[HopPlan]:
        """The route, waiting (bounded) for one: after a restart the hosts' adverts take a
        few seconds to arrive, and a replacement host may still be loading its span."""
        delay, waited = 0.5, 0.0
        while True:
            try:
                return self.route.plan(self.req.model, frozenset(self._excluded))
            except ApiError as exc:
                if exc.code == "unavailable" and waited >= self.route.wait_s and self.failovers:
                    raise ApiError(
                        exc.code, f"{exc.message}; excluded: {self.failovers[-1]}"
                    ) from None
                if exc.code != "unavailable" or waited >= self.route.wait_s:
                    raise
                log.info("train_waiting_for_route", job=self.job_id, reason=exc.message)
                await trio.sleep(delay)  # the mesh changes on its own; poll it, bounded
                waited += delay
                delay = min(5.0, delay * 2)

    async def _open(self, step: int, state: dict[str, torch.Tensor] | None) -> ReplicaGroup:
        """Open the run's replicas (distinct trainable hosts; fewer when the mesh has fewer)
        and restore `state` onto every one of them."""
        outer = {n: t for n, t in (state or {}).items() if n.startswith("outer_")}
        inner = {n: t for n, t in state.items() if not n.startswith("outer_")} if state else None
        if self.verify is not None:
            self.verify.opened(step, inner, self.plan.parent)
        pipes = [await self._open_one(step, inner, frozenset())]
        while len(pipes) < self.req.replicas:
            taken = frozenset(h.plan.host for p in pipes for h in p.trainable_hops())
            try:
                pipes.append(await self._open_one(step, inner, taken, wait=False))
            except ApiError as exc:
                log.warning(
                    "train_replicas_reduced",
                    job=self.job_id,
                    replicas=len(pipes),
                    reason=exc.message,
                )
                break
        group = ReplicaGroup(
            pipes,
            Averaging(
                every=self.req.average_every,
                outer_lr=self.req.outer_lr,
                outer_momentum=self.req.outer_momentum,
            ),
        )
        if outer:
            group.load_outer(outer)
        else:
            await group.start()
        return group

    async def _open_one(
        self,
        step: int,
        state: dict[str, torch.Tensor] | None,
        taken: frozenset[bytes],
        *,
        wait: bool = True,
    ) -> TrainPipeline:
        while True:
            hops: list[TrainHop] = []
            try:
                plans = (
                    await self._plan()
                    if wait
                    else self.route.plan(self.req.model, frozenset(self._excluded) | taken)
                )
                for p in plans:
                    hops.append(await self.route.connect(p, self.req.model))
                pipe = TrainPipeline(
                    hops,
                    first_trainable=self.plan.first_trainable,
                    schedule=self.req.schedule,
                    causal=self.plan.causal,
                    verify=self.verify,
                )
                await pipe.open(self.plan.optim, next_step=step, state=state)
                if self.route.on_route is not None:
                    why = self.failovers[-1] if self.failovers else "opened"
                    await self.route.on_route(pipe.route, why)
                return pipe
            except HopFailed as exc:
                for hop in hops:
                    await hop.close()
                self._failed(exc)

    async def _train(
        self, group: ReplicaGroup, step: int, t0: float
    ) -> tuple[int, dict[str, torch.Tensor]]:
        req, data = self.req, self.plan.data
        start = step
        while step < req.steps:
            mbs = micro_batches(data.train, self.order, step, req.accumulation, req.seed)
            lr = self.plan.schedule.lr_at(step)
            report = await group.step(step, mbs, lr=lr, clip=req.clip)
            step += 1
            self._account(report)
            evaluate = req.eval_interval > 0 and (step % req.eval_interval == 0)
            if evaluate or step == req.steps:
                await self._evaluate(group.pipelines[0])
            elapsed = time.perf_counter() - t0
            rate = self.tokens / elapsed if elapsed > 0 else 0.0
            eta = (req.steps - step) * elapsed / max(1, step - start)
            self.store.append_metrics(self._row(step, lr, evaluate or step == req.steps, elapsed))
            await self.emit(
                self._progress(step, lr, rate, eta=eta, evaluated=evaluate or step == req.steps)
            )
            if req.checkpoint_interval and step % req.checkpoint_interval == 0 and step < req.steps:
                await trio.to_thread.run_sync(self.store.save, step, await _state(group))
        if req.replicas > 1 and step % req.average_every:
            await group.average(step)  # the last round: the result is one set of weights
        state = await _state(group)
        await trio.to_thread.run_sync(self.store.save, step, state)
        return step, state

    def _account(self, report: StepReport) -> None:
        self.tokens += report.count
        self.last_loss = report.loss / report.count
        for plan, cost in report.hops.items():
            self.costs.merge((plan.host, plan.start, plan.end), cost)
            self.idle.setdefault(plan.host, []).append(report.idle_fraction(plan))

    async def _evaluate(self, pipe: TrainPipeline) -> None:
        batches = eval_batches(
            self.plan.data.validation, self.req.micro_batch, self.req.eval_examples
        )
        result = await pipe.evaluate(batches)
        if result.count:
            self.val = (result.loss / result.count, result.correct / result.count)

    def _row(self, step: int, lr: float, evaluated: bool, elapsed: float) -> dict[str, object]:
        val_loss, val_acc = self.val if evaluated else (math.nan, math.nan)
        return {
            "step": step,
            "lr": f"{lr:.6g}",
            "train_loss": f"{self.last_loss:.6f}",
            "val_loss": "" if math.isnan(val_loss) else f"{val_loss:.6f}",
            "val_ppl": "" if math.isnan(val_loss) else f"{math.exp(min(val_loss, 50)):.4f}",
            "val_accuracy": "" if math.isnan(val_acc) else f"{val_acc:.6f}",
            "tokens": self.tokens,
            "elapsed_s": f"{elapsed:.2f}",
        }

    def _progress(
        self,
        step: int,
        lr: float,
        rate: float,
        *,
        eta: float = 0.0,
        evaluated: bool = False,
        resumed_from: int = -1,
    ) -> TrainProgressEvent:
        val_loss, val_acc = self.val if evaluated else (-1.0, -1.0)
        return TrainProgressEvent(
            job_id=self.job_id,
            step=step,
            steps=self.req.steps,
            loss=0.0 if math.isnan(self.last_loss) else round(self.last_loss, 6),
            lr=lr,
            tokens_per_s=round(rate, 2),
            eta_s=round(eta, 1),
            val_loss=round(val_loss, 6),
            val_accuracy=round(val_acc, 6),
            resumed_from=resumed_from,
        )

    def hop_reports(self) -> tuple[HopReport, ...]:
        return self.costs.report(self.route.name_of)

    def bubble(self) -> tuple[tuple[str, float], ...]:
        return tuple(
            (self.route.name_of(h), round(sum(v) / len(v), 4)) for h, v in self.idle.items() if v
        )


async def _state(group: ReplicaGroup) -> dict[str, torch.Tensor]:
    """A checkpoint: the first replica's tensors (all replicas are identical at a round's
    end) and the origin's outer state."""
    state, _ = await group.pipelines[0].state()
    return {**state, **group.outer_state()}


def reply_of(run: TrainRun, output: str, elapsed: float) -> TrainReply:
    req = run.req
    val_loss, val_acc = run.val
    return TrainReply(
        job_id=run.job_id,
        task=req.task,
        model=output,
        parent=req.model,
        steps=req.steps,
        train_loss=round(run.last_loss, 6) if not math.isnan(run.last_loss) else 0.0,
        val_loss=round(val_loss, 6) if not math.isnan(val_loss) else 0.0,
        val_perplexity=round(math.exp(min(val_loss, 50)), 4)
        if req.task == "lm" and not math.isnan(val_loss)
        else 0.0,
        val_accuracy=round(val_acc, 6) if not math.isnan(val_acc) else 0.0,
        tokens=run.tokens,
        elapsed_s=round(elapsed, 3),
        tokens_per_s=round(run.tokens / elapsed, 2) if elapsed > 0 else 0.0,
        resumed_from=run.resumed_from,
        checkpoint=str(run.store.folder),
        route=run.hop_reports(),
        failovers=tuple(run.failovers),
        bubble=run.bubble(),
    )


def reply_metrics(reply: TrainReply, figures: dict[str, float]) -> dict[str, float]:
    """A trained model's manifest metrics (`lineage`): the run's losses and steps around the
    task's own `figures` (perplexity, accuracy; a distilled student's cosines)."""
    return {
        "val_loss": reply.val_loss,
        **figures,
        "train_loss": reply.train_loss,
        "steps": float(reply.steps),
    }


def lineage(
    req: TrainRequest, parent_digest: str, data_digest: str, reply_metrics: dict[str, float]
) -> dict[str, str | int | float | bool]:
    """The config entries that record where a trained model came from."""
    settings = {k: v for k, v in dataclasses.asdict(req).items() if k not in ("job_id",)}
    return {
        "parent": req.model,
        "parent_digest": parent_digest,
        "data_digest": data_digest,
        "training": json.dumps(settings, sort_keys=True),
        "training_metrics": json.dumps(reply_metrics, sort_keys=True),
    }


def first_trainable(model: Model) -> int:
    """Index of the first atom holding a trainable parameter.

    Raises:
        ApiError(bad_request): nothing in the model trains.
    """
    for atom in model.atoms:
        if any(p.requires_grad for p in atom.parameters()):
            return atom.spec.index
    raise ApiError("bad_request", f"model {model.model_id} has no trainable parameters")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """What a training job needs from the engine and the daemon."""

    node_id: bytes
    planner: Callable[[str, int], Callable[[int, int, frozenset[bytes]], list[HopPlan]]]
    connect: Callable[[HopPlan, str], Awaitable[TrainHop]]  # this node's hosts and remote ones
    report: Callable[[bytes, str, str], None]  # (host, penalty, reason), see `Route.report`
    name_of: Callable[[bytes], str]
    registry: ModelRegistry
    limiter: trio.CapacityLimiter
    metrics: Metrics
    graph_budget_bytes: int
    folder: Path  # checkpoints live in folder/<job id>/
    route_wait_s: float
    on_route: Callable[[list[HopPlan], str], Awaitable[None]] | None = None
    verify: VerifyPolicy | None = None  # spot-checks of the hosts ([train] verify_*)


async def train(req: TrainRequest, job_id: str, emit: Emit, mesh: Mesh) -> TrainReply:
    """Run a training job (see the module rules) and register the model it produces."""
    validate(req)
    if req.output in mesh.registry.available():
        raise ApiError(
            "conflict", f"output: a model {req.output!r} exists already; choose another id"
        )
    parent = await trio.to_thread.run_sync(mesh.registry.load_model, req.model)
    data = await trio.to_thread.run_sync(load_data, req, parent)
    n = len(parent)
    hidden = mesh.registry.config_int(req.model, "hidden_size", 384)
    bytes_per_hop = req.micro_batch * req.seq_len * hidden * 4
    if req.task == "lm":
        model, causal = parent, parent.family in ("nexus", "llama")
        if not causal:
            raise ApiError(
                "bad_request",
                f"model {req.model} is an encoder; train lm needs a decoder such as nexus-1.1",
            )
        plan_parent = mesh.planner(req.model, bytes_per_hop)
        route = Route(
            plan=lambda _m, ex: plan_parent(0, n, ex),
            connect=mesh.connect,
            report=mesh.report,
            name_of=mesh.name_of,
            wait_s=mesh.route_wait_s,
            on_route=mesh.on_route,
        )
    else:
        model, causal = _with_head(parent, req, data.labels), False
        route = _head_route(mesh, req, n, model, bytes_per_hop)
    plan = Plan(
        parent=model,
        first_trainable=first_trainable(model),
        causal=causal,
        data=data,
        optim=optim_of(req),
        schedule=schedule_of(req),
    )
    verify = (
        None
        if mesh.verify is None
        else TrainVerifier.of(
            mesh.verify,
            plan.parent,
            plan.optim,
            plan.causal,
            mesh.node_id,
            mesh.limiter,
            mesh.metrics,
        )
    )
    run = TrainRun(req, job_id, plan, route, folder=mesh.folder / job_id, emit=emit, verify=verify)
    state, elapsed = await run.run()
    reply = reply_of(run, req.output, elapsed)
    metrics = reply_metrics(
        reply, {"val_perplexity": reply.val_perplexity, "val_accuracy": reply.val_accuracy}
    )
    extra = lineage(req, mesh.registry.manifest(req.model).digest, data.digest, metrics)
    if data.labels:
        extra |= {"labels": json.dumps(list(data.labels)), "head_of": req.model}
    trained = renamed(apply_trained(model, state), req.output, config=extra)
    await trio.to_thread.run_sync(mesh.registry.save, trained)
    mesh.metrics.inc("train_jobs_models_total", task=req.task)
    log.info("train_model_saved", model=req.output, parent=req.model, steps=req.steps)
    return reply


def _with_head(parent: Model, req: TrainRequest, labels: tuple[str, ...]) -> Model:
    """The parent (frozen) under the output id, with a fresh classifier head."""
    try:
        model = with_classifier_head(renamed(parent, req.output), len(labels), seed=req.seed)
    except AtomError as exc:
        raise ApiError("bad_request", f"model {req.model}: {exc}") from None
    for atom in model.atoms[:-1]:
        atom.requires_grad_(False)  # transfer learning: the base is frozen
    return model


def _head_route(mesh: Mesh, req: TrainRequest, n: int, model: Model, bytes_per_hop: int) -> Route:
    """The parent's atoms [0, n) over the mesh (frozen, forward only), then the new head on
    this node: the origin owns the only trainable atom, so it trains it in a TrainHost of
    the job's own."""
    plan_parent = mesh.planner(req.model, bytes_per_hop)
    head_plan = HopPlan(mesh.node_id, n, n + 1)

    def span_for(model_id: str, start: int, end: int) -> Span:
        if model_id != req.output or (start, end) != (n, n + 1):
            raise ExecRefused("not_hosted", f"this job trains only {req.output}[{n},{n + 1})")
        return model.span(start, end)

    head_host = TrainHost(
        span_for,
        limiter=mesh.limiter,
        metrics=mesh.metrics,
        graph_budget_bytes=mesh.graph_budget_bytes,
    )

    async def connect(p: HopPlan, model_id: str) -> TrainHop:
        if p == head_plan:
            return TrainHop(p, req.output, local_link(head_host, mesh.node_id), remote=False)
        return await mesh.connect(p, model_id)

    return Route(
        plan=lambda _m, ex: [*plan_parent(0, n, ex), head_plan],
        connect=connect,
        report=mesh.report,
        name_of=mesh.name_of,
        wait_s=mesh.route_wait_s,
        on_route=mesh.on_route,
    )
