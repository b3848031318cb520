"""SpanTrainer: backward through spans, deterministic dropout, AdamW steps, checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from atoms.atom import ForwardContext
from atoms.model import Model
from atoms.nexus import NexusConfig, base_atom_count, build_nexus
from atoms.span import Span
from atoms.training import (
    IGNORE,
    BadGradient,
    ChunkedCrossEntropy,
    NonFiniteLoss,
    OptimConfig,
    Schedule,
    SpanTrainer,
    TrainingError,
    fp32_copy,
    lm_examples,
    micro_batch_seed,
)

B, T = 2, 12


@pytest.fixture(scope="module")
def model() -> Model:
    return build_nexus(None, NexusConfig(), seed=3)


def ctx(seed: int, dropout: float = 0.1) -> ForwardContext:
    c = ForwardContext.for_tokens(B, T, causal=True)
    c.dropout, c.seed = dropout, seed
    return c


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 3000, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def trainers(model: Model, cuts: list[int], **kw: object) -> list[SpanTrainer]:
    """SpanTrainers over fresh fp32 copies of the model, cut at `cuts`."""
    atoms = fp32_copy(model.atoms)
    bounds = [0, *cuts, len(atoms)]
    first = next(i for i, a in enumerate(atoms) if any(p.requires_grad for p in a.parameters()))
    out = []
    for a, b in itertools.pairwise(bounds):
        out.append(
            SpanTrainer(
                Span(atoms[a:b]),
                OptimConfig(**kw),  # type: ignore[arg-type]
                needs_input_grad=a > first,
            )
        )
    return out


def run_step(chain: list[SpanTrainer], step: int, mbs: int = 2, lr: float = 1e-3) -> float:
    """One optimiser step of `mbs` micro-batches through a chain of trainers, as the origin
    drives it: frozen spans infer, trainable spans forward, the last one takes the loss,
    gradients flow back; clip by the global norm; apply everywhere."""
    loss = count = 0.0
    for mb in range(mbs):
        x, y = batch(100 * step + mb)
        seed = micro_batch_seed(7, step, mb)
        h = x
        for tr in chain[:-1]:
            h = (
                tr.forward(mb, h, ctx(seed))
                if tr.trains or tr.needs_input_grad
                else tr.infer(h, ctx(seed))
            )
        result, g = chain[-1].loss(mb, h, y, ctx(seed))
        loss, count = loss + result.loss, count + result.count
        for tr in reversed(chain[:-1]):
            if g is None:
                break
            g = tr.backward(mb, g)
    norm = math.sqrt(sum(tr.grad_sq_norm() for tr in chain)) / count
    scale = min(1.0, 1.0 / norm) / count
    for tr in chain:
        tr.apply(step, lr=lr, scale=scale)
    return loss / count


def params(chain: list[SpanTrainer]) -> dict[str, torch.Tensor]:
    return {
        f"{tr.span.start}.{n}": p.detach().clone()
        for tr in chain
        for n, p in tr.span.named_parameters()
    }


def test_cut_anywhere_equals_one_span(model: Model) -> None:
    """Two optimiser steps over 3 spans equal the same steps over the whole model."""
    k = base_atom_count(model)
    whole, cut = trainers(model, []), trainers(model, [k - 2, k + 2])
    for step in range(2):
        assert run_step(whole, step) == pytest.approx(run_step(cut, step), rel=1e-6)
    a, b = params(whole), params(cut)
    flat_a = torch.cat([t.flatten() for t in a.values()])
    flat_b = torch.cat([t.flatten() for t in b.values()])
    assert torch.allclose(flat_a, flat_b, rtol=1e-5, atol=1e-7)


def test_frozen_atoms_get_no_gradient_and_do_not_change(model: Model) -> None:
    k = base_atom_count(model)
    chain = trainers(model, [k])
    before = params(chain)
    run_step(chain, 0)
    assert not chain[0].trains
    assert all(p.grad is None for p in chain[0].span.parameters())
    after = params(chain)
    frozen = [n for n in before if int(n.split(".")[0]) == 0]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    head_table = [n for n in before if n.endswith("table")]
    assert head_table and all(torch.equal(before[n], after[n]) for n in head_table)
    moved = [n for n in before if n not in frozen and not torch.equal(before[n], after[n])]
    assert moved  # the trainable atoms did learn


def test_recompute_is_bit_identical_to_kept_graph(model: Model) -> None:
    k = base_atom_count(model)
    kept = trainers(model, [k, k + 2])
    recomputed = trainers(model, [k, k + 2])
    recomputed[1].budget = 0  # no graph fits: every backward recomputes the forward
    run_step(kept, 0)
    run_step(recomputed, 0)
    assert kept[1].stats.recomputes == 0 and recomputed[1].stats.recomputes == 2
    a, b = params(kept), params(recomputed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_dropout_masks_follow_the_seed(model: Model) -> None:
    tr = trainers(model, [base_atom_count(model)])[1]
    h = torch.randn(B, T, 384, generator=torch.Generator().manual_seed(0))
    a = tr.forward(0, h, ctx(5))
    b = tr.forward(1, h, ctx(5))
    c = tr.forward(2, h, ctx(6))
    d = tr.forward(3, h, ctx(6, dropout=0.0))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(c, d)


def test_loss_falls_on_a_small_task(model: Model) -> None:
    chain = trainers(model, [base_atom_count(model)], dropout=0.0)
    x, y = batch(0)
    h = chain[0].infer(x, ctx(0))
    sched = Schedule(lr=2e-3, warmup_steps=2, total_steps=15)
    losses = []
    for step in range(15):
        result, _ = chain[1].loss(0, h, y, ctx(step, 0.0))
        chain[1].apply(step, lr=sched.lr_at(step), scale=1.0 / result.count)
        losses.append(result.loss / result.count)
    assert losses[-1] < 0.3 * losses[0]


def test_steps_apply_once_in_order(model: Model) -> None:
    tr = trainers(model, [base_atom_count(model)])[1]
    assert tr.apply(0, lr=1e-3, scale=1.0)
    before = params([tr])
    assert not tr.apply(0, lr=1e-3, scale=1.0)  # a duplicate: nothing happens
    assert all(torch.equal(before[n], p) for n, p in params([tr]).items())
    with pytest.raises(TrainingError, match="skips ahead"):
        tr.apply(2, lr=1e-3, scale=1.0)


def test_bad_gradients_are_refused_and_change_nothing(model: Model) -> None:
    k = base_atom_count(model)
    tr = trainers(model, [k + 2, k + 3])[1]
    h = torch.randn(B, T, 384)
    tr.forward(0, h, ctx(1))
    with pytest.raises(BadGradient, match="expected"):
        tr.backward(0, torch.ones(B, T + 1, 384))
    with pytest.raises(BadGradient, match="NaN"):
        tr.backward(0, torch.full((B, T, 384), float("nan")))
    assert all(p.grad is None for _, p in tr.params)
    assert tr.backward(0, torch.ones(B, T, 384)) is not None  # the forward is still pending
    with pytest.raises(TrainingError, match="no forward pending"):
        tr.backward(0, torch.ones(B, T, 384))


def test_non_finite_loss_is_reported(model: Model) -> None:
    tr = trainers(model, [base_atom_count(model)])[1]
    with torch.no_grad():
        next(p for n, p in tr.params if n.endswith("bias")).fill_(float("inf"))
    _x, y = batch(0)
    h = torch.randn(B, T, 384)
    with pytest.raises(NonFiniteLoss, match="micro-batch 0"):
        tr.loss(0, h, y, ctx(0))


def test_checkpoint_resume_equals_uninterrupted(model: Model) -> None:
    k = base_atom_count(model)
    straight = trainers(model, [k])
    for step in range(3):
        run_step(straight, step)
    first = trainers(model, [k])
    for step in range(2):
        run_step(first, step)
    saved = first[1].state_tensors()
    resumed = trainers(model, [k])
    resumed[0].load_state({}, next_step=2)  # the frozen span: nothing but the step count
    resumed[1].load_state(saved, next_step=2)
    run_step(resumed, 2)
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoint_that_does_not_fit_is_refused(model: Model) -> None:
    tr = trainers(model, [base_atom_count(model)])[1]
    state = tr.state_tensors()
    name = next(iter(state))
    with pytest.raises(TrainingError, match="missing"):
        tr.load_state({n: t for n, t in state.items() if n != name}, next_step=0)
    bad = dict(state)
    bad[name] = torch.zeros(3)
    with pytest.raises(TrainingError, match="bad shape"):
        tr.load_state(bad, next_step=0)


def test_schedule_warms_up_then_decays() -> None:
    s = Schedule(lr=1e-3, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert s.lr_at(110) == pytest.approx(1e-4)
    lin = Schedule(lr=1e-3, warmup_steps=0, total_steps=100, decay="linear", min_ratio=0.0)
    assert lin.lr_at(50) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="decay"):
        Schedule(decay="step")


def test_lm_examples_start_from_bos_and_shift() -> None:
    out = list(lm_examples([5, 6, 7, 8, 9, 10, 11], 3, bos=101))
    assert out == [([101, 5, 6], [5, 6, 7]), ([101, 8, 9], [8, 9, 10])]
    targets = torch.tensor([[1, IGNORE]])
    assert targets.dtype == torch.long


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch(dtype: torch.dtype) -> None:
    """The row-blocked loss, its gradient and the argmax count equal F.cross_entropy on a
    float32 copy (more rows than one block, IGNORE rows, both dtypes)."""
    g = torch.Generator().manual_seed(0)
    rows = ChunkedCrossEntropy.ROWS * 2 + 37
    logits = (torch.randn(rows, 501, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 501, (rows,), generator=g)
    targets[::5] = IGNORE
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    (want,) = torch.autograd.grad(ref * 0.5, logits)
    loss, correct = ChunkedCrossEntropy.apply(logits, targets)
    (got,) = torch.autograd.grad(loss * 0.5, logits)
    assert got.dtype == dtype
    assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the gradient
    assert (got.float() - want.float()).abs().max() <= tol
    valid = targets != IGNORE
    hits = (logits.detach().float().argmax(-1) == targets) & valid
    assert int(correct) == int(hits.sum())
