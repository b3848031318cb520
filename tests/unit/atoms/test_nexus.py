"""Nexus 1.1 over the bundled MiniLM base: structure, caches, spans, gradients, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from atoms.atom import AtomKind, ForwardContext
from atoms.cache import SessionCache
from atoms.errors import InputOutOfRange, ModelFormatError
from atoms.generation import GenerationParams, generate
from atoms.model import Model, load_span
from atoms.nexus import (
    NexusBlock,
    NexusConfig,
    NexusPosition,
    base_atom_count,
    build_nexus,
    init_random,
    load_nexus,
    nexus_atom_from_spec,
    nexus_specs,
    save_nexus,
    sinusoidal_table,
)
from atoms.span import Span

CFG = NexusConfig(blocks=2, heads=6, intermediate=256, max_positions=64)
BUDGET = 1 << 26
IDS = torch.tensor([[101, 7592, 2088, 1010, 2023, 2003, 1037, 3231]])


@pytest.fixture(scope="module")
def model() -> Model:
    return build_nexus(None, CFG, seed=0, model_id="nx")


def _ctx(length: int, *, start: int = 0, cache: SessionCache | None = None) -> ForwardContext:
    return ForwardContext.for_tokens(1, length, start=start, causal=True, cache=cache)


def test_structure_vocab_and_frozen_base(model: Model) -> None:
    kinds = [a.spec.kind for a in model.atoms]
    assert kinds == [
        AtomKind.EMBEDDING,
        *[AtomKind.BLOCK] * 6,
        AtomKind.POSITION,
        AtomKind.BLOCK,
        AtomKind.BLOCK,
        AtomKind.LM_HEAD,
    ]
    assert [a.spec.family for a in model.atoms] == ["bert"] * 7 + ["nexus"] * 4
    assert model.tokenizer is not None
    assert model.atoms[-1].spec.dim("vocab") == model.tokenizer.vocab_size == 30522
    assert model.config["nexus_version"] == "1.1"
    # its end of sequence is [SEP], which the daemon's generation stops at
    assert model.config["eos_token_ids"] == "102" == str(model.tokenizer.token_to_id("[SEP]"))
    n = base_atom_count(model)
    assert all(not p.requires_grad for a in model.atoms[:n] for p in a.parameters())
    trainable = {
        f"{a.spec.index}.{name}": p.requires_grad
        for a in model.atoms[n:]
        for name, p in a.named_parameters()
    }
    # everything after the base trains, but the tied head's copy of the word embeddings
    assert [k for k, v in trainable.items() if not v] == [f"{len(model.atoms) - 1}.table"]
    head = model.atoms[-1]
    word = dict(model.atoms[0].named_parameters())["word.weight"]
    assert torch.equal(dict(head.named_parameters())["table"], word)


def test_specs_are_numbered_after_the_base_and_heads_must_divide_width() -> None:
    specs = nexus_specs(NexusConfig(heads=4), hidden=16, vocab=10, first_index=7, model_id="t")
    assert [(s.index, s.kind) for s in specs] == [
        (7, AtomKind.POSITION),
        (8, AtomKind.BLOCK),
        (9, AtomKind.BLOCK),
        (10, AtomKind.LM_HEAD),
    ]
    with pytest.raises(ModelFormatError, match="hidden size 16 is not a multiple of heads 6"):
        nexus_specs(NexusConfig(heads=6), hidden=16, vocab=10, first_index=0, model_id="t")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"position must be one of .*got 'rope'"):
        NexusConfig(position="rope")
    with pytest.raises(ValueError, match="blocks must be an int >= 1, got 0"):
        NexusConfig(blocks=0)


def test_seed_gives_identical_fresh_weights() -> None:
    def fresh(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        specs = nexus_specs(
            NexusConfig(heads=4, intermediate=32), hidden=16, vocab=10, first_index=3, model_id="t"
        )
        atoms = [init_random(nexus_atom_from_spec(s), g, residual_layers=2) for s in specs]
        return [p for a in atoms for p in a.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(fresh(5), fresh(5), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fresh(5), fresh(6), strict=True))


def _tiny_block(seed: int = 0) -> NexusBlock:
    spec = nexus_specs(
        NexusConfig(heads=4, intermediate=32), hidden=16, vocab=10, first_index=0, model_id="t"
    )[1]
    block = init_random(
        nexus_atom_from_spec(spec), torch.Generator().manual_seed(seed), residual_layers=1
    )
    assert isinstance(block, NexusBlock)
    return block


def test_per_head_scaling_is_what_the_docstring_says() -> None:
    # exp(tau_h) scales head h's logits, i.e. its query rows; the gate 2*sigmoid(b_h) scales
    # head h's output, i.e. its value rows (attention is linear in v).
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    scaled, folded = _tiny_block(), _tiny_block()
    tau, b = torch.tensor([math.log(2.0), 0.0, -0.5, 0.3]), torch.tensor([0.0, 1.0, 0.0, -2.0])
    with torch.no_grad():
        scaled.head_log_temperature.copy_(tau)
        scaled.head_gate.bias.copy_(b)
        rows = torch.arange(16) // 4  # head of each q/k/v output row
        folded.qkv.weight[:16] *= tau.exp()[rows, None]
        folded.qkv.bias[:16] *= tau.exp()[rows]
        folded.qkv.weight[32:] *= 2 * torch.sigmoid(b)[rows, None]
        folded.qkv.bias[32:] *= 2 * torch.sigmoid(b)[rows]
        ctx = ForwardContext.for_tokens(2, 5, causal=True)
        torch.testing.assert_close(scaled(x, ctx), folded(x, ctx), atol=1e-6, rtol=0)


def test_positions_sinusoidal_and_learned() -> None:
    table = sinusoidal_table(torch.tensor([[0, 1]]), 4)
    expected = [[0.0, 1.0, 0.0, 1.0], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]]
    torch.testing.assert_close(table[0], torch.tensor(expected))
    spec = nexus_specs(
        NexusConfig(position="learned", max_positions=4, heads=4),
        hidden=16,
        vocab=10,
        first_index=0,
        model_id="t",
    )[0]
    atom = init_random(
        nexus_atom_from_spec(spec), torch.Generator().manual_seed(0), residual_layers=1
    )
    assert isinstance(atom, NexusPosition)
    x = torch.zeros(1, 2, 16)
    assert torch.equal(atom(x, _ctx(2, start=1)), atom.table.weight[1:3].unsqueeze(0))
    with pytest.raises(InputOutOfRange, match="positions must be < 4, got 4"):
        atom(x, _ctx(2, start=3))


def test_per_head_scaling_receives_gradients_base_does_not(model: Model) -> None:
    logits = model.span()(IDS, _ctx(IDS.shape[1]))
    torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:]).backward()
    blocks = [a for a in model.atoms if a.spec.family == "nexus" and a.spec.kind is AtomKind.BLOCK]
    try:
        for block in blocks:
            assert isinstance(block, NexusBlock)
            tau_grad, gate_grad = block.head_log_temperature.grad, block.head_gate.weight.grad
            assert tau_grad is not None
            assert tau_grad.abs().sum() > 0
            assert gate_grad is not None
            assert gate_grad.abs().sum() > 0
        assert all(p.grad is None for a in model.atoms[:7] for p in a.parameters())
    finally:
        for atom in model.atoms:
            atom.zero_grad(set_to_none=True)


def test_cached_decode_equals_full_recomputation(model: Model) -> None:
    params = GenerationParams(max_new_tokens=5)
    cached = generate(model, IDS[0, :4].tolist(), params)
    full = generate(model, IDS[0, :4].tolist(), params, use_cache=False)
    assert cached.token_ids == full.token_ids


@pytest.mark.parametrize("cached", [False, True], ids=["full", "cached"])
def test_span_by_span_equals_monolithic_at_every_cut(model: Model, cached: bool) -> None:
    steps = ((0, 6), (6, 7)) if cached else ((0, 8),)

    def run(spans: list[Span]) -> torch.Tensor:
        caches = [s.new_session_cache(1, 8, BUDGET) if cached else None for s in spans]
        outs = []
        with torch.no_grad():
            for lo, hi in steps:
                x = IDS[:, lo:hi]
                for span, cache in zip(spans, caches, strict=True):
                    x = span(x, _ctx(hi - lo, start=lo, cache=cache))
                outs.append(x)
        return torch.cat(outs, dim=1)

    whole = run([model.span()])
    for cut in range(1, len(model)):
        assert torch.equal(run([model.span(0, cut), model.span(cut)]), whole), cut


def test_save_load_round_trip(model: Model, tmp_path: Path) -> None:
    save_nexus(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["NexusForCausalLM"] and config["nexus_version"] == "1.1"
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_nexus(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.span()(IDS, _ctx(8)), model.span()(IDS, _ctx(8)))
    assert not any(p.requires_grad for p in loaded.atoms[0].parameters())
    assert loaded.tokenizer is not None
    assert model.tokenizer is not None
    assert loaded.tokenizer.encode("hello world") == model.tokenizer.encode("hello world")
    hidden = model.span(0, 7)(IDS, _ctx(8))
    with torch.no_grad():  # a host loading only the Nexus position + blocks
        middle = load_span(tmp_path, 7, 10)(hidden, _ctx(8))
        assert torch.equal(middle, model.span(7, 10)(hidden, _ctx(8)))

    config["nexus_version"] = "1.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"nexus_version '1\.1', got .*'1\.0'"):
        load_nexus(tmp_path)


def test_logits_to_keep_projects_the_last_positions_alone(model: Model) -> None:
    """`ForwardContext.logits_to_keep` (what a generation step and a reducing host ask):
    the head's output is the full forward's last positions, and nothing else changes."""
    with torch.no_grad():
        full = model.span()(IDS, _ctx(IDS.shape[1]))
        for keep in (1, 3, IDS.shape[1] + 2):
            ctx = ForwardContext.for_tokens(1, IDS.shape[1], causal=True, logits_to_keep=keep)
            got = model.span()(IDS, ctx)
            want = full[:, -min(keep, IDS.shape[1]) :]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
