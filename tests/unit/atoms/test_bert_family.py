"""BERT atoms against the `transformers` reference, and the causal/cached path Nexus reuses."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, TypedDict

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, load_bert, random_bert
from atoms.errors import CacheExhausted, ModelFormatError, WeightsError
from atoms.span import Span

if TYPE_CHECKING:
    from pathlib import Path

transformers = pytest.importorskip("transformers")


class _TinyConfig(TypedDict):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int


TINY: _TinyConfig = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    folder = tmp_path_factory.mktemp("tiny-bert")
    ref.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder, ref


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(
        1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def test_hidden_states_match_transformers_without_padding(
    hf_tiny: tuple[Path, torch.nn.Module],
) -> None:
    folder, ref = hf_tiny
    ours = load_bert(folder, model_id="tiny", pooling=False)
    ids = _ids(2, 11, seed=1)
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours.span()(ids, ForwardContext.for_tokens(2, 11))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_hidden_states_match_transformers_with_padding_and_types(
    hf_tiny: tuple[Path, torch.nn.Module],
) -> None:
    folder, ref = hf_tiny
    ours = load_bert(folder, model_id="tiny", pooling=False)
    ids = _ids(3, 9, seed=2)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    types = torch.zeros(3, 9, dtype=torch.long)
    types[0, 4:] = 1
    ctx = ForwardContext.for_tokens(3, 9, pad_mask=mask.bool())
    ctx.extras["token_type_ids"] = types
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.span()(ids, ctx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_checkpoint_with_bert_prefix_loads(
    hf_tiny: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _folder, _ref = hf_tiny
    torch.manual_seed(1)
    cls = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY)).eval()
    cls.save_pretrained(tmp_path)
    ours = load_bert(tmp_path, model_id="tiny-cls", pooling=False)
    ids = _ids(1, 7, seed=3)
    with torch.no_grad():
        expected = cls.bert(input_ids=ids).last_hidden_state
        got = ours.span()(ids, ForwardContext.for_tokens(1, 7))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_missing_tensor_is_a_model_format_error_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    save_file(
        {"embeddings.word_embeddings.weight": torch.zeros(99, 32)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(ModelFormatError, match=r"embeddings\.position_embeddings\.weight"):
        load_bert(tmp_path, model_id="x")


def test_unsupported_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="model_type 'bert'"):
        BertConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ModelFormatError, match="relative_key"):
        BertConfig.from_hf(
            {"model_type": "bert", "position_embedding_type": "relative_key", **TINY}
        )
    with pytest.raises(ModelFormatError, match="hidden_act"):
        BertConfig.from_hf({"model_type": "bert", **TINY, "hidden_act": "swish"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_bert(tmp_path, model_id="x")


def _tiny_causal() -> Span:
    cfg = BertConfig(**TINY)
    return random_bert(cfg, model_id="base", seed=5, pooling=False).span()


def test_causal_cached_steps_equal_a_full_causal_forward() -> None:
    span = _tiny_causal()
    ids = _ids(2, 8, seed=4)
    with torch.no_grad():
        full = span(ids, ForwardContext.for_tokens(2, 8, causal=True))
        cache = span.new_session_cache(batch=2, max_len=8, budget_bytes=1 << 20)
        prefix = span(ids[:, :5], ForwardContext.for_tokens(2, 5, causal=True, cache=cache))
        steps = [prefix]
        for t in range(5, 8):
            ctx = ForwardContext.for_tokens(2, 1, start=t, causal=True, cache=cache)
            steps.append(span(ids[:, t : t + 1], ctx))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 8


def test_causal_outputs_ignore_future_tokens() -> None:
    span = _tiny_causal()
    ids = _ids(1, 6, seed=6)
    other = ids.clone()
    other[0, 4:] = (other[0, 4:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a = span(ids, ForwardContext.for_tokens(1, 6, causal=True))
        b = span(other, ForwardContext.for_tokens(1, 6, causal=True))
        bidir = span(other, ForwardContext.for_tokens(1, 6))
    assert torch.equal(a[:, :4], b[:, :4])
    assert not torch.allclose(bidir[:, :4], b[:, :4])


def test_cache_overflow_is_cache_exhausted() -> None:
    span = _tiny_causal()
    cache = span.new_session_cache(batch=1, max_len=4, budget_bytes=1 << 20)
    with torch.no_grad(), pytest.raises(CacheExhausted, match="holds 4 tokens"):
        span(_ids(1, 5, seed=7), ForwardContext.for_tokens(1, 5, causal=True, cache=cache))
