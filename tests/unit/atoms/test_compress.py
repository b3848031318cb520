"""Quantised and pruned atoms: built from their specs, saved, loaded and measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.compress import CompressSettings, compress, recheck
from atoms.errors import WeightsError
from atoms.minilm import load_minilm
from atoms.model import Model, build_atom, load_model, save_model
from atoms.nexus import NexusConfig, init_random, nexus_atom_from_spec, nexus_specs
from atoms.prune import Importance, importance, magnitude_prune, prune_block
from atoms.quant import QuantEmbedding, QuantLinear, QuantTable, quantize_atom, spec_quant

CFG = BertConfig(
    vocab_size=30522,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tiny() -> Model:
    """A small random BERT with MiniLM's tokenizer (the corpus is the calibration text)."""
    model = random_bert(CFG, model_id="tiny", seed=3)
    return Model(
        model_id="tiny",
        family="bert",
        config=model.config,
        atoms=model.atoms,
        tokenizer=load_minilm().tokenizer,
    )


def _outputs(model: Model) -> torch.Tensor:
    ids = torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out: torch.Tensor = model.span()(ids, ForwardContext.for_tokens(2, 9))
    return out


@pytest.mark.parametrize("level", ["int8", "int4"])
def test_quantised_atoms_are_packed_and_rebuild_from_their_spec(tiny: Model, level: str) -> None:
    q = quantize_atom(tiny.atoms[1], level, 32)
    assert spec_quant(q.spec) == (level, 32 if level == "int4" else 0)
    assert isinstance(q.q, QuantLinear) and not any(
        t.dtype == torch.float32 and t.numel() == 64 * 64 for t in q.state_dict().values()
    )
    rebuilt = build_atom(q.spec)
    assert {n: t.shape for n, t in rebuilt.state_dict().items()} == {
        n: t.shape for n, t in q.state_dict().items()
    }
    emb = quantize_atom(tiny.atoms[0], level, 32)
    assert isinstance(emb.word, QuantEmbedding)
    assert emb.word.qweight.dtype == (torch.int8 if level == "int8" else torch.uint8)


def test_quantise_refuses_a_quantised_atom(tiny: Model) -> None:
    with pytest.raises(ValueError, match="already quantised"):
        quantize_atom(quantize_atom(tiny.atoms[1], "int8"), "int8")


def test_compressed_model_loads_equal_and_its_figures_recompute(
    tiny: Model, tmp_path: Path
) -> None:
    settings = CompressSettings(
        model_id="tiny-c",
        quant="int8",
        prune_heads=0.25,
        prune_ffn=0.25,
        calib_texts=12,
        eval_texts=6,
    )
    derived, figs = compress(tiny, settings)
    assert (
        derived.atoms[1].spec.dim("heads") == 3 and derived.atoms[1].spec.dim("intermediate") == 96
    )
    assert figs.bytes < 0.4 * figs.ref_bytes and figs.params < figs.ref_params
    config = dict(derived.config)
    assert config["compress.cosine"] == figs.cosine and config["compress.bytes"] == figs.bytes
    save_model(derived, tmp_path)
    loaded = load_model(tmp_path)
    assert torch.equal(_outputs(loaded), _outputs(derived))
    again = recheck(tiny, loaded, settings)
    assert again.cosine == config["compress.cosine"]
    assert again.cosine_min == config["compress.cosine_min"]
    for a in again.atoms:
        assert a.bytes == config[f"compress.atom.{a.index:03d}.bytes"]
        assert a.params == config[f"compress.atom.{a.index:03d}.params"]
        assert a.cosine == config[f"compress.atom.{a.index:03d}.cosine"]


def test_a_corrupted_quantised_weight_file_is_refused(tiny: Model, tmp_path: Path) -> None:
    q = tiny.with_atoms(
        [quantize_atom(a, "int4", 32) for a in tiny.atoms[:2]] + list(tiny.atoms[2:])
    )
    manifest = save_model(q, tmp_path)
    path = tmp_path / "weights" / f"{manifest.atoms[1].digest}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # one bit of a packed weight
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt"):
        load_model(tmp_path)


