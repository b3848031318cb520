"""Embedding distillation: the loss against a direct computation (vectors and token terms),
the teacher's input rebuilt from targets with its padding mask, encoder students cut from a
teacher, the paragraph data, the body/pooling split equal to one span, and a few steps
moving a cut student toward its teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.datasets import Examples
from atoms.distill_embed import (
    COSINE_HIT,
    COSINE_ONLY,
    EmbedDistillConfig,
    EmbedTeacherLoss,
    PooledStudent,
    cosines,
    embed_dataset,
    embed_distill_loss,
    embed_inputs,
    embed_targets,
    encoder_student_of,
    ends_in_pooling,
    pooled,
    token_distill_loss,
)
from atoms.errors import DataError, ModelFormatError
from atoms.minilm import minilm_dir
from atoms.model import Model, load_model, save_model
from atoms.span import Span
from atoms.tokenizer import TextTokenizer
from atoms.training import IGNORE, OptimConfig, SpanTrainer, TrainingError, fp32_copy

CFG = BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)


@pytest.fixture(scope="module")
def teacher() -> Model:
    return random_bert(CFG, model_id="tiny", seed=3)


def vectors(seed: int, n: int = 5, width: int = 8) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three examples of 7, 4 and 2 real tokens, right-padded (pad id 0)."""
    ids = torch.randint(1, CFG.vocab_size, (3, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, n in enumerate((7, 4, 2)):
        mask[i, :n] = True
    return torch.where(mask, ids, 0), mask


def test_loss_equals_a_direct_computation_and_is_zero_for_the_teacher() -> None:
    s, t = vectors(1), vectors(2)
    cfg = EmbedDistillConfig(w_cos=0.7, w_mse=0.3)
    result, loss = embed_distill_loss(s, t, cfg)
    direct = 0.0
    for i in range(s.shape[0]):
        cos = float(s[i] @ t[i]) / (float(s[i].norm()) * float(t[i].norm()))
        direct += 0.7 * (1.0 - cos) + 0.3 * float(((s[i] - t[i]) ** 2).sum())
    assert math.isclose(result.loss, direct, rel_tol=1e-5) and result.count == 5
    assert math.isclose(float(loss), direct, rel_tol=1e-5)
    same, same_loss = embed_distill_loss(t, t.clone(), cfg)
    assert abs(same.loss) < 1e-5 and abs(float(same_loss)) < 1e-5 and same.correct == 5
    # unit vectors: the default (cosine only) is half the squared distance
    su, tu = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    default, _ = embed_distill_loss(su, tu, EmbedDistillConfig())
    mse, _ = embed_distill_loss(su, tu, EmbedDistillConfig(w_cos=0.0, w_mse=1.0))
    assert math.isclose(2.0 * default.loss, mse.loss, rel_tol=1e-5)
    cos = F.cosine_similarity(su, tu, dim=-1)
    assert default.correct == int((cos >= COSINE_HIT).sum())


def test_loss_gradient_is_the_direct_one() -> None:
    s = vectors(1).requires_grad_(True)
    t = vectors(2)
    _, loss = embed_distill_loss(s, t, EmbedDistillConfig(w_cos=1.0, w_mse=0.5))
    loss.backward()
    ref = s.detach().clone().requires_grad_(True)
    direct = (1.0 - F.cosine_similarity(ref, t, dim=-1)).sum() + 0.5 * ((ref - t) ** 2).sum()
    direct.backward()
    assert s.grad is not None and ref.grad is not None
    assert torch.allclose(s.grad, ref.grad, atol=1e-6)


def test_bad_inputs_are_refused(teacher: Model) -> None:
    with pytest.raises(TrainingError, match="must both be"):
        embed_distill_loss(vectors(1), vectors(2, n=4), EmbedDistillConfig())
    bads = (
        {"w_cos": -1.0},
        {"w_mse": math.nan},
        {"w_token": 101.0},
        {"w_cos": 0.0, "w_mse": 0.0, "w_token": 0.0},
    )
    for bad in bads:
        with pytest.raises(ValueError):
            EmbedDistillConfig(**bad)  # type: ignore[arg-type]
    loss = EmbedTeacherLoss(Span(teacher.atoms), EmbedDistillConfig())
    hidden = torch.zeros(3, 4, 16)
    with pytest.raises(TrainingError, match="input ids"):
        loss(vectors(1, n=3, width=16), torch.zeros(3, dtype=torch.long), hidden)
    empty = torch.full((3, 4), IGNORE, dtype=torch.long)
    with pytest.raises(TrainingError, match="at least one real token"):
        loss(vectors(1, n=3, width=16), empty, hidden)
    # the token term needs hidden states: a whole-model span's input (ids) is refused
    ids, mask = batch()
    with pytest.raises(TrainingError, match="pooling receives"):
        loss(vectors(1, n=3, width=16), embed_targets(ids, mask), ids)
    with pytest.raises(TrainingError, match="must both be"):
        token_distill_loss(torch.zeros(3, 7, 16), torch.zeros(3, 7, 8), mask)
    with pytest.raises(TrainingError, match="mask"):
        token_distill_loss(torch.zeros(3, 7, 16), torch.zeros(3, 7, 16), mask[:, :4])


def test_token_term_equals_a_direct_computation() -> None:
    _, mask = batch()
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(3, 7, 8, generator=gen)
    s = torch.randn(3, 7, 8, generator=gen).requires_grad_(True)
    rel = token_distill_loss(s, t, mask)
    assert torch.allclose(token_distill_loss(t, t, mask), torch.zeros(3))
    assert torch.allclose(token_distill_loss(torch.zeros_like(t), t, mask), torch.ones(3))
    moved = s.detach().clone()
    moved[~mask] += 100.0  # padded positions carry no loss
    assert torch.allclose(token_distill_loss(moved, t, mask), rel.detach())
    rel.sum().backward()
    ref = s.detach().clone().requires_grad_(True)
    direct = torch.zeros(())
    for i in range(3):
        n = int(mask[i].sum())
        direct = direct + ((ref[i, :n] - t[i, :n]) ** 2).sum() / (t[i, :n] ** 2).sum()
    direct.backward()
    assert s.grad is not None and ref.grad is not None
    assert torch.allclose(s.grad, ref.grad, atol=1e-6)
    assert math.isclose(float(rel.detach().sum()), float(direct.detach()), rel_tol=1e-5)


def test_teacher_sees_the_students_input_with_its_padding(teacher: Model) -> None:
    ids, mask = batch()
    targets = embed_targets(ids, mask)
    assert bool((targets[~mask] == IGNORE).all()) and torch.equal(targets[mask], ids[mask])
    back_ids, back_mask = embed_inputs(targets, pad=0)
    assert torch.equal(back_ids, ids) and torch.equal(back_mask, mask)
    loss = EmbedTeacherLoss(Span(teacher.atoms), EmbedDistillConfig())
    padded = loss.teacher_vectors(targets)
    for i in range(3):  # each example alone, unpadded: the pooling ignores the padding
        n = int(mask[i].sum())
        alone = pooled(Span(teacher.atoms), ids[i : i + 1, :n], mask[i : i + 1, :n])
        assert torch.allclose(padded[i], alone[0], atol=1e-5)
    # the student's pooling span, fed the same mask, against the teacher: zero loss, the
    # token term included (its input: the teacher's own hidden states)
    body = Span(teacher.atoms[:-1])
    ctx = ForwardContext.for_tokens(3, 7, causal=False, pad_mask=mask)
    with torch.no_grad():
        hidden = body(ids, ctx)
        out = Span(teacher.atoms[-1:])(hidden, ctx)
    result, _ = loss(out, targets, hidden)
    assert abs(result.loss) < 1e-5 and result.count == 3
    hidden_t, vectors_t = loss.teacher_outputs(targets)
    assert torch.allclose(hidden_t, hidden, atol=1e-6) and torch.equal(vectors_t, padded)


def test_encoder_student_keeps_the_teachers_weights(teacher: Model, tmp_path: Path) -> None:
    assert ends_in_pooling(teacher)
    whole = encoder_student_of(teacher, "whole", layers=range(4))
    ids, mask = batch()
    assert torch.allclose(
        pooled(Span(whole.atoms), ids, mask), pooled(Span(teacher.atoms), ids, mask), atol=1e-6
    )
    cut = encoder_student_of(teacher, "cut", layers=[0, 2])
    assert len(cut) == 4 and [a.spec.index for a in cut.atoms] == [0, 1, 2, 3]
    assert cut.config["num_hidden_layers"] == 2 and cut.config["student_base_layers"] == "0,2"
    kept, source = cut.atoms[2].state_dict(), teacher.atoms[3].state_dict()  # layer 2
    assert kept.keys() == source.keys()
    assert all(torch.equal(kept[k], source[k]) for k in kept)
    assert all(p.requires_grad for p in cut.span().parameters())
    save_model(cut, tmp_path / "cut")
    again = load_model(tmp_path / "cut")
    assert torch.allclose(
        pooled(Span(again.atoms), ids, mask), pooled(Span(cut.atoms), ids, mask), atol=1e-6
    )
    for bad in ([], [2, 1], [0, 4], [1, 1]):
        with pytest.raises(ModelFormatError, match="base_layers"):
            encoder_student_of(teacher, "bad", layers=bad)
    headless = random_bert(CFG, model_id="plain", seed=1, pooling=False)
    with pytest.raises(ModelFormatError, match="embedding model"):
        encoder_student_of(headless, "bad", layers=[0])


def test_paragraph_examples_truncate_and_split() -> None:
    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=256)
    long_p = " ".join(["word"] * 40)
    text = "\n\n".join(["Short one.", long_p, "A third paragraph here."])
    ds = embed_dataset(text, tok, length=12, digest="d", validation_text="Held out text.")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    train = ds.train
    assert len(train) == 3 and train.inputs.shape[1] == 12 and train.mask is not None
    assert bool((train.inputs[:, 0] == cls).all())
    assert int(train.mask[1].sum()) == 12 and int(train.inputs[1, 11]) == sep
    short = int(train.mask[0].sum())
    assert int(train.inputs[0, short - 1]) == sep and bool(
        (train.targets[0, short:] == IGNORE).all()
    )
    assert torch.equal(train.targets, embed_targets(train.inputs, train.mask))
    assert len(ds.validation) == 1
    with pytest.raises(DataError, match="length"):
        embed_dataset(text, tok, length=2, digest="d")


def perturbed_student(teacher: Model) -> Model:
    student = encoder_student_of(teacher, "s2", layers=[0, 3])
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a random BERT's layers barely move its mean: make them differ
        for p in student.span().parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return student


def ctx3(mask: torch.Tensor) -> ForwardContext:
    return ForwardContext.for_tokens(3, 7, causal=False, pad_mask=mask)


def test_split_student_equals_one_span_without_the_token_term(teacher: Model) -> None:
    """`PooledStudent` (body + pooling span, as the job splits a student) takes the same
    steps as one SpanTrainer over the whole student when the loss reads only the vectors."""
    student = perturbed_student(teacher)
    ids, mask = batch()
    targets = embed_targets(ids, mask)
    cfg = EmbedDistillConfig(w_token=0.0)
    optim = OptimConfig(weight_decay=0.01, dropout=0.0)
    whole = SpanTrainer(
        Span(fp32_copy(student.atoms)),
        optim,
        needs_input_grad=False,
        loss_fn=EmbedTeacherLoss(Span(teacher.atoms), cfg),
    )
    split = PooledStudent(
        fp32_copy(student.atoms), EmbedTeacherLoss(Span(teacher.atoms), cfg), optim
    )
    for step in range(3):
        a = whole.loss(0, ids, targets, ctx3(mask))[0]
        b = split.loss(0, ids, targets, ctx3(mask))
        assert math.isclose(a.loss, b.loss, rel_tol=1e-5) and a.count == b.count == 3
        assert math.isclose(whole.grad_sq_norm(), split.grad_sq_norm(), rel_tol=1e-4)
        whole.apply(step, lr=3e-3, scale=1.0 / 3)
        split.apply(step, lr=3e-3, scale=1.0 / 3)
    for p, q in zip(whole.span.atom_list(), split.atom_list(), strict=True):
        for (name, x), (_, y) in zip(p.state_dict().items(), q.state_dict().items(), strict=True):
            assert torch.allclose(x, y, atol=1e-5), name


def test_steps_move_a_cut_student_toward_its_teacher(teacher: Model) -> None:
    student = perturbed_student(teacher)
    ids, mask = batch()
    targets = embed_targets(ids, mask)
    ex = Examples(inputs=ids, targets=targets, mask=mask)
    before = cosines(student, teacher, ex, batch=2)
    trainer = PooledStudent(
        fp32_copy(student.atoms),
        EmbedTeacherLoss(Span(teacher.atoms), EmbedDistillConfig()),  # token term on
        OptimConfig(weight_decay=0.0, dropout=0.0),
    )
    cosine = EmbedTeacherLoss(Span(teacher.atoms), COSINE_ONLY)
    first = trainer.loss(0, ids, targets, ctx3(mask))
    # the default loss = the cosine term + the token term (each example's relative error)
    hidden, _ = cosine.teacher_outputs(targets)
    with torch.no_grad():
        s_hidden = Span(student.atoms[:-1])(ids, ctx3(mask))
    vec = cosine(pooled(Span(student.atoms), ids, mask), targets, s_hidden)[0]
    assert math.isclose(vec.loss, float((1 - before).sum()), rel_tol=1e-4)
    tokens = float(token_distill_loss(s_hidden, hidden, mask).sum())
    assert math.isclose(first.loss, vec.loss + tokens, rel_tol=1e-4)
    trainer.apply(0, lr=3e-3, scale=1.0 / 3)
    for step in range(1, 15):
        trainer.loss(0, ids, targets, ctx3(mask))
        trainer.apply(step, lr=3e-3, scale=1.0 / 3)
    last = trainer.loss(0, ids, targets, ctx3(mask))
    assert last.loss < 0.5 * first.loss
    trained = student.with_atoms(trainer.atom_list())
    after = cosines(trained, teacher, ex, batch=2)
    assert float((1 - after).sum()) < 0.6 * float((1 - before).sum())


def test_make_student_cuts_an_embedding_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nexusd.cli.app import main
    from nexusd.model_registry import ModelRegistry

    data = tmp_path / "node"
    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=32)
    big = random_bert(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
        ),
        model_id="tiny-embed",
        seed=2,
    )
    registry = ModelRegistry(data / "models")
    registry.save(
        Model(
            model_id="tiny-embed",
            family="bert",
            config=big.config,
            atoms=big.atoms,
            tokenizer=tok,
        )
    )
    capsys.readouterr()
    argv = ["make-student", "tiny-embed", "--base-layers", "0,3", "--id", "tiny-s2"]
    assert main([*argv, "--data-dir", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["atoms"] == 4 and out["teacher_atoms"] == 6
    student = registry.load_model("tiny-s2")
    assert student.config["student_base_layers"] == "0,3" and ends_in_pooling(student)
    assert all(p.requires_grad for p in student.span().parameters())
    bad = ["make-student", "tiny-embed", "--blocks", "0", "--id", "tiny-b"]
    assert main([*bad, "--data-dir", str(data)]) != 0
