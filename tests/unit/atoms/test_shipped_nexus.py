"""The shipped Nexus 1.1: its weights load and match their digest, and it has learned
English (a perplexity on a fixed validation slice that random blocks cannot reach)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from atoms.corpus import corpus_text, paragraphs
from atoms.errors import WeightsError
from atoms.model import Model
from atoms.nexus import NexusConfig, build_nexus, load_shipped, shipped_weights_path
from bench.lm_quality import perplexity
from nexusd.model_registry import NEXUS_SEED, NEXUS_SHIPPED_SHA256, ModelRegistry

SLICE = slice(100, 124)  # validation paragraphs: fast, fixed, past the title pages
TRAINED_BELOW = 150.0  # the shipped model measures far below (README); random init: ~3e4


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("models"))


def test_shipped_weights_load_and_match_their_digest(registry: ModelRegistry) -> None:
    model = registry.load_model("nexus-1.1")
    again = registry.load_model("nexus-1.1")
    assert registry.manifest("nexus-1.1").digest == registry.manifest("nexus-1.1").digest
    a = dict(model.atoms[8].named_parameters())
    b = dict(again.atoms[8].named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    random_init = registry.load_model("nexus-1.1-random")
    assert not torch.equal(
        a["qkv.weight"], dict(random_init.atoms[8].named_parameters())["qkv.weight"]
    )
    # the frozen base and the tied word embeddings are the bundled MiniLM's, untouched
    assert torch.equal(
        dict(model.atoms[0].named_parameters())["word.weight"],
        dict(random_init.atoms[0].named_parameters())["word.weight"],
    )


def test_a_tampered_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "nexus-1.1.safetensors"
    shutil.copy(shipped_weights_path(), bad)
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0x01
    bad.write_bytes(bytes(raw))
    fresh = build_nexus(None, NexusConfig(), NEXUS_SEED)
    with pytest.raises(WeightsError, match="expected SHA-256"):
        load_shipped(fresh, bad, NEXUS_SHIPPED_SHA256)


def validation_slice(model: Model) -> list[list[int]]:
    assert model.tokenizer is not None
    return model.tokenizer.encode_untruncated(paragraphs(corpus_text("validation"))[SLICE])


def test_the_shipped_model_has_learned_english(registry: ModelRegistry) -> None:
    trained = registry.load_model("nexus-1.1")
    random_init = registry.load_model("nexus-1.1-random")
    seqs = validation_slice(trained)
    ppl, scored = perplexity(trained, seqs, 128)  # the training window
    ppl_random, _ = perplexity(random_init, seqs, 128)
    assert scored > 500
    assert ppl < TRAINED_BELOW < ppl_random