def test_int4_gptq_on_calibration_beats_round_to_nearest(tiny: Model) -> None:
    layer = tiny.atoms[1]
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))
    ctx = ForwardContext.for_tokens(4, 16)
    with torch.no_grad():
        ref = layer(x, ctx)
        rtn = quantize_atom(layer, "int4", 32)(x, ctx)
        gptq = quantize_atom(layer, "int4", 32, (x, ctx))(x, ctx)
    assert (gptq - ref).pow(2).mean() < (rtn - ref).pow(2).mean()


def _nexus_block() -> torch.nn.Module:
    spec = nexus_specs(
        NexusConfig(heads=4, intermediate=96), hidden=64, vocab=100, first_index=3, model_id="nx"
    )[1]
    return init_random(
        nexus_atom_from_spec(spec), torch.Generator().manual_seed(2), residual_layers=2
    )


def test_structured_pruning_keeps_everything_at_zero_and_shrinks_the_block(tiny: Model) -> None:
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    for block, causal in ((tiny.atoms[1], False), (_nexus_block(), True)):
        ctx = ForwardContext.for_tokens(2, 7, causal=causal)
        scores = importance(block, x, ctx)  # type: ignore[arg-type]
        same = prune_block(block, scores, heads=0.0, ffn=0.0)  # type: ignore[arg-type]
        with torch.no_grad():
            assert torch.allclose(same(x, ctx), block(x, ctx), atol=1e-5)
        small = prune_block(block, scores, heads=0.5, ffn=0.25, calib=(x, x, ctx))  # type: ignore[arg-type]
        assert small.spec.dim("heads") == 2 and small.spec.dim("head_dim") == 16
        layout = small.kv_layout()
        assert layout is not None and layout.kv_heads == 2
        assert sum(p.numel() for p in small.parameters()) < sum(
            p.numel() for p in block.parameters()
        )
        rebuilt = build_atom(small.spec)
        rebuilt.load_state_dict(small.state_dict())
        with torch.no_grad():
            assert torch.equal(rebuilt(x, ctx), small(x, ctx))


def test_prune_refuses_bad_fractions_and_magnitude_pruning_zeroes(tiny: Model) -> None:
    scores = Importance(heads=torch.ones(4), neurons=torch.ones(128))
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        prune_block(tiny.atoms[1], scores, heads=1.0, ffn=0.0)
    sparse = magnitude_prune(tiny.atoms[1], 0.5)
    w = sparse.state_dict()["ffn_in.weight"]
    assert 0.49 < float((w == 0).float().mean()) < 0.51
    with pytest.raises(ValueError):
        dataclasses.replace(CompressSettings(model_id="x"), quant="int3")


def test_a_quantised_nexus_head_packs_its_tied_table() -> None:
    spec = nexus_specs(
        NexusConfig(heads=4, intermediate=96), hidden=64, vocab=100, first_index=3, model_id="nx"
    )[-1]
    head = init_random(
        nexus_atom_from_spec(spec), torch.Generator().manual_seed(6), residual_layers=2
    )
    with torch.no_grad():
        dict(head.named_parameters())["table"].copy_(
            torch.randn(100, 64, generator=torch.Generator().manual_seed(7))
        )
    q = quantize_atom(head, "int8")
    assert isinstance(q.table, QuantTable) and q.table.qweight.dtype == torch.int8
    assert "table" not in dict(q.named_parameters())
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(8))
    ctx = ForwardContext.for_tokens(2, 5, causal=True)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(
            q(x, ctx).flatten(), head(x, ctx).flatten(), dim=0
        )
    assert float(cos) > 0.999
    rebuilt = build_atom(q.spec)
    rebuilt.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x, ctx), q(x, ctx))
