"""Llama atoms against `transformers` (reference), spans, caches and loader errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file, save_file

from atoms.atom import Atom, ForwardContext
from atoms.cache import SessionCache
from atoms.errors import (
    CacheExhausted,
    CacheNotReady,
    InputOutOfRange,
    ModelFormatError,
    WeightsError,
)
from atoms.generation import GenerationParams, StopReason, generate
from atoms.llama import (
    LlamaConfig,
    eos_token_ids,
    llama_atom_from_spec,
    load_llama,
    load_llama_atoms,
)
from atoms.model import load_span, save_model
from atoms.span import Span

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

transformers = pytest.importorskip("transformers")

TINY: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "initializer_range": 0.1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
BUDGET = 1 << 24


def _save_reference(folder: Path, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # transformers initialises from the global RNG
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model: LlamaForCausalLM = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    folder = tmp_path_factory.mktemp("llama")
    return _save_reference(folder), folder


@pytest.fixture(scope="module")
def atoms(reference: tuple[LlamaForCausalLM, Path]) -> list[Atom]:
    return load_llama_atoms(reference[1], model_id="tiny")[1]


def _forward(
    atoms: list[Atom], ids: torch.Tensor, *, cache: SessionCache | None = None
) -> torch.Tensor:
    b, t = ids.shape
    with torch.no_grad():
        out: torch.Tensor = Span(atoms)(
            ids, ForwardContext.for_tokens(b, t, causal=True, cache=cache)
        )
    return out


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 0, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_logits_match_transformers(
    reference: tuple[LlamaForCausalLM, Path], atoms: list[Atom]
) -> None:
    model, _ = reference
    with torch.no_grad():
        expected = model(IDS).logits
    torch.testing.assert_close(_forward(atoms, IDS), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_the_same_weights(
    reference: tuple[LlamaForCausalLM, Path], atoms: list[Atom], tmp_path: Path
) -> None:
    model, _ = reference
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    _, sharded = load_llama_atoms(tmp_path, model_id="tiny")
    assert torch.equal(_forward(sharded, IDS), _forward(atoms, IDS))


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 4,
            }
        },
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}},
        {"num_key_value_heads": 4, "head_dim": 8},
    ],
    ids=["tied-bias", "llama3-rope", "linear-rope", "mha-head-dim"],
)
def test_config_variants_match_transformers(tmp_path: Path, overrides: dict[str, object]) -> None:
    model = _save_reference(tmp_path, seed=1, **overrides)
    _, ours = load_llama_atoms(tmp_path, model_id="v")
    with torch.no_grad():
        expected = model(IDS).logits
    torch.testing.assert_close(_forward(ours, IDS), expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate(
    reference: tuple[LlamaForCausalLM, Path], atoms: list[Atom]
) -> None:
    model, _ = reference
    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        # transformers types `generate`'s self as a mixin LlamaForCausalLM does not match.
        out = model.generate(  # type: ignore[misc]
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12
        )
    expected = out[0, len(prompt) :].tolist()
    done = generate(atoms, prompt, GenerationParams(max_new_tokens=12))
    assert list(done.token_ids) == expected
    recomputed = generate(atoms, prompt, GenerationParams(max_new_tokens=12), use_cache=False)
    assert recomputed.token_ids == done.token_ids


def test_cached_steps_match_full_forward_logits(atoms: list[Atom]) -> None:
    span = Span(atoms)
    ids = IDS[:1]
    full = _forward(atoms, ids)
    cache = span.new_session_cache(batch=1, max_len=8, budget_bytes=BUDGET)
    with torch.no_grad():
        first = span(ids[:, :5], ForwardContext.for_tokens(1, 5, causal=True, cache=cache))
        steps = [first] + [
            span(
                ids[:, t : t + 1],
                ForwardContext.for_tokens(1, 1, start=t, causal=True, cache=cache),
            )
            for t in range(5, 8)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cached", [False, True], ids=["full", "cached"])
def test_span_by_span_equals_monolithic_at_every_cut(atoms: list[Atom], cached: bool) -> None:
    ids = IDS[:1]

    def run(spans: list[Span]) -> torch.Tensor:
        caches = [s.new_session_cache(1, 8, BUDGET) if cached else None for s in spans]
        outs = []
        with torch.no_grad():
            for lo, hi in ((0, 6), (6, 7), (7, 8)):  # prefill, then two decode steps
                x = ids[:, lo:hi]
                for span, cache in zip(spans, caches, strict=True):
                    ctx = ForwardContext.for_tokens(1, hi - lo, start=lo, causal=True, cache=cache)
                    x = span(x, ctx)
                outs.append(x)
                if not cached:
                    break
        return torch.cat(outs, dim=1)

    whole = run([Span(atoms)])
    for cut in range(1, len(atoms)):
        assert torch.equal(run([Span(atoms[:cut]), Span(atoms[cut:])]), whole), cut


def test_left_padded_batch_matches_unpadded_rows(atoms: list[Atom]) -> None:
    short, long_ = [7, 8, 9], [5, 17, 42, 99, 3]
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])
    ids = torch.tensor([[0, 0, *short], long_])
    positions = (pad.long().cumsum(-1) - 1).clamp(min=0)  # rows count from their first real token
    with torch.no_grad():
        out = Span(atoms)(ids, ForwardContext(positions=positions, pad_mask=pad, causal=True))
    alone = [_forward(atoms, torch.tensor([row]))[0] for row in (short, long_)]
    torch.testing.assert_close(out[0, 2:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], alone[1], atol=1e-5, rtol=0)


def test_atoms_rebuild_from_spec_alone(atoms: list[Atom]) -> None:
    rebuilt = []
    for atom in atoms:
        fresh = llama_atom_from_spec(atom.spec)
        fresh.load_state_dict(atom.state_dict())
        rebuilt.append(fresh)
    assert torch.equal(_forward(rebuilt, IDS), _forward(atoms, IDS))


def test_cache_errors(atoms: list[Atom]) -> None:
    span = Span(atoms)
    with pytest.raises(CacheExhausted, match="budget is 1000 bytes"):
        span.new_session_cache(batch=1, max_len=8, budget_bytes=1000)
    blocks_only = Span(atoms[1:2]).new_session_cache(1, 8, BUDGET)  # no layer for atom 2
    with pytest.raises(CacheNotReady, match="tiny/002-block"):
        _forward(atoms, IDS[:1], cache=blocks_only)
    with pytest.raises(CacheExhausted, match="holds 6 tokens, 6 used, 1 more"):
        generate(atoms, [1, 2, 3, 4], GenerationParams(max_new_tokens=4), max_len=6)


def test_token_ids_out_of_vocabulary_are_rejected(atoms: list[Atom]) -> None:
    message = r"tiny/000-embedding: token ids must be in \[0, 256\)"
    with pytest.raises(InputOutOfRange, match=message):
        _forward(atoms, torch.tensor([[1, 256]]))


def _write_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_unsupported_configs_are_model_format_errors(tmp_path: Path) -> None:
    _save_reference(tmp_path)
    _write_config(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelFormatError, match="rope type 'yarn' is not supported"):
        load_llama_atoms(tmp_path, model_id="x")
    _write_config(
        tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu"
    )
    with pytest.raises(ModelFormatError, match="hidden_act must be 'silu', got 'gelu'"):
        load_llama_atoms(tmp_path, model_id="x")
    with pytest.raises(ModelFormatError, match="expected model_type 'llama', got 'bert'"):
        LlamaConfig.from_hf({"model_type": "bert"})


def test_missing_tensor_is_a_weights_error_naming_it(tmp_path: Path) -> None:
    _save_reference(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj"):
        load_llama_atoms(tmp_path, model_id="x")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no model\.safetensors"):
        load_llama_atoms(tmp_path, model_id="x")


def test_wrong_tensor_shape_is_a_weights_error(tmp_path: Path) -> None:
    _save_reference(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=r"norm.weight .* expected shape \(64,\), got \(63,\)"):
        load_llama_atoms(tmp_path, model_id="x")


def test_model_folder_round_trip_and_span_load(
    reference: tuple[LlamaForCausalLM, Path], tmp_path: Path
) -> None:
    model = load_llama(reference[1], model_id="tiny")
    assert model.family == "llama" and model.config["num_key_value_heads"] == 2
    save_model(model, tmp_path / "saved")
    head = load_span(tmp_path / "saved", 0, 2)
    tail = load_span(tmp_path / "saved", 2, len(model))
    with torch.no_grad():
        ctx = ForwardContext.for_tokens(2, IDS.shape[1], causal=True)
        assert torch.equal(tail(head(IDS, ctx), ctx), model.span()(IDS, ctx))


def test_eos_ids_are_recorded_and_stop_generation(tmp_path: Path, atoms: list[Atom]) -> None:
    _save_reference(tmp_path, eos_token_id=[7, 9])
    assert eos_token_ids(load_llama(tmp_path, model_id="e")) == (7, 9)
    free = generate(atoms, [1, 2], GenerationParams(max_new_tokens=10)).token_ids
    eos = free[3]
    stopped = generate(atoms, [1, 2], GenerationParams(max_new_tokens=10, stop_token_ids=(eos,)))
    assert stopped.token_ids == free[: free.index(eos) + 1]
    assert stopped.reason is StopReason.STOP_TOKEN


def test_logits_to_keep_projects_the_last_positions_alone(atoms: list[Atom]) -> None:
    full = _forward(atoms, IDS)
    with torch.no_grad():
        ctx = ForwardContext.for_tokens(2, IDS.shape[1], causal=True, logits_to_keep=1)
        got = Span(atoms)(IDS, ctx)
    torch.testing.assert_close(got, full[:, -1:], atol=1e-5, rtol=1e-5)
