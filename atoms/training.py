"""Training one span: the backward pass, the optimiser, and the state a checkpoint keeps.

A `SpanTrainer` owns a private fp32 copy of a span's atoms (the master weights) and the
AdamW state of its trainable parameters. It is sans-IO: the execution protocol feeds it
micro-batches and optimiser commands; the same class runs the whole model in one process
(the reference every distributed run is compared with).

Rule 1: a micro-batch's forward keeps its input; its backward either reuses the autograd
graph kept from the forward (while the graphs in flight fit `graph_budget_bytes`, measured
with saved-tensor hooks) or recomputes the forward from the kept input with the same
dropout seed: both give bit-identical gradients.
Rule 2: gradients of every micro-batch of an optimiser step are summed in the order the
backward passes arrive (the origin's schedule fixes that order) and applied once by
`apply(step, ...)`: a step id below the next one is a duplicate and changes nothing; one
above it is refused. Nothing touches a weight outside `apply` and `load_state`.
Rule 3: losses are sums over tokens (or examples); the origin divides by the step's count
in `apply(scale=clip / count)`, so micro-batch sizes never bias the mean.
Rule 4: peer input is validated before use: a gradient of the wrong shape or with NaN/Inf
is refused with `BadGradient` and changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .atom import Atom, ForwardContext, IOKind
from .codecs import all_finite
from .errors import AtomError
from .model import Model, build_atom, load_state
from .partition import ConfigValue
from .precision import to_dtype
from .span import Span

IGNORE = -100  # target id of positions that carry no loss (padding)
PRECISIONS = ("fp32", "bf16")
DECAYS = ("cosine", "linear", "constant")


class TrainingError(AtomError):
    """A training command that cannot be applied (order, missing micro-batch, bad state)."""


class BadGradient(TrainingError):
    """An output gradient from a peer that is malformed (shape, dtype, NaN/Inf)."""


class BadCheckpoint(TrainingError):
    """Checkpoint tensors that do not fit the span (names, shapes) or hold NaN/Inf."""


class NonFiniteLoss(TrainingError):
    """The loss of a micro-batch is NaN or Inf: the step must not be applied."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """What a host needs to train its span (the origin sends it when a session opens).

    Args:
        weight_decay: AdamW decoupled decay on matrices (never on norms, biases, per-head
            temperature and gates).
        beta1, beta2, eps: AdamW's moments.
        dropout: rate inside trainable atoms during training forwards.
        precision: "fp32", or "bf16" (autocast compute over fp32 master weights).
    """

    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    dropout: float = 0.1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight_decay < 1.0:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """Learning rate per optimiser step: linear warmup, then cosine or linear decay.

    lr(s) = peak * (s + 1) / warmup                       for s < warmup
          = floor + (peak - floor) * shape(progress)       after, progress in [0, 1]
    with floor = peak * min_ratio and shape cosine (0.5 (1 + cos(pi p))), linear (1 - p)
    or constant (1).
    """

    lr: float = 3e-4
    warmup_steps: int = 50
    total_steps: int = 1000
    decay: str = "cosine"
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.lr < 1.0:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                f"got {self.warmup_steps}, {self.total_steps}"
            )
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 1.0
        floor = self.lr * self.min_ratio
        return floor + (self.lr - floor) * shape


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters AdamW must not decay: norms, biases, per-head temperatures and gates."""
    return (
        param.dim() < 2
        or "norm" in name
        or name.endswith("bias")
        or "head_log_temperature" in name
        or "head_gate" in name
    )


def trainable(atoms: Sequence[Atom]) -> bool:
    """Whether any parameter of these atoms requires a gradient."""
    return any(p.requires_grad for a in atoms for p in a.parameters())


@dataclass(frozen=True, slots=True)
class LossSum:
    """What a loss-bearing forward gives back: sums, so micro-batches add up exactly."""

    loss: float  # sum of per-target cross-entropy (nats)
    count: int  # targets that carry loss
    correct: int  # argmax == target among them


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[LossSum, torch.Tensor]]
"""(span output, targets, span input) -> (the summed loss's figures, the loss tensor to
backpropagate). The span input is what the span received (ids, or hidden states that carry
the input gradient): most losses read only the output; an embedding student's token targets
read the hidden states its pooling span pools (`atoms.distill_embed`)."""


@dataclass(slots=True)
class _Record:
    """A micro-batch between its forward and its backward."""

    x: torch.Tensor
    ctx: ForwardContext
    out_shape: tuple[int, ...]
    graph: tuple[torch.Tensor, torch.Tensor] | None  # (input leaf, output) while kept
    graph_bytes: int = 0


