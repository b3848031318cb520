"""`host --max-memory`: a memory budget picks the level the measured figures say."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest

from atoms.bert import BertConfig, random_bert
from atoms.compress import PREFIX
from atoms.minilm import load_minilm
from atoms.model import Model
from nexusd.cli.fitting import _bytes, fit_to_budget
from nexusd.config import load_config
from nexusd.errors import ApiError
from nexusd.fit import Level, choose, levels
from nexusd.model_registry import ModelRegistry
from nexusd.paths import NodePaths

CFG = BertConfig(
    vocab_size=30522,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)
LEVELS = [
    Level(name="fp32", model_id="m", dtype="float32", bytes=400, cosine=1.0),
    Level(name="bf16", model_id="m", dtype="bfloat16", bytes=200, cosine=0.99999),
    Level(name="int8", model_id="m-int8", dtype="", bytes=110, cosine=0.9995),
    Level(name="int4", model_id="m-int4", dtype="", bytes=70, cosine=0.985),
]


@pytest.mark.parametrize(
    ("budget", "floor", "chosen"),
    [(400, 0.99, "fp32"), (399, 0.99, "bf16"), (150, 0.99, "int8"), (70, 0.98, "int4")],
)
def test_the_most_accurate_level_that_fits_is_chosen(
    budget: int, floor: float, chosen: str
) -> None:
    choice = choose(iter(LEVELS), budget, floor)
    assert choice.chosen.name == chosen
    assert len(choice.passed) == LEVELS.index(choice.chosen)


def test_no_level_fits_says_why_for_each() -> None:
    with pytest.raises(ApiError, match="no compression level fits") as err:
        choose(iter(LEVELS), 100, 0.99)
    assert "int8: 110 bytes exceed" in err.value.message
    assert "int4: cosine 0.98500 is below the floor 0.99" in err.value.message


def test_byte_counts_take_units() -> None:
    assert _bytes("150M") == 150 << 20 and _bytes("1.5G") == 3 << 29 and _bytes("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        _bytes("lots")


def test_a_budget_builds_and_hosts_the_int8_level_with_its_measured_cost(tmp_path: Path) -> None:
    base = random_bert(CFG, model_id="tiny", seed=5)
    models = tmp_path / "models"
    registry = ModelRegistry(models)
    registry.save(
        Model(
            model_id="tiny",
            family="bert",
            config=base.config,
            atoms=base.atoms,
            tokenizer=load_minilm().tokenizer,
        )
    )
    all_levels = levels(registry, "tiny")
    fp32, bf16 = next(all_levels), next(all_levels)
    assert bf16.bytes < 0.55 * fp32.bytes and bf16.cosine > 0.999
    assert "tiny-int8" not in registry.available()  # built only when asked for
    over = list(itertools.islice(levels(registry, "tiny", budget=bf16.bytes - 1), 2))[1]
    assert over.bytes == bf16.bytes and over.cosine is None  # not measured: it cannot fit
    budget = (bf16.bytes + fp32.bytes // 4) // 2  # below bf16, above int8 (~0.26x)
    cfg = load_config(
        None,
        overrides={
            "atoms.models_dir": str(models),
            "atoms.host_max_memory_bytes": budget,
        },
    )
    args = argparse.Namespace(model="tiny", dtype="", auto=False)
    fitted = fit_to_budget(args, cfg, NodePaths(tmp_path / "node", tmp_path / "run"))
    assert (args.model, args.dtype) == ("tiny-int8", "")  # what the daemon is asked to host
    recorded = dict(ModelRegistry(models).manifest("tiny-int8").config)
    assert fitted.data["level"] == "int8" and fitted.data["bytes"] == recorded[PREFIX + "bytes"]
    cosine = recorded[PREFIX + "cosine"]
    assert isinstance(cosine, float) and fitted.data["cosine"] == cosine >= 0.99
    assert "fp32:" in fitted.text and "bf16:" in fitted.text and "exceed the budget" in fitted.text
    again = argparse.Namespace(model="tiny", dtype="bfloat16", auto=False)
    with pytest.raises(ApiError, match="--max-memory picks the precision"):
        fit_to_budget(again, cfg, NodePaths(tmp_path / "node", tmp_path / "run"))
