"""Knowledge distillation of embedding models: a student's sentence vectors learn the teacher's.

Both models end in the pooling atom (masked mean over real tokens, L2-normalised: MiniLM).
The loss of one micro-batch, summed over its examples i (so micro-batches add up as the
cross-entropy's do, `atoms.training` rule 3):

    loss = sum_i  w_cos * (1 - cos(s_i, t_i)) + w_mse * ||s_i - t_i||^2
                + w_token * sum_t ||h_it - g_it||^2 / sum_t ||g_it||^2

s_i, t_i: the student's and the teacher's sentence vectors; h_it, g_it: their last hidden
states at the real tokens t of example i (what the pooling averages), the token term a
relative squared error (scale-free: 0 when every token matches, 1 for a student that
outputs zeros). Defaults: w_cos = 1, w_mse = 0, w_token = 1. For unit vectors
||s - t||^2 = 2 (1 - cos): the MSE term is the cosine term again, twice; it only adds a
constraint (on the norm) when the pooling does not normalise. The token term gives the
student one target per token instead of one per paragraph: a 3-layer MiniLM student
distilled with the cosine alone plateaued at 0.944 mean cosine to its teacher
(2,400-3,000 steps); README, "Distillation", has the figures with it. The
validation loss of a job (`COSINE_ONLY`) is the cosine term alone, so it reads directly as
1 - the mean cosine to the teacher.

Rule 1: the teacher runs forward only (no gradient, no dropout) on exactly the student's
input. The student's pooling span receives hidden states, not ids, so the micro-batch's
targets carry them: targets = input ids with IGNORE where the mask says padding
(`embed_targets`); `embed_inputs` gives back (ids, mask), and the teacher's pooling averages
over the same real tokens as the student's (the same `ctx.pad_mask`).
Rule 2: a student is an ordinary model: `encoder_student_of` keeps some encoder layers of a
BERT-family model (e.g. MiniLM's 0, 2, 4) with their weights; a pruned model
(`nexusd compress --prune-*`) is a student as it is. Every parameter of the student trains
(embedding and layers: none of a MiniLM is frozen, `atoms.model.frozen_prefix`).
Rule 3: the token term reads the hidden states the student's pooling span receives (the
`span input` of `atoms.training.LossFn`): the loss runs on a span holding the pooling atom
alone, as the job's does (the body before it trains over the mesh, the input gradient goes
back to it); `PooledStudent` is the same split in one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .atom import Atom, AtomKind, ForwardContext
from .corpus import is_validation, paragraphs
from .datasets import Dataset, Examples, special_ids
from .distill import copy_atom
from .errors import DataError, ModelFormatError
from .model import Model
from .span import Span
from .tokenizer import TextTokenizer
from .training import IGNORE, LossSum, OptimConfig, SpanTrainer, TrainingError

COSINE_HIT = 0.95  # `LossSum.correct` counts examples at least this close to the teacher


@dataclass(frozen=True, slots=True)
class EmbedDistillConfig:
    """Args:
    w_cos: weight of 1 - cosine(student, teacher) per example.
    w_mse: weight of the squared distance ||student - teacher||^2 per example.
    w_token: weight of the token term per example (relative squared error of the last
        hidden states over the real tokens; rule 3).
    """

    w_cos: float = 1.0
    w_mse: float = 0.0
    w_token: float = 1.0

    def __post_init__(self) -> None:
        for name in ("w_cos", "w_mse", "w_token"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 100.0):
                raise ValueError(f"{name} must be in [0, 100], got {value}")
        if self.w_cos + self.w_mse + self.w_token <= 0.0:
            raise ValueError("w_cos + w_mse + w_token must be > 0")


COSINE_ONLY = EmbedDistillConfig(w_cos=1.0, w_mse=0.0, w_token=0.0)
"""The validation loss's weights: the loss reads as 1 - the mean cosine to the teacher."""


def embed_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: EmbedDistillConfig
) -> tuple[LossSum, torch.Tensor]:
    """The summed loss of (B, C) student vectors against the teacher's (module docstring).

    `LossSum.count` is the number of examples; `correct` those whose cosine to the teacher
    is at least `COSINE_HIT`.

    Raises:
        TrainingError: shapes that differ or are not (B, C).
    """
    if tuple(student.shape) != tuple(teacher.shape) or student.dim() != 2:
        raise TrainingError(
            f"distill: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "vectors must both be (B, C)"
        )
    s, t = student.float(), teacher.float()
    cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    per_example = cfg.w_cos * (1.0 - cos) + cfg.w_mse * (s - t).pow(2).sum(-1)
    loss = per_example.sum()
    correct = int((cos.detach() >= COSINE_HIT).sum())
    return LossSum(loss=float(loss.detach()), count=int(s.shape[0]), correct=correct), loss


