"""Spans: any cut of a model computes exactly what the whole model computes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert, with_classifier_head
from atoms.errors import CacheExhausted, CacheNotReady, UnsupportedOperation
from atoms.precision import model_to_dtype
from atoms.span import Span

if TYPE_CHECKING:
    from atoms.model import Model

CFG = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)


def _model(seed: int = 0) -> Model:
    return with_classifier_head(random_bert(CFG, model_id="tiny", seed=seed), 3, seed=seed)


def _inputs() -> tuple[torch.Tensor, ForwardContext]:
    ids = torch.randint(0, CFG.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return ids, ForwardContext.for_tokens(3, 7, pad_mask=mask)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_single_cut_equals_the_whole_model_bit_for_bit(dtype: str) -> None:
    model = _model()
    if dtype != "float32":
        model = model_to_dtype(model, dtype)
    ids, ctx = _inputs()
    n = len(model)
    with torch.no_grad():
        whole = model.span()(ids, ctx)
        assert whole.shape == (3, 3)
        assert whole.dtype == model.atoms[-1].spec.torch_dtype
        for cut in range(1, n):
            mid = model.span(0, cut)(ids, ctx)
            assert torch.equal(model.span(cut, n)(mid, ctx), whole), f"cut at {cut}"


def test_one_atom_per_span_equals_the_whole_model() -> None:
    model = _model()
    ids, ctx = _inputs()
    with torch.no_grad():
        x = ids
        for i in range(len(model)):
            x = model.span(i, i + 1)(x, ctx)
        assert torch.equal(x, model.span()(ids, ctx))


def test_mixed_precision_chain_casts_between_atoms() -> None:
    model = model_to_dtype(_model(), "bfloat16", indexes=[1, 2])
    ids, ctx = _inputs()
    with torch.no_grad():
        out = model.span()(ids, ctx)
        ref = _model().span()(ids, ctx)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, ref, dim=1).min() > 0.99


def test_span_rejects_gaps_mixed_models_and_kind_breaks() -> None:
    a, b = _model(), _model(seed=3)
    with pytest.raises(ValueError, match="contiguous"):
        Span([a.atoms[0], a.atoms[2]])
    other = random_bert(CFG, model_id="other", seed=0)
    with pytest.raises(ValueError, match="mixes models"):
        Span([a.atoms[0], other.atoms[1]])
    with pytest.raises(ValueError, match="at least one"):
        Span([])
    with pytest.raises(ValueError, match="not inside"):
        a.span(3, 3)
    assert b.span(1, 3).start == 1
    assert b.span(1, 3).end == 3


def test_kv_layouts_and_session_cache_cover_only_attention_atoms() -> None:
    span = _model().span(0, 3)  # embedding + 2 layers
    layouts = span.kv_layouts()
    assert sorted(layouts) == [1, 2]
    uid, layout = layouts[1]
    assert uid == "tiny/001-block"
    assert (layout.kv_heads, layout.head_dim) == (2, 8)
    cache = span.new_session_cache(batch=2, max_len=10, budget_bytes=1 << 16)
    assert cache.nbytes == 2 * layout.bytes_per_token(2) * 10
    with pytest.raises(CacheExhausted, match="budget"):
        span.new_session_cache(batch=2, max_len=10, budget_bytes=100)


def test_cached_forward_without_this_atoms_layer_is_cache_not_ready() -> None:
    model = _model()
    cache = model.span(2, 3).new_session_cache(batch=1, max_len=4, budget_bytes=1 << 16)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad(), pytest.raises(CacheNotReady, match="tiny/001-block"):
        model.span(0, 2)(ids, ForwardContext.for_tokens(1, 2, cache=cache))


def test_head_is_trainable_through_a_frozen_span() -> None:
    model = _model()
    ids, ctx = _inputs()
    frozen = model.span(0, len(model) - 1)
    head = model.atoms[-1]
    with torch.no_grad():
        pooled = frozen(ids, ctx)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    target = torch.tensor([0, 1, 2])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model.span(len(model) - 1)(pooled, ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_classifier_head_needs_a_pooled_output() -> None:
    model = _model()
    assert model.atoms[-1].spec.uid == "tiny/005-cls_head"
    assert all(p.requires_grad for p in model.atoms[-1].parameters())
    with pytest.raises(UnsupportedOperation, match="needs a bert/cnn pooled output"):
        with_classifier_head(random_bert(CFG, model_id="x", seed=0, pooling=False), 2, seed=0)
