"""Importing a local Hugging Face Llama checkpoint makes it a hostable, routable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from atoms.atom import ForwardContext
from mesh.routing import HostSpan, Link
from nexusd.api.records import GenerateRequest
from nexusd.cli.app import main
from nexusd.exec.hosting import SpanHost
from nexusd.exec.planner import ExecStream
from nexusd.jobs.engine import JobEngine
from nexusd.metrics import Metrics
from nexusd.model_registry import ModelRegistry


@pytest.fixture
def llama_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
    )
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
    assert (
        main(["import-model", str(folder), "--id", "tiny", "--data-dir", str(data), "--json"]) == 0
    )
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


def test_spans_load_in_bfloat16_on_request(
    tmp_path: Path, llama_folder: tuple[Path, torch.Tensor]
) -> None:
    folder, want = llama_folder
    assert (
        main(["import-model", str(folder), "--id", "tiny", "--data-dir", str(tmp_path / "n")]) == 0
    )
    registry = ModelRegistry(tmp_path / "n" / "models")
    span = registry.load_span("tiny", 0, 4, "bfloat16")
    assert {a.spec.dtype for a in span.atom_list()} == {"bfloat16"}
    with torch.inference_mode():
        got = span(
            torch.tensor([[3, 14, 15, 92, 65]]), ForwardContext.for_tokens(1, 5, causal=True)
        )
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
    assert float(cos) > 0.99


def word_tokenizer(vocab_size: int) -> str:
    """tokenizer.json text for words "t0".."t<vocab_size-1>", split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return str(tok.to_str())


class LocalView:
    """A mesh of one: every span of the model is hosted here (the engine runs it locally)."""

    node_id = b"\x01" * 32

    def __init__(self, host: SpanHost) -> None:
        self._host = host

    def host_spans(self, model_id: str) -> list[HostSpan]:
        return [
            HostSpan(self.node_id, h.model_id, h.start, h.end, 0.002, 0, 0.0, 1 << 30)
            for h in self._host.hosted()
            if h.model_id == model_id
        ]

    def links(self) -> list[Link]:
        return []

    def name_of(self, node_id: bytes) -> str:
        return "self"

    def is_member(self, node_id: bytes) -> bool:
        return node_id == self.node_id

    async def open_exec_stream(self, node_id: bytes) -> ExecStream:
        raise AssertionError("a local route opens no stream")

    def report(self, node_id: bytes, penalty: str) -> None:
        raise AssertionError("nothing fails here")


async def test_generation_stops_at_the_eos_an_imported_llama_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny Llama whose generation_config.json names as end of sequence the 4th token it
    would generate greedily (config.json names another, as real checkpoints may): the
    daemon's engine stops right there, token for token as `transformers`' `generate`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        eos_token_id=100,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        free = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    eos = free[3]
    assert eos not in free[:3] and 100 not in free, "pick a seed whose run shows the stop"
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert want == free[:4]  # transformers stops at the eos, and keeps it
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(word_tokenizer(101))
    data = tmp_path / "node"
    assert main(["import-model", str(folder), "--id", "tiny", "--data-dir", str(data)]) == 0
    registry = ModelRegistry(data / "models")
    assert registry.eos_token_ids("tiny") == (eos,)
    host = SpanHost(
        [registry.load_span("tiny", 0, 4)],
        kv_budget_bytes=1 << 24,
        max_sessions=2,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
    )
    unused: Any = None
    engine = JobEngine(
        view=LocalView(host),
        host=host,
        registry=registry,
        signer=unused,
        verifier=unused,
        metrics=Metrics(),
        step_timeout_s=30,
    )
    events: list[object] = []

    async def emit(event: object) -> None:
        events.append(event)

    reply = await engine.generate(
        GenerateRequest(prompt="t3 t14 t15 t92 t65", model="tiny", max_new_tokens=12), "job", emit
    )
    assert list(reply.token_ids) == want and reply.stop_reason == "stop_token"
