"""Importing a local Hugging Face Llama checkpoint makes it a hostable, routable model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from nexusd.cli.app import main
from nexusd.model_registry import ModelRegistry


@pytest.fixture
def llama_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder, safe_serialization=True)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        logits = model(ids).logits
    return folder, logits


def test_import_then_span_equals_transformers(
    tmp_path: Path, llama_folder: tuple[Path, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, want = llama_folder
    data = tmp_path / "node"
    assert main(["import-model", str(folder), "--id", "tiny", "--data-dir", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == "tiny" and out["atoms"] == 4  # embedding, 2 blocks, head
    registry = ModelRegistry(data / "models")
    info = registry.info("tiny")
    assert info.causal and info.family == "llama"
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    front, back = registry.load_span("tiny", 0, 2), registry.load_span("tiny", 2, 4)
    with torch.inference_mode():
        ctx = ForwardContext.for_tokens(1, 5, causal=True)
        got = back(front(ids, ctx), ctx)
    assert torch.allclose(got, want, atol=1e-4)


def test_import_refuses_unsupported_and_duplicates(
    tmp_path: Path, llama_folder: tuple[Path, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = llama_folder
    data = ["--data-dir", str(tmp_path / "node")]
    assert main(["import-model", str(folder), "--id", "tiny", *data]) == 0
    assert main(["import-model", str(folder), "--id", "tiny", *data]) == 1
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["import-model", str(tmp_path / "odd"), *data]) == 1
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


def test_spans_load_in_bfloat16_on_request(tmp_path: Path, llama_folder: tuple[Path, torch.Tensor]) -> None:
    folder, want = llama_folder
    assert main(["import-model", str(folder), "--id", "tiny", "--data-dir", str(tmp_path / "n")]) == 0
    registry = ModelRegistry(tmp_path / "n" / "models")
    span = registry.load_span("tiny", 0, 4, "bfloat16")
    assert {a.spec.dtype for a in span.atom_list()} == {"bfloat16"}
    with torch.inference_mode():
        got = span(torch.tensor([[3, 14, 15, 92, 65]]), ForwardContext.for_tokens(1, 5, causal=True))
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
    assert float(cos) > 0.99
