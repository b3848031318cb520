"""Spot-checks of training: is a host's part of a micro-batch the one an honest host computes?

Rule 1: which micro-batches are checked is decided by `VerifyPolicy.sampled` ([train]
verify_rate, verify_first_micro_batches) from how many micro-batches the stage host
(host, start, end) has run in this job: its first ones always, later ones with
probability `rate`. The origin's own hops are trusted and never checked.
Rule 2: the pipeline records what a checked hop was sent and what it answered (its input,
its forward output, the output gradient and the input gradient it returned, or its loss);
as soon as that micro-batch's backward is done (the later micro-batches run meanwhile) and
always before the optimiser step (`TrainPipeline.run`), the origin recomputes them on a private `TrainHost` of its own, over its own copy of the
model's atoms [start, end) loaded with the parameters the host holds at that moment (so
the check uses the same parameter version as the host), with the same dropout seed, mask
and precision. A host that lies about its parameters to hide a lie fails the same check.
Rule 3: agreement is `verify.difference` within `VerifyPolicy.tolerance`; bf16 training,
and a host whose outputs or starting parameters are all bfloat16 values where the origin's
are not (it serves the span in bfloat16), are judged with the bf16 tolerance (a liar that
rounds its lies to bfloat16 gains that margin, no more); a loss within the same relative
tolerance, its token count equal. A disagreement raises HopFailed(penalty="wrong_output"):
the run reports it (scored, banned past the threshold), excludes the host and redoes the
steps since the last checkpoint on another route; with no other host, the run fails
naming the host.
Not checked: whether a host applies its optimiser step honestly (the weight gradients
never travel in a one-replica run); the parameters it holds are checked against the
origin's only at the job's start (`start_params`). A host that serves a span holding both
frozen and trainable atoms in bfloat16 and joins a run from a checkpoint is judged with
the fp32 tolerance (nothing it sends shows its dtype): serve trained models in float32.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import torch
import trio

from atoms.errors import AtomError
from atoms.training import LossSum, OptimConfig

from ..errors import NexusError
from ..metrics import Metrics
from .session import HopFailed, HopPlan
from .train_host import SpanLookup, TrainHost, local_link
from .verify import VerifyPolicy, difference

if TYPE_CHECKING:
    from atoms.model import Model

    from .train_origin import MicroBatch, TrainHop, TrainPipeline

log = structlog.get_logger(__name__)

CHECK_BUDGET_BYTES = 1 << 30  # autograd memory of one of the origin's check sessions
MAX_CHECK_SESSIONS = 8  # spans whose check session (and fp32 copy) the origin keeps


@dataclass(slots=True)
class Probe:
    """What one hop was sent and answered for one micro-batch (filled by the pipeline)."""

    x: torch.Tensor | None = None
    out: torch.Tensor | None = None  # forward output (hops before the last)
    pad_mask: bytes = b""
    grad_out: torch.Tensor | None = None  # d loss / d output it was sent (backward)
    grad_in: torch.Tensor | None = None  # d loss / d input it returned
    loss: LossSum | None = None  # the last hop's loss

    def forward(self, x: torch.Tensor, out: torch.Tensor, pad_mask: bytes) -> None:
        self.x, self.out, self.pad_mask = x, out, pad_mask

    def backward(self, grad_out: torch.Tensor, grad_in: torch.Tensor | None) -> None:
        self.grad_out, self.grad_in = grad_out, grad_in

    def loss_of(
        self, x: torch.Tensor, result: LossSum, grad_in: torch.Tensor | None, pad_mask: bytes
    ) -> None:
        self.x, self.loss, self.grad_in, self.pad_mask = x, result, grad_in, pad_mask


Probes = dict[int, dict[int, Probe]]  # micro-batch -> hop index -> probe


@dataclass(slots=True)
class TrainVerifier:
    """The origin's spot-checks of a training run's hosts (see the module rules).

    Attributes:
        policy: which micro-batches, which tolerances.
        span_for: (model, start, end) -> the origin's own span of the trained model.
        model_id: the id the check sessions are opened under.
        optim: the run's optimiser settings (dropout, precision).
        causal: the model's attention is causal.
        trusted: a host never checked (the origin itself).
        limiter: where the origin's torch work runs.
        rng: decides the sampled micro-batches.
        on_check: told each check's outcome ("agreed", "wrong_output", "undecided").
        start_params: the parameters every host must hold at the job's start (absolute
            names); empty: not checked.
    """

    policy: VerifyPolicy
    span_for: SpanLookup
    model_id: str
    optim: OptimConfig
    causal: bool
    trusted: bytes
    limiter: trio.CapacityLimiter
    rng: random.Random = field(default_factory=random.Random)
    on_check: Callable[[str], None] | None = None
    start_params: dict[str, torch.Tensor] = field(default_factory=dict)
    start_step: int = 0
    _runs: dict[tuple[bytes, int, int], int] = field(default_factory=dict)
    _loose: set[tuple[bytes, int, int]] = field(default_factory=set)  # bf16 servers
    _host: TrainHost | None = None  # the origin's own sessions of the checks
    _own: dict[tuple[int, int, bool], TrainHop] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)

    @classmethod
    def of(
        cls,
        policy: VerifyPolicy,
        model: Model,
        optim: OptimConfig,
        causal: bool,
        trusted: bytes,
        limiter: trio.CapacityLimiter,
        metrics: Metrics,
    ) -> TrainVerifier:
        """The checks of a run of `model` from this node (`trusted`), counted in `metrics`
        (train_verify_checks_total by outcome)."""
        return cls(
            policy=policy,
            span_for=lambda _m, start, end: model.span(start, end),
            model_id=model.model_id,
            optim=optim,
            causal=causal,
            trusted=trusted,
            limiter=limiter,
            on_check=lambda outcome: metrics.inc("train_verify_checks_total", outcome=outcome),
        )

    def opened(self, step: int, state: dict[str, torch.Tensor] | None, model: Model) -> None:
        """A route opened at `step` from checkpoint `state` (None: the model's own weights):
        what every host's parameters must be at that step."""
        self.start_step = step
        if state is not None:
            self.start_params = {n: t for n, t in state.items() if n.startswith("param/")}
        else:
            span = model.span(0, len(model))
            self.start_params = {
                f"param/{n}": p.detach() for n, p in span.named_parameters() if p.requires_grad
            }

    def sample(self, hops: Sequence[HopPlan], micro_batches: int) -> Probes:
        """The (micro-batch, hop) pairs of one step to check, each with an empty probe."""
        probes: Probes = {}
        for i, plan in enumerate(hops):
            if plan.host == self.trusted:
                continue
            key = (plan.host, plan.start, plan.end)
            for k in range(micro_batches):
                n = self._runs.get(key, 0)
                self._runs[key] = n + 1
                if self.policy.sampled(n, self.rng):
                    probes.setdefault(k, {})[i] = Probe()
        return probes

    def _tolerance(self, plan: HopPlan, got: torch.Tensor, ref: torch.Tensor, codec: str) -> float:
        """The bound of Rule 3, widened for the hop's lossy wire codec (what it answers
        was rounded by it)."""
        key = (plan.host, plan.start, plan.end)
        if codec == "raw" and _bf16_exact(got) and not _bf16_exact(ref):
            self._loose.add(key)  # it serves the span in bfloat16 (Rule 3)
        if self.optim.precision == "bf16" or key in self._loose:
            return self.policy.tolerance(torch.bfloat16, torch.bfloat16, codec)
        return self.policy.tolerance(got.dtype, ref.dtype, codec)

    def _outcome(self, outcome: str) -> None:
        if self.on_check is not None:
            self.on_check(outcome)

    async def check(
        self, pipe: TrainPipeline, step: int, k: int, mb: MicroBatch, probes: dict[int, Probe]
    ) -> None:
        """Recompute micro-batch k's probes (hop by hop, one check at a time: they share
        the origin's sessions); HopFailed("wrong_output") on a disagreement."""
        async with self._lock:
            for i, probe in sorted(probes.items()):
                await self._check_hop(pipe, i, step, k, mb, probe)

    async def _check_hop(
        self, pipe: TrainPipeline, i: int, step: int, k: int, mb: MicroBatch, probe: Probe
    ) -> None:
        hop, role = pipe.hops[i], pipe.roles[i]
        plan = hop.plan
        params: dict[str, torch.Tensor] = {}
        if role.backward and hop.trainable_params:
            params = (await hop.get_state("params"))[0]
            if step == self.start_step and self.start_params:
                self._judge_params(plan, params)
        key = (plan.start, plan.end, role.input_grad)
        try:
            own = await self._session(key, step)
            if params:
                await own.load_state(params, step, kind="params")
            await self._judge(own, hop, role.backward, step, k, mb, probe)
            log.info(
                "train_verify_agreed",
                host=plan.host.hex()[:8],
                span=f"[{plan.start},{plan.end})",
                step=step,
                micro_batch=k,
            )
        except HopFailed as exc:
            await self._drop(key)
            if exc.host != self.trusted:
                raise
            self._outcome("undecided")  # the origin could not compute it: no verdict
            log.warning("train_verify_undecided", host=plan.host.hex()[:8], reason=exc.reason)
        except (NexusError, AtomError) as exc:
            await self._drop(key)
            self._outcome("undecided")
            log.warning("train_verify_undecided", host=plan.host.hex()[:8], reason=str(exc))
        except BaseException:  # boundary: drop the check session, then re-raise (cancel too)
            await self._drop(key)
            raise

    async def _session(self, key: tuple[int, int, bool], step: int) -> TrainHop:
        """The origin's own training session over atoms [start, end) (kept for the run's
        later checks of the same span: its fp32 copy is made once)."""
        from .train_origin import TrainHop  # the pipeline's module imports this one

        own = self._own.get(key)
        if own is not None:
            return own
        if len(self._own) >= MAX_CHECK_SESSIONS:
            for old in list(self._own):
                await self._drop(old)
        if self._host is None:
            self._host = TrainHost(
                self.span_for,
                limiter=self.limiter,
                metrics=Metrics(),
                graph_budget_bytes=CHECK_BUDGET_BYTES,
                max_sessions=MAX_CHECK_SESSIONS,
            )
        start, end, input_grad = key
        mine = HopPlan(self.trusted, start, end)  # its failures are the origin's
        own = TrainHop(mine, self.model_id, local_link(self._host, self.trusted), remote=False)
        await own.open(self.optim, needs_input_grad=input_grad, next_step=step)
        self._own[key] = own
        return own

    async def _drop(self, key: tuple[int, int, bool]) -> None:
        own = self._own.pop(key, None)
        if own is not None:
            await own.close()

    async def _judge(
        self,
        own: TrainHop,
        hop: TrainHop,
        grad: bool,
        step: int,
        k: int,
        mb: MicroBatch,
        probe: Probe,
    ) -> None:
        """Replays what the host decoded (`hop.seen`: its input and output gradient after
        the hop's wire codec) and allows for the codec's rounding of what it answered."""
        plan, codec = hop.plan, hop.codec
        if probe.x is None:
            return  # the micro-batch never reached this hop (a failure elsewhere)
        x = hop.seen(probe.x)
        where = f"atoms [{plan.start},{plan.end}), training step {step} micro-batch {k}"
        if probe.loss is not None:
            result, grad_in, _ = await own.loss(
                k,
                mb.seed,
                x,
                mb.targets,
                causal=self.causal,
                evaluate=False,
                pad_mask=probe.pad_mask,
            )
            off = abs(probe.loss.loss - result.loss) / max(abs(result.loss), 1e-12)
            loose = (
                self.optim.precision == "bf16" or (plan.host, plan.start, plan.end) in self._loose
            )
            tol = self.policy.tol_bf16 if loose else self.policy.tol_fp32
            if probe.loss.count != result.count or not off <= tol:
                self._wrong(
                    plan, f"loss {probe.loss.loss:.6g} on {where}, expected {result.loss:.6g}"
                )
            self._compare(plan, "input gradient", where, probe.grad_in, grad_in, codec)
        else:
            out, _ = await own.forward(
                k, mb.seed, x, grad=grad, causal=self.causal, pad_mask=probe.pad_mask
            )
            self._compare(plan, "output", where, probe.out, out, codec)
            if probe.grad_out is not None:
                grad_in, _ = await own.backward(k, hop.seen(probe.grad_out), x)
                self._compare(plan, "input gradient", where, probe.grad_in, grad_in, codec)
        self._outcome("agreed")

    def _compare(
        self,
        plan: HopPlan,
        what: str,
        where: str,
        got: torch.Tensor | None,
        ref: torch.Tensor | None,
        codec: str = "raw",
    ) -> None:
        if got is None and ref is None:
            return
        if got is None or ref is None:
            self._wrong(plan, f"{what} on {where}: {'missing' if got is None else 'unexpected'}")
            return
        diff = difference(got, ref)
        tol = self._tolerance(plan, got, ref, codec)
        if not diff <= tol:
            self._wrong(plan, f"{what} on {where} off by {diff:.2e} (tolerance {tol:.1e})")

    def _judge_params(self, plan: HopPlan, params: dict[str, torch.Tensor]) -> None:
        """At the job's start a host's parameters are the ones the origin sent or served."""
        for name, t in params.items():
            ref = self.start_params.get(name)
            if ref is None:
                continue  # not the origin's to know (a checkpoint of other hosts' spans)
            diff = difference(t, ref.to(t.dtype))
            if _bf16_exact(t) and not _bf16_exact(ref):
                self._loose.add((plan.host, plan.start, plan.end))
            tol = self.policy.tol_bf16 if _bf16_exact(t) else self.policy.tol_fp32
            if not diff <= tol:
                self._wrong(plan, f"parameter {name} at the job's start off by {diff:.2e}")

    def _wrong(self, plan: HopPlan, detail: str) -> None:
        self._outcome("wrong_output")
        log.warning("train_verify_failed", host=plan.host.hex()[:8], detail=detail)
        raise HopFailed(
            plan.host,
            f"wrong training output: {detail} from the origin's own computation",
            penalty="wrong_output",
        )


def _bf16_exact(t: torch.Tensor) -> bool:
    """Every value of `t` is a bfloat16 (a span served in bfloat16 computed it)."""
    return bool(t.is_floating_point() and t.numel() and torch.equal(t, t.bfloat16().to(t.dtype)))