def token_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per example (B,): sum over real tokens of ||student - teacher||^2, divided by the
    teacher's sum of ||teacher||^2 there; (B, T, C) hidden states, (B, T) mask.

    Raises:
        TrainingError: shapes that differ, not (B, T, C), or a mask of another shape.
    """
    if tuple(student.shape) != tuple(teacher.shape) or student.dim() != 3:
        raise TrainingError(
            f"distill: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "hidden states must both be (B, T, C)"
        )
    if tuple(mask.shape) != tuple(student.shape[:2]):
        raise TrainingError(
            f"distill: mask {tuple(mask.shape)} does not match hidden states {tuple(student.shape)}"
        )
    m = mask.unsqueeze(-1).to(torch.float32)
    s, t = student.float(), teacher.float()
    err = ((s - t).pow(2) * m).sum(dim=(1, 2))
    return err / (t.pow(2) * m).sum(dim=(1, 2)).clamp(min=1e-12)


def embed_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The targets of an embedding-distillation example: ids, IGNORE where padded."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))


def embed_inputs(targets: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) back from `embed_targets`; padded positions read as `pad`."""
    mask = targets != IGNORE
    return torch.where(mask, targets, torch.full_like(targets, pad)), mask


def _eval_context(ids: torch.Tensor, mask: torch.Tensor) -> ForwardContext:
    """A bidirectional context for padded ids, dropout off."""
    ctx = ForwardContext.for_tokens(ids.shape[0], ids.shape[1], causal=False, pad_mask=mask)
    ctx.dropout = 0.0
    return ctx


