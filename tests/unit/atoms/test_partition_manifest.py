"""Partitioning (pure) and the model manifest / folder round trip."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms.atom import ForwardContext
from atoms.bert import BertConfig, random_bert
from atoms.errors import ModelFormatError, PartitionError, WeightsError
from atoms.minilm import minilm_dir
from atoms.model import Model, load_model, load_span, read_manifest, save_model
from atoms.partition import HostCapacity, ModelManifest, SpanAssignment, atom_costs, split_spans
from atoms.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from pathlib import Path

GiB = 1 << 30
CFG = BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)


def _sizes(spans: tuple[SpanAssignment, ...]) -> dict[str, int]:
    return {s.host: s.end - s.start for s in spans}


def test_split_is_proportional_to_throughput() -> None:
    hosts = [HostCapacity("a", 1.0, GiB), HostCapacity("b", 2.0, GiB), HostCapacity("c", 3.0, GiB)]
    spans = split_spans([1.0] * 12, [10] * 12, hosts)
    assert _sizes(spans) == {"a": 2, "b": 4, "c": 6}
    assert [(s.start, s.end) for s in spans] == [(0, 6), (6, 10), (10, 12)]


def test_split_is_deterministic_whatever_the_input_order() -> None:
    hosts = [HostCapacity(f"h{i}", float(1 + i % 3), GiB) for i in range(6)]
    first = split_spans([1.0] * 20, [1] * 20, hosts, seed=7)
    for shuffle_seed in range(5):
        shuffled = hosts[:]
        random.Random(shuffle_seed).shuffle(shuffled)
        assert split_spans([1.0] * 20, [1] * 20, shuffled, seed=7) == first


def test_memory_caps_a_fast_host_and_infeasible_is_an_error() -> None:
    hosts = [HostCapacity("fast", 10.0, 30), HostCapacity("slow", 1.0, 1000)]
    spans = split_spans([1.0] * 10, [10] * 10, hosts)
    assert _sizes(spans) == {"fast": 3, "slow": 7}
    with pytest.raises(PartitionError, match="do not fit"):
        split_spans([1.0] * 10, [10] * 10, [HostCapacity("x", 1.0, 50), HostCapacity("y", 1.0, 40)])
    with pytest.raises(PartitionError, match="throughput > 0"):
        split_spans([1.0], [1], [HostCapacity("idle", 0.0, GiB)])


def test_more_hosts_than_atoms_leaves_the_slowest_out() -> None:
    hosts = [HostCapacity(f"h{i}", float(i + 1), GiB) for i in range(5)]
    spans = split_spans([1.0, 1.0], [1, 1], hosts)
    assert sorted(_sizes(spans)) == ["h3", "h4"]


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=10),
    thr=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4),
    seed=st.integers(0, 3),
)
def test_split_always_covers_every_atom_once_in_order(
    costs: list[float], thr: list[float], seed: int
) -> None:
    hosts = [HostCapacity(f"h{i}", t, GiB) for i, t in enumerate(thr)]
    if all(t == 0 for t in thr):
        with pytest.raises(PartitionError):
            split_spans(costs, [1] * len(costs), hosts, seed=seed)
        return
    spans = split_spans(costs, [1] * len(costs), hosts, seed=seed)
    assert spans[0].start == 0
    assert spans[-1].end == len(costs)
    assert all(a.end == b.start for a, b in itertools.pairwise(spans))
    assert len({s.host for s in spans}) == len(spans)
    assert spans == split_spans(costs, [1] * len(costs), hosts[::-1], seed=seed)


def _saved(tmp_path: Path) -> tuple[Model, ModelManifest]:
    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=16)
    model = random_bert(CFG, model_id="tiny", seed=0)
    model = Model(
        model_id="tiny", family="bert", config=model.config, atoms=model.atoms, tokenizer=tok
    )
    return model, save_model(model, tmp_path)


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    _, manifest = _saved(tmp_path)
    again = ModelManifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.digest == manifest.digest
    assert read_manifest(tmp_path) == manifest
    assert [e.kind.value for e in manifest.atoms] == [
        "embedding",
        "block",
        "block",
        "block",
        "pooling",
    ]
    assert manifest.atoms[1].spec.attr("eps") == pytest.approx(1e-12)
    costs = atom_costs(manifest)
    assert costs[0] == 16.0
    assert costs[1] == float(manifest.atoms[1].nbytes)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(version=99), "version 99"),
        (lambda o: o.update(extra=1), "unknown \\['extra'\\]"),
        (lambda o: o["atoms"][0].update(nbytes=True), "expected int"),
        (lambda o: o["atoms"][1]["spec"].update(kind="teleport"), "invalid model manifest"),
        (lambda o: o["atoms"][1].update(digest="xyz"), "64 lowercase hex"),
    ],
)
def test_bad_manifests_are_model_format_errors(
    tmp_path: Path, mutate: object, message: str
) -> None:
    _, manifest = _saved(tmp_path)
    obj = json.loads(manifest.to_json())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ModelFormatError, match=message):
        ModelManifest.from_json(json.dumps(obj))


def test_load_span_reads_only_its_atoms_and_equals_the_model(tmp_path: Path) -> None:
    model, manifest = _saved(tmp_path)
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    ctx = ForwardContext.for_tokens(2, 6)
    # Only the span's files are needed: delete every other weight file first.
    keep = {e.digest for e in manifest.entries(1, 3)}
    for path in (tmp_path / "weights").iterdir():
        if path.stem not in keep:
            path.unlink()
    span = load_span(tmp_path, 1, 3)
    assert (span.start, span.end) == (1, 3)
    with torch.no_grad():
        hidden = model.span(0, 1)(ids, ctx)
        assert torch.equal(span(hidden, ctx), model.span(1, 3)(hidden, ctx))


def test_load_model_round_trip_includes_the_tokenizer(tmp_path: Path) -> None:
    model, _ = _saved(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.specs == model.specs
    assert loaded.config == model.config
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.max_length == 16
    assert loaded.tokenizer.encode("hello world") == [101, 7592, 2088, 102]
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"tokenizer\.json is corrupt"):
        load_model(tmp_path)


def test_corrupt_or_missing_weight_file_names_the_file(tmp_path: Path) -> None:
    _, manifest = _saved(tmp_path)
    path = tmp_path / "weights" / f"{manifest.atoms[2].digest}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=re.escape(str(path)) + ".*corrupt"):
        load_span(tmp_path, 1, 4)
    load_span(tmp_path, 3, 5)  # other spans are unaffected
    path.unlink()
    with pytest.raises(WeightsError, match=re.escape(str(path)) + " is missing"):
        load_span(tmp_path, 2, 3)


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    _, manifest = _saved(tmp_path)
    obj = json.loads(manifest.to_json())
    obj["atoms"][1]["digest"] = obj["atoms"][2]["digest"]  # same names and shapes: accepted
    ModelManifest.from_json(json.dumps(obj))
    wrong = dataclasses.replace(manifest.atoms[1], digest=manifest.atoms[0].digest)
    bad = dataclasses.replace(manifest, atoms=(manifest.atoms[0], wrong, *manifest.atoms[2:]))
    (tmp_path / "manifest.json").write_text(bad.to_json())
    with pytest.raises(ModelFormatError, match="tiny/001-block expects tensors"):
        load_span(tmp_path, 1, 2)


def test_registry_keeps_the_parsed_tokenizer_while_the_file_is_as_verified(
    tmp_path: Path,
) -> None:
    _saved(tmp_path / "tiny")  # a tiny BERT with the MiniLM tokenizer, id "tiny"
    from nexusd.model_registry import ModelRegistry

    registry = ModelRegistry(tmp_path)
    first = registry.tokenizer("tiny")
    assert registry.tokenizer("tiny") is first  # parsed once
    path = tmp_path / "tiny" / "tokenizer.json"
    path.write_text(path.read_text().replace('"[UNK]"', '"[UNX]"', 1))  # changed on disk
    with pytest.raises(WeightsError, match="is corrupt"):
        registry.tokenizer("tiny")
    path.unlink()
    with pytest.raises(WeightsError, match="is missing"):
        registry.tokenizer("tiny")
