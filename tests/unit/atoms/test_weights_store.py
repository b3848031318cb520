"""The content-addressed weight store: canonical bytes, verified loads, precise errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from atoms.errors import WeightsError
from atoms.weights import WeightStore, canonical_bytes, digest_hex


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g)}


def test_canonical_bytes_ignore_insertion_order_and_name_the_file(tmp_path: Path) -> None:
    state = _state()
    reordered = dict(reversed(list(state.items())))
    assert canonical_bytes(state) == canonical_bytes(reordered)
    ref = WeightStore(tmp_path).put(state)
    path = WeightStore(tmp_path).path(ref.digest)
    assert path.name == f"{ref.digest}.safetensors"
    assert digest_hex(path.read_bytes()) == ref.digest
    assert path.stat().st_size == ref.nbytes


def test_put_is_idempotent_and_get_round_trips(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    first, again = store.put(_state()), store.put(_state())
    assert first == again
    assert store.has(first.digest)
    loaded = store.get(first.digest)
    assert loaded.keys() == _state().keys()
    for name, t in _state().items():
        assert torch.equal(loaded[name], t)
    assert [p.name for p in tmp_path.iterdir()] == [f"{first.digest}.safetensors"]


def test_shared_storage_tensors_are_stored_separately(tmp_path: Path) -> None:
    w = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    store = WeightStore(tmp_path)
    loaded = store.get(store.put({"emb.weight": w, "head.weight": w}).digest)
    assert torch.equal(loaded["emb.weight"], loaded["head.weight"])


def test_flipped_byte_is_a_weights_error_naming_the_file(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    ref = store.put(_state())
    path = store.path(ref.digest)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=re.escape(str(path)) + ".*corrupt"):
        store.get(ref.digest)


def test_missing_file_is_a_weights_error_naming_the_file(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    digest = digest_hex(b"never stored")
    with pytest.raises(WeightsError, match=re.escape(str(store.path(digest))) + " is missing"):
        store.get(digest)


def test_hash_matching_garbage_is_not_safetensors(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    junk = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    tmp_path.mkdir(exist_ok=True)
    store.path(digest_hex(junk)).write_bytes(junk)
    with pytest.raises(WeightsError, match="not valid safetensors"):
        store.get(digest_hex(junk))


def test_malformed_digest_is_refused() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        WeightStore(Path("/nonexistent")).path("../../etc/passwd")


def test_put_bytes_verifies_what_a_peer_sent(tmp_path: Path) -> None:
    source = WeightStore(tmp_path / "a")
    ref = source.put(_state())
    raw = source.read_bytes(ref.digest)
    sink = WeightStore(tmp_path / "b")
    assert sink.put_bytes(raw, expect=ref.digest) == ref
    assert torch.equal(sink.get(ref.digest)["a.bias"], _state()["a.bias"])
    damaged = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(WeightsError, match=f"{ref.digest}.safetensors received corrupt"):
        sink.put_bytes(damaged, expect=ref.digest)
    with pytest.raises(WeightsError, match="not valid safetensors"):
        sink.put_bytes(b"\x00" * 16)


def test_put_repairs_a_damaged_copy(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    ref = store.put(_state())
    path = store.path(ref.digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert store.put(_state()) == ref
    store.get(ref.digest)  # verified again