@dataclass(slots=True)
class _Stats:
    recomputes: int = 0
    kept: int = 0
    peak_graph_bytes: int = 0
    applied: list[float] = field(default_factory=list)


class SpanTrainer:
    """Forward, backward and AdamW for one span of trainable (or frozen) atoms.

    Args:
        span: the atoms to train; the trainer takes them as they are (make a private fp32
            copy first: `fp32_copy`).
        optim: optimiser and precision settings.
        needs_input_grad: return the gradient of the span's input (False for the span
            holding the first trainable atom: the frozen prefix before it needs none).
        graph_budget_bytes: autograd memory kept between forwards and backwards; past it,
            a micro-batch keeps only its input and is recomputed in its backward.
        loss_fn: the training loss of `loss` (outputs, targets, span input) -> (sums,
            summed loss), `LossFn`;
            None: cross-entropy against the targets (e.g. `atoms.distill.TeacherLoss`
            instead).
        eval_fn: the validation loss of `evaluate`; None: cross-entropy (an embedding
            student's pooled vectors have no classes: `atoms.distill_embed`).
    """

    def __init__(
        self,
        span: Span,
        optim: OptimConfig,
        *,
        needs_input_grad: bool,
        graph_budget_bytes: int = 256 << 20,
        loss_fn: LossFn | None = None,
        eval_fn: LossFn | None = None,
    ) -> None:
        self.span = span
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.optim = optim
        self.needs_input_grad = needs_input_grad and span.in_kind is not IOKind.IDS
        self.budget = graph_budget_bytes
        self.params = [(n, p) for n, p in span.named_parameters() if p.requires_grad]
        decay = [p for n, p in self.params if not no_decay(n, p)]
        plain = [p for n, p in self.params if no_decay(n, p)]
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        self.opt = (
            torch.optim.AdamW(
                [g for g in groups if g["params"]],
                lr=0.0,
                betas=(optim.beta1, optim.beta2),
                eps=optim.eps,
                foreach=False,
            )
            if self.params
            else None
        )
        self.next_step = 0  # the optimiser step `apply` takes next
        self.micro_batches = 0  # backward passes summed into the gradients since the last step
        self._records: dict[int, _Record] = {}
        self._graph_bytes = 0
        self.stats = _Stats()
        span.train(True)

    # ------------------------------------------------------------------ forward/backward

    @property
    def trains(self) -> bool:
        return self.opt is not None

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.optim.precision == "bf16")

    def _run(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.detach()
        if self.needs_input_grad and leaf.is_floating_point():
            leaf.requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            out = self.span(leaf, ctx, check=False)
        return leaf, out

    def forward(self, mb: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Training forward of micro-batch `mb`; its backward must follow (`backward`).

        `ctx.dropout` and `ctx.seed` are set by the caller (the origin's per-micro-batch
        seed). Raises AtomError for invalid input (checked before any weight is touched).
        """
        self.span.check_input(x)
        if mb in self._records:
            raise TrainingError(f"micro-batch {mb} already ran its forward")
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            leaf, out = self._run(x, ctx)
        record = _Record(x=x, ctx=ctx, out_shape=tuple(out.shape), graph=None)
        if self._graph_bytes + saved[0] <= self.budget:
            record.graph, record.graph_bytes = (leaf, out), saved[0]
            self._graph_bytes += saved[0]
            self.stats.kept += 1
            self.stats.peak_graph_bytes = max(self.stats.peak_graph_bytes, self._graph_bytes)
        self._records[mb] = record
        return out.detach()

    def backward(self, mb: int, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate `grad_out` (d loss / d output of micro-batch `mb`) through the span:
        weight gradients are added to the step's sums; returns d loss / d input (None when
        the span needs no input gradient).

        Raises:
            BadGradient: wrong shape or non-finite values (nothing changed).
            TrainingError: no forward is pending for `mb`.
        """
        record = self._records.get(mb)
        if record is None:
            raise TrainingError(f"no forward pending for micro-batch {mb}")
        if tuple(grad_out.shape) != record.out_shape or not grad_out.is_floating_point():
            raise BadGradient(
                f"gradient of micro-batch {mb}: expected float {record.out_shape}, "
                f"got {grad_out.dtype} {tuple(grad_out.shape)}"
            )
        if not all_finite(grad_out):
            raise BadGradient(f"gradient of micro-batch {mb} holds NaN or Inf")
        del self._records[mb]
        leaf, out = self._graph_of(record)
        if out.requires_grad:  # else: nothing here trains and no input gradient is wanted
            with self._autocast():
                out.backward(grad_out.to(out.dtype))
        self.micro_batches += 1
        return self._input_grad(leaf)

    def loss(
        self, mb: int, x: torch.Tensor, targets: torch.Tensor, ctx: ForwardContext
    ) -> tuple[LossSum, torch.Tensor | None]:
        """Forward, summed cross-entropy against `targets`, and backward, in one call: the
        span that ends in a head computes the loss itself, so logits never travel.

        Args:
            targets: (B, T) int64 next-token ids for LM logits (B, T, V), or (B,) class ids
                for classifier logits (B, K); IGNORE marks positions without loss.

        Raises:
            AtomError: invalid input or targets. NonFiniteLoss: the loss is NaN/Inf (the
            gradients of this micro-batch are not kept).
        """
        self.span.check_input(x)
        leaf, out = self._run(x, ctx)
        result, loss = (self.loss_fn or _cross_entropy)(out, targets, leaf)
        if not math.isfinite(result.loss):
            raise NonFiniteLoss(f"micro-batch {mb}: loss is {result.loss}")
        with self._autocast():
            loss.backward()
        self.micro_batches += 1
        return result, self._input_grad(leaf)

    def evaluate(self, x: torch.Tensor, targets: torch.Tensor, ctx: ForwardContext) -> LossSum:
        """The loss without dropout or gradients (validation)."""
        self.span.check_input(x)
        ctx.dropout = 0.0
        with torch.no_grad(), self._autocast():
            out = self.span(x, ctx, check=False)
        with torch.no_grad():
            return (self.eval_fn or _cross_entropy)(out, targets, x)[0]

    def infer(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """A forward with no gradient and no dropout (the frozen spans of a training run)."""
        self.span.check_input(x)
        ctx.dropout = 0.0
        with torch.no_grad(), self._autocast():
            out: torch.Tensor = self.span(x, ctx, check=False)
        return out.float() if out.is_floating_point() else out

    def _graph_of(self, record: _Record) -> tuple[torch.Tensor, torch.Tensor]:
        if record.graph is not None:
            self._graph_bytes -= record.graph_bytes
            return record.graph
        self.stats.recomputes += 1
        return self._run(record.x, record.ctx)  # same seed: the same dropout masks

    def _input_grad(self, leaf: torch.Tensor) -> torch.Tensor | None:
        if not self.needs_input_grad:
            return None
        grad = leaf.grad
        if grad is None:  # the output did not depend on the input (cannot happen in a chain)
            return torch.zeros_like(leaf)
        return grad

    # ------------------------------------------------------------------------ optimiser

    def grad_sq_norm(self) -> float:
        """Sum of squared gradient entries of this span's trainable parameters (the origin
        adds every span's to clip by the global norm)."""
        total = 0.0
        for _, p in self.params:
            if p.grad is not None:
                total += float(p.grad.float().pow(2).sum())
        return total

    def apply(self, step: int, *, lr: float, scale: float) -> bool:
        """Apply optimiser step `step`: gradients times `scale`, one AdamW update at `lr`,
        gradients cleared. Returns False for a duplicate (already applied: nothing done).

        Raises:
            TrainingError: `step` skips ahead of the next step, or `lr`/`scale` invalid.
        """
        if step < self.next_step:
            return False
        if step > self.next_step:
            raise TrainingError(f"optimiser step {step} skips ahead: next is {self.next_step}")
        if not (math.isfinite(lr) and lr >= 0 and math.isfinite(scale) and scale >= 0):
            raise TrainingError(f"lr and scale must be finite and >= 0, got {lr}, {scale}")
        if self.opt is not None:
            with torch.no_grad():
                for _, p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.discard_pending()
        self.next_step += 1
        self.micro_batches = 0
        self.stats.applied.append(lr)
        return True

    def discard_pending(self) -> None:
        """Forget forwards whose backward never came (an aborted step)."""
        self._records.clear()
        self._graph_bytes = 0

    def reset_gradients(self) -> None:
        """Drop the gradients of an unfinished step (it will be run again)."""
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.discard_pending()
        self.micro_batches = 0

    # ----------------------------------------------------------------------- checkpoints

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and AdamW moments, by name (a checkpoint's content).

        Names: "param/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"; the AdamW step count
        is `next_step` (every parameter steps together).
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.params:
            out[f"param/{name}"] = p.detach().clone().contiguous()
            state = self.opt.state.get(p, {}) if self.opt is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out[f"{key}/{name}"] = state[key].detach().clone().contiguous()
        return out

    def grad_tensors(self) -> dict[str, torch.Tensor]:
        """The gradients summed since the last step, "grad/<name>" (zeros where none)."""
        return {
            f"grad/{n}": (
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            ).contiguous()
            for n, p in self.params
        }

    def set_grads(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the step's gradients (replicas: the sum over every replica).

        Raises:
            BadGradient: names, shapes or values (NaN/Inf) that do not fit (nothing changed).
        """
        expected = {f"grad/{n}": p for n, p in self.params}
        if set(tensors) != set(expected):
            raise BadGradient(f"gradients do not fit: {sorted(set(tensors) ^ set(expected))[:4]}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(expected[name].shape) or not all_finite(t):
                raise BadGradient(f"gradient {name}: bad shape or non-finite values")
        for name, p in expected.items():
            p.grad = tensors[name].to(p.dtype).clone()

    def load_params(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite the trainable parameters only (an averaging round); the optimiser
        moments, step count and pending gradients stay.

        Raises:
            BadCheckpoint: names, shapes or values that do not fit (nothing changed).
        """
        expected = {f"param/{n}": p for n, p in self.params}
        if set(tensors) != set(expected):
            raise BadCheckpoint(
                f"parameters do not fit: {sorted(set(tensors) ^ set(expected))[:4]}"
            )
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(expected[name].shape) or not all_finite(t):
                raise BadCheckpoint(f"parameter {name}: bad shape or non-finite values")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(tensors[name].to(p.dtype))

    def load_state(self, tensors: dict[str, torch.Tensor], next_step: int) -> None:
        """Restore `state_tensors()` of a checkpoint taken after `next_step` steps.

        Raises:
            BadCheckpoint: a tensor is missing, extra, of the wrong shape or non-finite
                (nothing is changed then).
        """
        expected = {f"param/{n}": p for n, p in self.params}
        moments = {f"{k}/{n}": p for n, p in self.params for k in ("exp_avg", "exp_avg_sq")}
        unknown = sorted(set(tensors) - set(expected) - set(moments))
        missing = sorted(set(expected) - set(tensors))
        if unknown or missing:
            raise BadCheckpoint(f"checkpoint does not fit: missing {missing}, unknown {unknown}")
        for name, t in tensors.items():
            ref = expected.get(name, moments.get(name))
            assert ref is not None
            if tuple(t.shape) != tuple(ref.shape) or not all_finite(t):
                raise BadCheckpoint(f"checkpoint tensor {name}: bad shape or non-finite values")
        has_moments = all(k in tensors for k in moments)
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(tensors[f"param/{name}"].to(p.dtype))
                if self.opt is not None and has_moments and next_step > 0:
                    self.opt.state[p] = {
                        "step": torch.tensor(float(next_step)),
                        "exp_avg": tensors[f"exp_avg/{name}"].to(p.dtype).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.dtype).clone(),
                    }
        self.reset_gradients()
        self.next_step = next_step


def _cross_entropy(
    out: torch.Tensor, targets: torch.Tensor, _span_input: torch.Tensor
) -> tuple[LossSum, torch.Tensor]:
    if targets.dtype != torch.long or tuple(targets.shape) != tuple(out.shape[:-1]):
        raise TrainingError(
            f"targets: expected int64 {tuple(out.shape[:-1])}, got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    classes = out.shape[-1]
    valid = targets != IGNORE
    if bool(((targets < 0) & valid).any()) or bool((targets >= classes).any()):
        raise TrainingError(f"targets must be in [0, {classes}) or {IGNORE}")
    loss, correct = ChunkedCrossEntropy.apply(out.reshape(-1, classes), targets.reshape(-1))
    return LossSum(loss=float(loss.detach()), count=int(valid.sum()), correct=int(correct)), loss


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) in any float dtype against targets (N,)
    (IGNORE = no loss), computed in float32 a block of rows at a time, and the number of
    rows whose argmax is the target.

    Equal to `F.cross_entropy(logits.float(), targets, reduction="sum")` within float32
    rounding, without the float32 copy and the log-softmax of the whole (N, V) block: for
    1,024 rows of bf16 logits over a 30,522-word vocabulary, loss, argmax and backward
    take 230 ms instead of 437 ms on one core of this machine (a bf16 Nexus 1.1 micro-batch
    of 8 x 128 tokens: 0.99 s -> 0.79 s). The gradient is returned in the logits' dtype.
    """

    ROWS = 128  # rows of float32 work at a time (128 x 30,522 x 4 B = 15.6 MB)

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        valid = targets != IGNORE
        picked_ids = torch.where(valid, targets, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        correct = torch.zeros((), dtype=torch.long)
        for s in range(0, n, ChunkedCrossEntropy.ROWS):
            rows = logits[s : s + ChunkedCrossEntropy.ROWS].float()
            lse[s : s + rows.shape[0]] = torch.logsumexp(rows, dim=-1)
            hit = rows.argmax(-1) == picked_ids[s : s + rows.shape[0]]
            correct += (hit & valid[s : s + rows.shape[0]]).sum()
        picked = logits.gather(1, picked_ids.unsqueeze(1)).squeeze(1).float()
        loss = ((lse - picked) * valid).sum()
        ctx.save_for_backward(logits, picked_ids, valid, lse)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        logits, picked_ids, valid, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = torch.empty_like(logits)
        weight = valid.float() * grad_loss.float()  # (N,): 0 on IGNORE rows
        for s in range(0, logits.shape[0], ChunkedCrossEntropy.ROWS):
            e = min(s + ChunkedCrossEntropy.ROWS, logits.shape[0])
            p = torch.exp(logits[s:e].float() - lse[s:e, None])  # softmax rows
            p[torch.arange(e - s), picked_ids[s:e]] -= 1.0
            grad[s:e] = p * weight[s:e, None]
        return grad, None


def fp32_copy(atoms: Sequence[Atom]) -> list[Atom]:
    """Private float32 copies of atoms (the master weights a trainer updates), keeping
    which parameters are frozen."""
    return [to_dtype(atom, "float32") for atom in atoms]


def micro_batch_seed(job_seed: int, step: int, mb: int) -> int:
    """The dropout seed of micro-batch `mb` of optimiser step `step` (every host derives the
    same masks from it; a replay or a recompute reuses it)."""
    return (job_seed * 1_000_000_007 + step * 65_537 + mb) % (1 << 62)


def lm_examples(
    stream: Sequence[int], length: int, bos: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Causal-LM examples cut from a token stream (paragraphs joined by EOS): each is
    (input, target) of `length` ids, input = [bos] + w[:-1], target = w, for consecutive
    non-overlapping windows w of the stream; the tail shorter than `length` is dropped.

    Every window starts from `bos` as a generation does (a prompt is [CLS] + text), so the
    first target is predicted from the same context as at inference.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    for start in range(0, len(stream) - length + 1, length):
        w = list(stream[start : start + length])
        yield [bos, *w[:-1]], w


def renamed(
    model: Model, model_id: str, *, config: Mapping[str, ConfigValue] | None = None
) -> Model:
    """A copy of `model` under another id (every atom's spec says so), with `config` added
    to its config; weights and frozen flags are kept."""
    atoms = []
    for atom in model.atoms:
        new = build_atom(dataclasses.replace(atom.spec, model_id=model_id))
        load_state(new, atom.state_dict(), f"copy of {atom.spec.uid} as {model_id}")
        for (_, src), (_, dst) in zip(atom.named_parameters(), new.named_parameters(), strict=True):
            dst.requires_grad_(src.requires_grad)
        atoms.append(new)
    merged = {**dict(model.config), **dict(config or {})}
    return Model(
        model_id=model_id,
        family=model.family,
        config=merged,
        atoms=atoms,
        tokenizer=model.tokenizer,
    )


def apply_trained(model: Model, tensors: Mapping[str, torch.Tensor]) -> Model:
    """Write a checkpoint's trained parameters ("param/atoms.<index>.<name>") into `model`'s
    atoms in place (optimiser moments are ignored); returns `model`.

    Raises:
        BadCheckpoint: a name that is not an atom's parameter, or a shape that differs.
    """
    for name, value in tensors.items():
        if not name.startswith("param/"):
            continue
        _, _, rest = name.partition("/atoms.")
        index_s, _, param = rest.partition(".")
        if not index_s.isdigit() or not 0 <= int(index_s) < len(model.atoms):
            raise BadCheckpoint(f"checkpoint tensor {name!r} names no atom of {model.model_id}")
        params = dict(model.atoms[int(index_s)].named_parameters())
        target = params.get(param)
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise BadCheckpoint(f"checkpoint tensor {name!r} does not fit {model.model_id}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    return model
