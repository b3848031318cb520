"""Greedy structured pruning: the elimination's costs are the true refit errors, the model-wide
budget is spread exactly, and a greedily pruned block is an ordinary, rebuildable atom."""

from __future__ import annotations

import pytest
import torch

from atoms.atom import Atom, ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.model import build_atom
from atoms.nexus import NexusConfig, init_random, nexus_atom_from_spec, nexus_specs
from atoms.prune import (
    RIDGE,
    Removal,
    eliminate,
    prune_greedy,
    uniform_removal,
)

CFG = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)


def _bert_blocks() -> list[Atom]:
    return list(random_bert(CFG, model_id="tiny", seed=5).atoms[1:4])


def _nexus_block() -> Atom:
    spec = nexus_specs(
        NexusConfig(heads=4, intermediate=40), hidden=32, vocab=100, first_index=3, model_id="nx"
    )[1]
    return init_random(
        nexus_atom_from_spec(spec), torch.Generator().manual_seed(2), residual_layers=2
    )


def _objective(a: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, ridge: float) -> float:
    """min over (w, b) of ||y - [a_cols 1] w||^2 + ridge ||w||^2, solved directly."""
    x = torch.cat((a[:, cols], torch.ones(a.shape[0], 1, dtype=a.dtype)), dim=1)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=a.dtype)
    w = torch.linalg.solve(gram, x.T @ y)
    return float((y - x @ w).pow(2).sum() + ridge * w.pow(2).sum())


def test_elimination_costs_are_the_refit_error_and_it_drops_the_useless_columns() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    y = a[:, :6] @ torch.randn(6, 5, generator=gen, dtype=torch.float64)  # groups 0..2 matter
    y += 0.01 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    fit = eliminate(a, y, group=2, remove=3)
    assert fit.kept.tolist() == [0, 1, 2]
    assert fit.weight.shape == (5, 6) and fit.bias.shape == (5,) and len(fit.costs) == 3
    full = torch.cat((a, torch.ones(200, 1, dtype=a.dtype)), dim=1)
    ridge = RIDGE * float((full.T @ full).diagonal().mean())
    before = _objective(a, y, torch.arange(12), ridge)
    after = _objective(a, y, torch.arange(6), ridge)
    assert sum(fit.costs) == pytest.approx(after - before, rel=1e-6, abs=1e-9)
    x = torch.cat((a[:, :6], torch.ones(200, 1, dtype=a.dtype)), dim=1)
    direct = torch.linalg.solve(
        x.T @ x + ridge * torch.eye(7, dtype=a.dtype), x.T @ y
    )  # the refit on the kept columns
    assert torch.allclose(fit.weight, direct[:-1].T.float(), atol=1e-4)
    with pytest.raises(ValueError, match="can remove"):
        eliminate(a, y, group=2, remove=6)


def test_uniform_removal_is_the_fraction_of_each_block_keeping_one() -> None:
    block = _bert_blocks()[0]
    assert uniform_removal(block, heads=0.25, ffn=0.25) == Removal(heads=1, neurons=12)
    assert uniform_removal(block, heads=0.99, ffn=0.0) == Removal(heads=3, neurons=0)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        uniform_removal(block, heads=0.0, ffn=1.0)


@pytest.mark.parametrize("family", ["bert", "nexus"])
def test_a_greedily_pruned_block_shrinks_and_rebuilds_from_its_spec(family: str) -> None:
    block = _bert_blocks()[0] if family == "bert" else _nexus_block()
    causal = family == "nexus"
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    ctx = ForwardContext.for_tokens(2, 9, causal=causal)
    small = prune_greedy(block, Removal(heads=1, neurons=10), (x, x, ctx))
    assert small.spec.dim("heads") == 3 and small.spec.dim("head_dim") == 8
    assert small.spec.dim("intermediate") == block.spec.dim("intermediate") - 10
    layout = small.kv_layout()
    assert layout is not None and layout.kv_heads == 3
    rebuilt = build_atom(small.spec)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        out, ref = small(x, ctx), block(x, ctx)
        assert torch.equal(rebuilt(x, ctx), out)
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    assert float(cos.min()) > 0.9
    with pytest.raises(ValueError, match="can remove"):
        prune_greedy(block, Removal(heads=4, neurons=0), (x, x, ctx))
    with pytest.raises(ValueError, match=">= 0"):
        Removal(heads=-1, neurons=0)
