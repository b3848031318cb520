"""Knowledge distillation of language models: a student learns the teacher's soft targets.

The loss of one micro-batch, summed over its targets t (so micro-batches add up as the
cross-entropy's do, `atoms.training` rule 3):

    loss = alpha * T^2 * KL(softmax(teacher_t / T) || softmax(student_t / T))
         + (1 - alpha) * CE(student_t, target_t)

T (temperature) softens both distributions so the teacher's ranking of the wrong tokens
carries signal; T^2 keeps the soft term's gradient on the scale of the hard one (Hinton et
al., 2015). alpha = 0 is plain training on hard labels.

Rule 1: the teacher runs forward only (no gradient, no dropout) on the same input ids as
the student; `TeacherLoss` rebuilds those ids from the targets of a causal-LM example
(input = [bos] + target[:-1], `atoms.training.lm_examples`), so the only thing the span
holding the student's head needs is the targets it already receives.
Rule 2: a student is an ordinary model (`student_of` drops base layers and/or Nexus blocks
of a Nexus 1.1 teacher and keeps the weights of what stays), saved, hosted and trained like
any other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .atom import Atom, ForwardContext
from .errors import ModelFormatError
from .model import Model, build_atom, load_state
from .nexus import base_atom_count, nexus_config_of
from .span import Span
from .training import IGNORE, LossSum, TrainingError


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Args:
    temperature: T > 0 of the soft targets (1: the teacher's own distribution).
    alpha: weight of the soft (KL) term in [0, 1]; 1 - alpha weighs the hard labels.
    """

    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 < self.temperature <= 100.0):
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, cfg: DistillConfig
) -> tuple[LossSum, torch.Tensor]:
    """The summed distillation loss of (B, T, V) student logits against the teacher's.

    Positions whose target is IGNORE carry no loss (neither term). `LossSum.loss` is the
    mixed loss (what is minimised); `correct` counts the student's argmax hits.

    Raises:
        TrainingError: shapes that differ, or targets outside [0, V).
    """
    if tuple(student.shape) != tuple(teacher.shape) or student.dim() != 3:
        raise TrainingError(
            f"distill: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "logits must both be (B, T, V)"
        )
    vocab = student.shape[-1]
    if targets.dtype != torch.long or tuple(targets.shape) != tuple(student.shape[:-1]):
        raise TrainingError(f"distill: targets must be int64 {tuple(student.shape[:-1])}")
    valid = (targets != IGNORE).reshape(-1)
    if bool(((targets < 0) | (targets >= vocab)).reshape(-1)[valid].any()):
        raise TrainingError(f"distill: targets must be in [0, {vocab}) or {IGNORE}")
    s = student.reshape(-1, vocab).float()[valid]
    t = teacher.reshape(-1, vocab).float()[valid]
    flat = targets.reshape(-1)[valid]
    temp = cfg.temperature
    hard = F.cross_entropy(s, flat, reduction="sum")
    soft_t = F.log_softmax(t / temp, dim=-1)
    kl = F.kl_div(F.log_softmax(s / temp, dim=-1), soft_t, log_target=True, reduction="sum")
    loss = cfg.alpha * temp * temp * kl + (1.0 - cfg.alpha) * hard
    with torch.no_grad():
        correct = int((s.argmax(-1) == flat).sum())
    return LossSum(loss=float(loss.detach()), count=int(valid.sum()), correct=correct), loss


def lm_inputs(targets: torch.Tensor, bos: int, pad: int) -> torch.Tensor:
    """The input ids of causal-LM examples from their targets: [bos] + target[:-1] per row
    (IGNORE positions read as `pad`: they carry no loss, and in a causal model they only
    reach later positions, which are padding too)."""
    ids = torch.where(targets == IGNORE, torch.full_like(targets, pad), targets)
    first = torch.full_like(ids[:, :1], bos)
    return torch.cat([first, ids[:, :-1]], dim=1)


class TeacherLoss:
    """The loss function of a student's head span: teacher logits computed here, from the
    targets (rule 1), then `distill_loss`. Pass it as `SpanTrainer(loss_fn=...)`.

    Args:
        teacher: the teacher's whole model as one span (ids in, logits out).
        cfg: temperature and alpha.
        bos, pad: the ids that start every example and fill padding.
    """

    def __init__(self, teacher: Span, cfg: DistillConfig, *, bos: int, pad: int) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.bos, self.pad = bos, pad
        teacher.train(False)

    def teacher_logits(self, targets: torch.Tensor) -> torch.Tensor:
        ids = lm_inputs(targets, self.bos, self.pad)
        ctx = ForwardContext.for_tokens(ids.shape[0], ids.shape[1], causal=True)
        ctx.dropout = 0.0
        with torch.no_grad():
            out: torch.Tensor = self.teacher(ids, ctx, check=False)
        return out.float()

    def __call__(
        self, out: torch.Tensor, targets: torch.Tensor, _span_input: torch.Tensor
    ) -> tuple[LossSum, torch.Tensor]:
        if targets.dim() != 2:
            raise TrainingError("distill: targets must be (B, T) next-token ids")
        return distill_loss(out, self.teacher_logits(targets), targets, self.cfg)


def copy_atom(atom: Atom, model_id: str, index: int) -> Atom:
    """A copy of `atom` as atom `index` of `model_id`, weights and frozen flags kept."""
    new = build_atom(dataclasses.replace(atom.spec, model_id=model_id, index=index))
    load_state(new, atom.state_dict(), f"student copy of {atom.spec.uid}")
    for (_, src), (_, dst) in zip(atom.named_parameters(), new.named_parameters(), strict=True):
        dst.requires_grad_(src.requires_grad)
    return new


def student_of(
    teacher: Model,
    model_id: str,
    *,
    base_layers: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
) -> Model:
    """A smaller Nexus 1.1 model cut from `teacher`: the base (BERT) layers and Nexus blocks
    listed (0-based, in order; None keeps all), with the teacher's weights and frozen flags.

    Raises:
        ModelFormatError: not a Nexus 1.1 teacher, or an empty/unsorted/out-of-range list.
    """
    cfg = nexus_config_of(teacher)
    n_base = base_atom_count(teacher) - 1  # BERT layers after the embedding
    keep_base = list(range(n_base)) if base_layers is None else list(base_layers)
    keep_blocks = list(range(cfg.blocks)) if blocks is None else list(blocks)
    for name, keep, limit in (
        ("base_layers", keep_base, n_base),
        ("blocks", keep_blocks, cfg.blocks),
    ):
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= limit:
            raise ModelFormatError(
                f"student: {name} must be distinct increasing indices in [0, {limit}), got {keep}"
            )
    atoms = teacher.atoms
    position = n_base + 1
    chosen = [
        atoms[0],
        *(atoms[1 + i] for i in keep_base),
        atoms[position],
        *(atoms[position + 1 + i] for i in keep_blocks),
        atoms[-1],
    ]
    config = {
        **dict(teacher.config),
        "base_layers": len(keep_base),
        "base_num_hidden_layers": len(keep_base),
        "blocks": len(keep_blocks),
        "student_of": teacher.model_id,
        "student_base_layers": ",".join(map(str, keep_base)),
        "student_blocks": ",".join(map(str, keep_blocks)),
    }
    return Model(
        model_id=model_id,
        family=teacher.family,
        config=config,
        atoms=[copy_atom(a, model_id, i) for i, a in enumerate(chosen)],
        tokenizer=teacher.tokenizer,
    )
