"""fp32 <-> bf16 per atom, and the measured cosine helper (MiniLM's figure is in
test_minilm_reference.py)."""

from __future__ import annotations

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.embed import embed_texts
from atoms.errors import UnsupportedOperation
from atoms.precision import cosine_report, model_to_dtype, to_dtype

CFG = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
)


def test_to_dtype_returns_a_new_atom_with_an_updated_spec() -> None:
    model = random_bert(CFG, model_id="p", seed=0)
    layer = model.atoms[1]
    bf = to_dtype(layer, "bfloat16")
    assert bf is not layer
    assert bf.spec.dtype == "bfloat16"
    assert bf.spec.uid == layer.spec.uid
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in layer.parameters()} == {torch.float32}  # original untouched
    layout = bf.kv_layout()
    assert layout is not None
    assert layout.dtype == torch.bfloat16
    back = to_dtype(bf, "float32")
    for (name, a), (_, b) in zip(
        layer.state_dict().items(), back.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0.01, rtol=0.01, msg=name)
    with pytest.raises(ValueError, match="dtype must be one of"):
        to_dtype(layer, "float16")


def test_bf16_model_output_is_measured_against_fp32() -> None:
    model = random_bert(CFG, model_id="p", seed=0)
    bf = model_to_dtype(model, "bfloat16")
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    ctx = ForwardContext.for_tokens(4, 9)
    with torch.no_grad():
        report = cosine_report(model.span()(ids, ctx), bf.span()(ids, ctx))
    assert report.rows == 4
    assert 0.99 <= report.min <= report.mean <= 1.0 + 1e-6


def test_cosine_report_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="equal non-empty shapes"):
        cosine_report(torch.zeros(2, 3), torch.zeros(3, 3))
    assert cosine_report(torch.ones(2, 3), torch.ones(2, 3)).min == pytest.approx(1.0)


def test_embedding_needs_a_tokenizer() -> None:
    with pytest.raises(UnsupportedOperation, match="cannot embed text"):
        embed_texts(random_bert(CFG, model_id="p", seed=0), ["hello"])
