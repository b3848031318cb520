"""Distillation: the loss's two terms, the ids a head span rebuilds from targets, students
cut from a teacher, and a few steps on the KL term moving a student toward its teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atoms.atom import ForwardContext
from atoms.distill import DistillConfig, TeacherLoss, distill_loss, lm_inputs, student_of
from atoms.errors import ModelFormatError
from atoms.model import Model
from atoms.nexus import NexusConfig, build_nexus, load_nexus, save_nexus
from atoms.span import Span
from atoms.training import IGNORE, OptimConfig, SpanTrainer, TrainingError, fp32_copy, lm_examples
from bench.distill import main as bench_distill

B, T, V = 2, 6, 11
BOS, PAD = 1, 2


@pytest.fixture(scope="module")
def teacher() -> Model:
    return build_nexus(None, NexusConfig(), seed=5)


def logits(seed: int) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_scaled_kl() -> None:
    s, t = logits(1), logits(2)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    targets[1, -2:] = IGNORE
    hard, _ = distill_loss(s, t, targets, DistillConfig(alpha=0.0))
    ce = F.cross_entropy(
        s.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    assert hard.count == B * T - 2 and math.isclose(hard.loss, float(ce), rel_tol=1e-5)
    soft, _ = distill_loss(s, t, targets, DistillConfig(temperature=3.0, alpha=1.0))
    valid = (targets != IGNORE).reshape(-1)
    p = F.softmax(t.reshape(-1, V)[valid] / 3.0, -1)
    q = F.log_softmax(s.reshape(-1, V)[valid] / 3.0, -1)
    kl = float((p * (p.log() - q)).sum()) * 9.0
    assert math.isclose(soft.loss, kl, rel_tol=1e-4)
    same, _ = distill_loss(t, t, targets, DistillConfig(alpha=1.0))
    assert abs(same.loss) < 1e-4  # a student equal to its teacher has nothing to learn
    mixed, _ = distill_loss(s, t, targets, DistillConfig(temperature=3.0, alpha=0.25))
    assert math.isclose(mixed.loss, 0.25 * soft.loss + 0.75 * hard.loss, rel_tol=1e-4)


def test_bad_inputs_are_refused() -> None:
    s, t = logits(1), logits(2)
    with pytest.raises(TrainingError, match="must both be"):
        distill_loss(s, t[:, :-1], torch.zeros(B, T, dtype=torch.long), DistillConfig())
    with pytest.raises(TrainingError, match="targets must be in"):
        distill_loss(s, t, torch.full((B, T), V, dtype=torch.long), DistillConfig())
    for bad in ({"temperature": 0.0}, {"alpha": 1.5}, {"temperature": math.nan}):
        with pytest.raises(ValueError):
            DistillConfig(**bad)  # type: ignore[arg-type]


def test_inputs_rebuilt_from_targets_are_the_examples_inputs() -> None:
    stream = list(range(10, 40))
    pairs = list(lm_examples(stream, 6, BOS))
    inputs = torch.tensor([p[0] for p in pairs])
    targets = torch.tensor([p[1] for p in pairs])
    assert torch.equal(lm_inputs(targets, BOS, PAD), inputs)
    padded = targets.clone()
    padded[0, -2:] = IGNORE
    assert lm_inputs(padded, BOS, PAD)[0, -1].item() == PAD


def test_student_keeps_the_teachers_weights_and_saves(teacher: Model, tmp_path: Path) -> None:
    same = student_of(teacher, "same")
    ids = torch.randint(1000, 3000, (B, T), generator=torch.Generator().manual_seed(0))
    ctx = ForwardContext.for_tokens(B, T, causal=True)
    with torch.no_grad():
        ref = Span(teacher.atoms)(ids, ctx)
        assert torch.equal(Span(same.atoms)(ids, ForwardContext.for_tokens(B, T, causal=True)), ref)
    small = student_of(teacher, "small", base_layers=[0, 2, 4], blocks=[1])
    assert len(small) == len(teacher) - 4
    assert small.config["base_layers"] == 3 and small.config["blocks"] == 1
    kept = dict(small.atoms[2].named_parameters())  # base layer 2 is the student's second
    for name, p in teacher.atoms[3].named_parameters():
        assert torch.equal(kept[name], p) and kept[name].requires_grad == p.requires_grad
    save_nexus(small, tmp_path / "small")
    back = load_nexus(tmp_path / "small")
    assert [a.spec for a in back.atoms] == [a.spec for a in small.atoms]
    with pytest.raises(ModelFormatError, match="base_layers must be"):
        student_of(teacher, "bad", base_layers=[4, 2])
    with pytest.raises(ModelFormatError, match="blocks must be"):
        student_of(teacher, "bad", blocks=[2])


def kl_to_teacher(student: Span, teacher: Span, ids: torch.Tensor) -> float:
    with torch.no_grad():
        s = student(ids, ForwardContext.for_tokens(*ids.shape, causal=True)).float()
        t = teacher(ids, ForwardContext.for_tokens(*ids.shape, causal=True)).float()
    return float(
        F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    )


def test_the_kl_term_moves_the_student_toward_its_teacher(teacher: Model) -> None:
    """A few steps on soft targets alone shrink KL(teacher || student) on the batch; a
    student trained on the hard labels of the same text does not move toward the teacher
    as much (its labels are not the teacher's predictions)."""
    student = student_of(teacher, "student", base_layers=[0, 2, 4])
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(1000, 3000, (4, 16), generator=gen)
    ids = lm_inputs(targets, BOS, PAD)
    ref = Span(teacher.atoms)
    before = kl_to_teacher(Span(student.atoms), ref, ids)
    after = {}
    for alpha in (0.0, 1.0):
        loss = TeacherLoss(ref, DistillConfig(temperature=1.0, alpha=alpha), bos=BOS, pad=PAD)
        trainer = SpanTrainer(
            Span(fp32_copy(student.atoms)),
            OptimConfig(dropout=0.0, weight_decay=0.0),
            needs_input_grad=False,
            loss_fn=loss if alpha > 0 else None,
        )
        for step in range(4):
            ctx = ForwardContext.for_tokens(*ids.shape, causal=True)
            result, _ = trainer.loss(0, ids, targets, ctx)
            trainer.apply(step, lr=1e-3, scale=1.0 / result.count)
        trainer.span.train(False)
        after[alpha] = kl_to_teacher(trainer.span, ref, ids)
    assert after[1.0] < 0.7 * before, (before, after)
    assert after[1.0] < after[0.0], (before, after)


@pytest.mark.slow
def test_distillation_beats_hard_labels_at_equal_steps(capsys: pytest.CaptureFixture[str]) -> None:
    """The bench's run (60 steps, ~10 CPU minutes): the distilled student ends closer to its
    teacher and at a lower validation perplexity than the same student on hard labels."""
    assert bench_distill(["--steps", "60"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["distill"]["kl"] < doc["hard"]["kl"] < doc["student_init"]["kl"]
    assert doc["distill"]["ppl"] < doc["hard"]["ppl"] < doc["student_init"]["ppl"]
