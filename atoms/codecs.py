"""Tensor codecs: how a tensor becomes bytes for the wire, and back.

Rule 1: a tensor travels as (dtype, shape, codec, bytes); `dtype` is the logical dtype the
receiver rebuilds, `codec` says how the bytes encode it. Nothing is pickled, nothing goes
through `torch.load`.
Rule 2: decoding validates before use: the codec is known, the byte length matches the
shape exactly, and float results are finite; every failure is a `CodecError` naming what
was expected and what was received.
Rule 3: lossy codecs report their error: `measure(t, codec)` returns the bytes and the
relative error, so a codec is chosen on numbers (adaptive wire compression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import AtomError, NonFiniteInput


class CodecError(AtomError):
    """Bytes that do not decode to the announced tensor."""


WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
INT8_BLOCK = 64

# codec -> (bytes per element of the payload, lossy?)
CODECS: dict[str, tuple[float, bool]] = {
    "raw": (0.0, False),  # the logical dtype's own bytes
    "fp16": (2.0, True),
    "bf16": (2.0, True),
    "int8": (1.0 + 4.0 / INT8_BLOCK, True),  # blockwise absmax: int8 values + fp32 scale / 64
}


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tensor ready for the wire."""

    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(
            f"tensor dtype {dtype} cannot travel; expected one of {sorted(WIRE_DTYPES)}"
        ) from None


def encode(t: torch.Tensor, codec: str = "raw") -> Encoded:
    """Encode `t` with `codec` ("raw" for any dtype; "fp16"/"bf16"/"int8" for floats)."""
    name = dtype_name(t.dtype)
    shape = tuple(int(d) for d in t.shape)
    flat = t.detach().contiguous().reshape(-1)
    if codec == "raw":
        return Encoded(name, shape, codec, _bytes(flat))
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    if not t.is_floating_point():
        raise CodecError(f"codec {codec} needs a float tensor, got {t.dtype}")
    if codec == "fp16":
        return Encoded(name, shape, codec, _bytes(flat.to(torch.float16)))
    if codec == "bf16":
        return Encoded(name, shape, codec, _bytes(flat.to(torch.bfloat16)))
    values, scales = _int8_blocks(flat.to(torch.float32))
    return Encoded(name, shape, codec, _bytes(scales) + _bytes(values))


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (integer tensors always do).

    One pass for its min and max (NaN propagates into both, an Inf shows in one), where
    `torch.isfinite(t).all()` builds a bool tensor first: 5 vs 77 us on 30,522 logits,
    2 vs 24 ms on a 4 x 64 x 30,522 batch (one thread, this project's 2-core machine).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def decode(enc: Encoded) -> torch.Tensor:
    """Rebuild the tensor; validates codec, length and finiteness.

    Raises:
        CodecError: unknown dtype/codec, or a byte length that does not fit the shape.
        NonFiniteInput: a float tensor holding NaN or Inf.
    """
    if enc.dtype not in WIRE_DTYPES:
        raise CodecError(f"unknown dtype {enc.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    if any(d < 0 for d in enc.shape):
        raise CodecError(f"negative dimension in shape {enc.shape}")
    dtype = WIRE_DTYPES[enc.dtype]
    n = math.prod(enc.shape)
    if enc.codec == "raw":
        out = _from_bytes(enc.data, dtype, n, enc)
    elif enc.codec in ("fp16", "bf16"):
        wire = torch.float16 if enc.codec == "fp16" else torch.bfloat16
        out = _from_bytes(enc.data, wire, n, enc).to(dtype)
    elif enc.codec == "int8":
        blocks = -(-n // INT8_BLOCK)
        expected = blocks * 4 + n
        if len(enc.data) != expected:
            raise CodecError(
                f"int8 tensor {enc.shape}: expected {expected} bytes, got {len(enc.data)}"
            )
        scales = _from_bytes(enc.data[: blocks * 4], torch.float32, blocks, enc)
        values = _from_bytes(enc.data[blocks * 4 :], torch.int8, n, enc)
        padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
        padded[:n] = values.to(torch.float32)
        out = (padded.view(blocks, INT8_BLOCK) * scales.unsqueeze(1)).reshape(-1)[:n].to(dtype)
    else:
        raise CodecError(f"unknown codec {enc.codec!r}; expected one of {sorted(CODECS)}")
    out = out.reshape(enc.shape)
    if not all_finite(out):
        raise NonFiniteInput(f"tensor {enc.shape} ({enc.codec}) holds NaN or Inf")
    return out


def measure(t: torch.Tensor, codec: str) -> tuple[int, float]:
    """(bytes on the wire, relative L2 error) of sending `t` with `codec`."""
    enc = encode(t, codec)
    back = decode(enc).to(torch.float32)
    ref = t.detach().to(torch.float32)
    denom = float(ref.norm()) or 1.0
    return len(enc.data), float((back - ref).norm()) / denom


def wire_bytes(numel: int, dtype: torch.dtype, codec: str) -> int:
    """Payload size of `numel` elements of `dtype` under `codec` (for route costs)."""
    if codec == "raw":
        return numel * torch.empty((), dtype=dtype).element_size()
    if codec == "int8":
        return -(-numel // INT8_BLOCK) * 4 + numel
    per, _lossy = CODECS[codec]
    return math.ceil(numel * per)


def _int8_blocks(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    blocks = -(-n // INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[:n] = flat
    view = padded.view(blocks, INT8_BLOCK)
    scales = view.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(view / safe.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return values.reshape(-1)[:n], scales


def _bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its 16-bit pattern
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, n: int, enc: Encoded) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != n * itemsize:
        raise CodecError(
            f"{enc.codec} tensor {enc.dtype}{list(enc.shape)}: expected {n * itemsize} bytes, "
            f"got {len(data)}"
        )
    if n == 0:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16)
    return torch.frombuffer(bytearray(data), dtype=dtype)


__all__ = ["CODECS", "CodecError", "Encoded", "NonFiniteInput", "decode", "encode", "measure"]
