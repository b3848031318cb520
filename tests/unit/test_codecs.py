"""Tensor wire codecs: exact round trips, bounded error for lossy ones, strict validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms.codecs import CodecError, Encoded, all_finite, decode, encode, measure, wire_bytes
from atoms.errors import NonFiniteInput


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_raw_round_trip_is_exact(dtype: torch.dtype) -> None:
    t = (torch.arange(24).reshape(2, 3, 4) % 3).to(dtype)
    back = decode(encode(t))
    assert back.dtype == dtype and torch.equal(back, t)


@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    codec=st.sampled_from(["raw", "fp16", "bf16", "int8"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_every_codec_round_trips_shape_and_bounded_error(
    shape: list[int], codec: str, seed: int
) -> None:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    enc = encode(t, codec)
    assert len(enc.data) == wire_bytes(t.numel(), t.dtype, codec)
    back = decode(enc)
    assert back.shape == t.shape and back.dtype == t.dtype
    if t.numel():
        bound = {"raw": 0.0, "fp16": 1e-3, "bf16": 1e-2, "int8": 2e-2}[codec]
        assert float((back - t).norm()) <= bound * float(t.norm()) + 1e-6


def test_measure_reports_size_and_error() -> None:
    t = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    raw_bytes, raw_err = measure(t, "raw")
    int8_bytes, int8_err = measure(t, "int8")
    assert raw_err == 0.0 and raw_bytes == 64 * 384 * 4
    assert int8_bytes < raw_bytes / 3.5 and 0 < int8_err < 0.02


def test_wrong_length_unknown_codec_and_dtype_are_named() -> None:
    enc = encode(torch.ones(2, 3))
    with pytest.raises(CodecError, match=r"expected 24 bytes, got 20"):
        decode(Encoded(enc.dtype, enc.shape, "raw", enc.data[:20]))
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        decode(Encoded(enc.dtype, enc.shape, "zip", enc.data))
    with pytest.raises(CodecError, match="unknown dtype 'complex64'"):
        decode(Encoded("complex64", enc.shape, "raw", enc.data))
    with pytest.raises(CodecError, match="int8 tensor"):
        decode(Encoded("float32", (2, 3), "int8", b"\x00" * 3))
    with pytest.raises(CodecError, match="needs a float tensor"):
        encode(torch.ones(2, dtype=torch.int64), "fp16")


def test_nan_and_inf_are_rejected_on_decode() -> None:
    for bad in (float("nan"), float("inf")):
        t = torch.ones(4)
        t[2] = bad
        with pytest.raises(NonFiniteInput, match="NaN or Inf"):
            decode(encode(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_nan_or_inf_as_isfinite_does(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(3, 7, 11).to(dtype)
    assert all_finite(x) and bool(torch.isfinite(x).all())
    for index in ((0, 0, 0), (1, 3, 5), (2, 6, 10)):
        y = x.clone()
        y[index] = bad
        assert not all_finite(y) and not bool(torch.isfinite(y).all())


def test_all_finite_on_empty_and_integer_tensors() -> None:
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.tensor([1, 2, -(2**40)]))
    assert all_finite(torch.tensor(3.0)) and not all_finite(torch.tensor(float("nan")))
