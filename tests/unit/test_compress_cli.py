"""`nexusd compress`: a derived model in the registry whose manifest holds its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.minilm import load_minilm
from atoms.model import Model
from nexusd.cli.app import main
from nexusd.model_registry import ModelRegistry

CFG = BertConfig(
    vocab_size=30522,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)


def test_compress_adds_a_smaller_model_that_records_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "node"
    base = random_bert(CFG, model_id="tiny", seed=5)
    registry = ModelRegistry(data / "models")
    registry.save(
        Model(
            model_id="tiny",
            family="bert",
            config=base.config,
            atoms=base.atoms,
            tokenizer=load_minilm().tokenizer,
        )
    )
    capsys.readouterr()  # the setup's log lines
    argv = [
        "compress",
        "tiny",
        "--quant",
        "int8",
        "--prune-heads",
        "0.25",
        "--prune-ffn",
        "0.25",
        "--data-dir",
        str(data),
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == "tiny-int8-p25-25" and out["bytes"] < out["ref_bytes"]
    assert len(out["atoms"]) == 4 and 0.5 < out["cosine"] <= 1.0
    config = dict(ModelRegistry(data / "models").manifest("tiny-int8-p25-25").config)
    assert config["compress.source"] == "tiny" and config["compress.quant"] == "int8"
    assert config["compress.bytes"] == out["bytes"]
    assert config["compress.atom.001.cosine"] == out["atoms"][1]["cosine"]
    span = ModelRegistry(data / "models").load_span("tiny-int8-p25-25", 0, 4)
    with torch.inference_mode():
        got = span(torch.tensor([[101, 2023, 102]]), ForwardContext.for_tokens(1, 3))
    assert got.shape == (1, 64)
    assert main(argv) == 1  # the id exists already: refused, nothing overwritten
    assert "exists already" in capsys.readouterr().err