def pooled(span: Span, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A whole embedding model's vectors (B, C) of padded ids, no gradient, no dropout."""
    with torch.no_grad():
        out: torch.Tensor = span(ids, _eval_context(ids, mask), check=False)
    return out.float()


class EmbedTeacherLoss:
    """The loss function of a student's pooling span: the teacher's hidden states and
    vectors computed here, from the targets (rule 1), then the module's loss. Pass it as
    `SpanTrainer(loss_fn=..., eval_fn=...)`.

    Args:
        teacher: the teacher's whole model as one span (ids in, pooled vectors out).
        cfg: the loss weights; with `w_token` > 0 the span input must be the hidden states
            the student's pooling receives (rule 3).
        pad: the id padded positions are given (they are masked: any id works).
    """

    def __init__(self, teacher: Span, cfg: EmbedDistillConfig, *, pad: int = 0) -> None:
        atoms = teacher.atom_list()
        self.body, self.pooling = Span(atoms[:-1]), Span(atoms[-1:])
        self.cfg = cfg
        self.pad = pad
        teacher.train(False)

    def teacher_outputs(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (B, T, C) last hidden states and (B, C) vectors of the examples."""
        ids, mask = embed_inputs(targets, self.pad)
        ctx = _eval_context(ids, mask)
        with torch.no_grad():
            hidden: torch.Tensor = self.body(ids, ctx, check=False)
            vectors: torch.Tensor = self.pooling(hidden, ctx, check=False)
        return hidden.float(), vectors.float()

    def teacher_vectors(self, targets: torch.Tensor) -> torch.Tensor:
        return self.teacher_outputs(targets)[1]

    def __call__(
        self, out: torch.Tensor, targets: torch.Tensor, span_input: torch.Tensor
    ) -> tuple[LossSum, torch.Tensor]:
        if targets.dim() != 2 or targets.dtype != torch.long or targets.shape[0] != out.shape[0]:
            raise TrainingError(
                f"distill: targets must be int64 (B, T) input ids of the {out.shape[0]} "
                f"examples, got {targets.dtype} {tuple(targets.shape)}"
            )
        if not bool((targets != IGNORE).any(dim=1).all()):
            raise TrainingError("distill: every example needs at least one real token")
        hidden, vectors = self.teacher_outputs(targets)
        sums, pooled_loss = embed_distill_loss(out, vectors, self.cfg)
        if self.cfg.w_token == 0.0:
            return sums, pooled_loss
        if not span_input.is_floating_point() or span_input.dim() != 3:
            raise TrainingError(
                "distill: the token term reads the hidden states the student's pooling "
                f"receives; this span's input is {span_input.dtype} "
                f"{tuple(span_input.shape)} (train the pooling atom as its own span, "
                "`PooledStudent`, or set w_token 0)"
            )
        tokens = token_distill_loss(span_input, hidden, targets != IGNORE)
        loss = pooled_loss + self.cfg.w_token * tokens.sum()
        return LossSum(loss=float(loss.detach()), count=sums.count, correct=sums.correct), loss


class PooledStudent:
    """A whole embedding student trained in one process, split as the `train distill` job
    splits it (rule 3): the body (every atom before the pooling) and the pooling span that
    computes the loss. Used by `bench.distill_embed` and the tests' one-process reference.

    Args:
        atoms: the student's atoms (trained in place: pass a private copy, `fp32_copy`).
        loss: the loss of the pooling span (`EmbedTeacherLoss`).
        optim: optimiser settings of both spans.
    """

    def __init__(self, atoms: Sequence[Atom], loss: EmbedTeacherLoss, optim: OptimConfig) -> None:
        budget = 1 << 40  # one process: keep every graph (no recompute)
        self.body = SpanTrainer(
            Span(atoms[:-1]), optim, needs_input_grad=False, graph_budget_bytes=budget
        )
        self.head = SpanTrainer(
            Span(atoms[-1:]), optim, needs_input_grad=True, graph_budget_bytes=budget, loss_fn=loss
        )

    def loss(self, mb: int, x: torch.Tensor, targets: torch.Tensor, ctx: ForwardContext) -> LossSum:
        """Forward, loss and backward of micro-batch `mb` (its gradients summed)."""
        hidden = self.body.forward(mb, x, ctx)
        result, grad = self.head.loss(mb, hidden, targets, ctx)
        assert grad is not None  # the head needs its input's gradient
        self.body.backward(mb, grad)
        return result

    def grad_sq_norm(self) -> float:
        return self.body.grad_sq_norm() + self.head.grad_sq_norm()

    def apply(self, step: int, *, lr: float, scale: float) -> None:
        self.body.apply(step, lr=lr, scale=scale)
        self.head.apply(step, lr=lr, scale=scale)

    def atom_list(self) -> list[Atom]:
        """The trained atoms (dropout off)."""
        self.body.span.train(False)
        self.head.span.train(False)
        return [*self.body.span.atom_list(), *self.head.span.atom_list()]


def ends_in_pooling(model: Model) -> bool:
    """Whether `model` is an embedding model (its last atom pools sentence vectors)."""
    return model.atoms[-1].spec.kind is AtomKind.POOLING


def cosines(student: Model, teacher: Model, data: Examples, batch: int) -> torch.Tensor:
    """Per-example cosine (N,) of the student's vectors to the teacher's on `data`."""
    s_span, t_span = Span(student.atoms), Span(teacher.atoms)
    out = []
    for i in range(0, len(data), batch):
        ex = data.take(range(i, min(i + batch, len(data))))
        mask = ex.mask if ex.mask is not None else torch.ones_like(ex.inputs, dtype=torch.bool)
        s, t = pooled(s_span, ex.inputs, mask), pooled(t_span, ex.inputs, mask)
        out.append(F.cosine_similarity(s, t, dim=-1, eps=1e-8))
    return torch.cat(out) if out else torch.zeros(0)


def _examples(paras: Sequence[Sequence[int]], length: int, cls: int, sep: int) -> Examples:
    """[CLS] p [SEP] per paragraph, p truncated so the whole fits `length`, right-padded to
    the longest; targets = `embed_targets`."""
    seqs = [[cls, *p[: length - 2], sep] for p in paras]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return Examples(inputs=ids, targets=embed_targets(ids, mask), mask=mask)


def embed_dataset(
    text: str,
    tok: TextTokenizer,
    *,
    length: int,
    digest: str,
    validation_text: str | None = None,
    max_validation: int = 2000,
) -> Dataset:
    """One example per non-empty paragraph, truncated to `length` tokens with [CLS] and
    [SEP] (as an embedding request's text is); the split is `corpus.is_validation`'s
    unless `validation_text` is given.

    Raises:
        DataError: `length` < 3, or no training or no validation paragraph.
    """
    if length < 3:
        raise DataError(f"length must be >= 3 ([CLS] text [SEP]), got {length}")
    cls, sep = special_ids(tok)
    paras = paragraphs(text)
    if validation_text is None:
        train_p = [p for p in paras if not is_validation(p)]
        val_p = [p for p in paras if is_validation(p)]
    else:
        train_p, val_p = paras, paragraphs(validation_text)
    train_ids = [p for p in tok.encode_untruncated(train_p) if p]
    val_ids = [p for p in tok.encode_untruncated(val_p[:max_validation]) if p]
    if not train_ids or not val_ids:
        raise DataError(
            f"embedding distillation needs training and validation paragraphs, got "
            f"{len(train_ids)} and {len(val_ids)}; give more text or --validation FILE"
        )
    return Dataset(
        train=_examples(train_ids, length, cls, sep),
        validation=_examples(val_ids, length, cls, sep),
        digest=digest,
    )


def encoder_student_of(teacher: Model, model_id: str, *, layers: Sequence[int]) -> Model:
    """A smaller embedding model cut from a BERT-family `teacher` (embedding, encoder
    layers, pooling): the encoder layers listed (0-based, increasing), with their weights.

    Raises:
        ModelFormatError: not an embedding model, or an empty/unsorted/out-of-range list.
    """
    if teacher.family != "bert" or not ends_in_pooling(teacher):
        raise ModelFormatError(
            f"student: {teacher.model_id} is not a BERT-family embedding model "
            "(embedding, encoder layers, pooling)"
        )
    n_layers = len(teacher) - 2
    keep = list(layers)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n_layers:
        raise ModelFormatError(
            f"student: base_layers must be distinct increasing indices in [0, {n_layers}), "
            f"got {keep}"
        )
    atoms = teacher.atoms
    chosen = [atoms[0], *(atoms[1 + i] for i in keep), atoms[-1]]
    config = {
        **dict(teacher.config),
        "num_hidden_layers": len(keep),
        "student_of": teacher.model_id,
        "student_base_layers": ",".join(map(str, keep)),
    }
    return Model(
        model_id=model_id,
        family=teacher.family,
        config=config,
        atoms=[copy_atom(a, model_id, i) for i, a in enumerate(chosen)],
        tokenizer=teacher.tokenizer,
    )
