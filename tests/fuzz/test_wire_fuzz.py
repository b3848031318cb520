"""Fuzzing the wire decoders (`mesh.wire.decode` / `decode_any`) with every record kind.

What it shows: any byte string, whether shaped like a record of any registered kind,
a valid frame with bytes flipped, cut, spliced or inserted, or a hostile msgpack header,
is either decoded into a valid record (it re-encodes and decodes to an equal record) or
refused with `MalformedMessage` (or its subclass `OversizeMessage`): never another
exception, and never more memory than a small multiple of its own size.

Frames come from three generators: type-shaped values for every field of every record
kind (so `__post_init__` checks meet negative, huge, empty and NaN values), byte
mutations of valid frames, and msgpack headers announcing huge containers.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import MalformedMessage
from mesh.wire import DEFAULT_LIMITS, WIRE_VERSION, Limits, decode, decode_any, encode, kind_of

from .conftest import Tally
from .frames import (
    BUDGETS,
    RECORDS,
    SMALL,
    corpus,
    mutated_frames,
    reason_of,
    shaped_frames,
    valid_records,
)
from .frames import fuzz_settings as _settings

CORPUS = corpus()


def check_decode(tally: Tally, buf: bytes, limits: Limits = SMALL) -> object | None:
    """Decode `buf` as any record kind; assert the outcome is one of the two allowed ones."""
    tally.tried()
    try:
        rec = decode_any(buf, RECORDS, limits=limits)
    except MalformedMessage as exc:  # OversizeMessage included
        tally.refused(reason_of(exc))
        return None
    # a decoded object is a valid record: it re-encodes, and that decodes to an equal one
    assert isinstance(rec, RECORDS)
    again = decode(encode(rec), type(rec), limits=Limits(max_bytes=limits.max_bytes * 2))
    assert again == rec or _has_nan(rec)
    tally.accepted()
    return rec


def _has_nan(rec: object) -> bool:
    return "nan" in repr(rec)


# ---------------------------------------------------------------------------------------
# The properties


def test_corpus_frames_decode(tally: Tally) -> None:
    for buf in CORPUS:
        assert check_decode(tally, buf) is not None


@pytest.mark.parametrize("budget", BUDGETS)
def test_type_shaped_frames_decode_or_are_malformed(tally: Tally, budget: int) -> None:
    @_settings(budget * 2)
    @given(shaped_frames())
    def run(buf: bytes) -> None:
        check_decode(tally, buf)

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_mutated_valid_frames_decode_or_are_malformed(tally: Tally, budget: int) -> None:
    @_settings(budget * 2)
    @given(mutated_frames(CORPUS))
    def run(buf: bytes) -> None:
        check_decode(tally, buf)

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_random_bytes_decode_or_are_malformed(tally: Tally, budget: int) -> None:
    @_settings(budget)
    @given(st.binary(max_size=300))
    def run(buf: bytes) -> None:
        check_decode(tally, buf)

    run()


def _container_header(kind: str, n: int) -> bytes:
    return {"array": b"\xdd", "map": b"\xdf", "bin": b"\xc6", "str": b"\xdb"}[kind] + struct.pack(
        ">I", n
    )


@pytest.mark.parametrize("budget", BUDGETS)
def test_announced_sizes_never_allocate_beyond_the_frame(tally: Tally, budget: int) -> None:
    """Headers announcing up to 4 G items or bytes, nested up to 1100 deep, inside a short
    frame: refused, and the decoder's peak allocation stays within a constant plus a small
    multiple of the frame, under the limits the daemon uses (the bounds hold before
    anything is allocated)."""

    @_settings(budget // 3)
    @given(
        st.lists(
            st.tuples(st.sampled_from(["array", "map", "bin", "str"]), st.integers(0, 2**32 - 1)),
            min_size=1,
            max_size=4,
        ),
        st.integers(1, 1100),
        st.binary(max_size=64),
        st.sampled_from(RECORDS),
    )
    def run(headers: list[tuple[str, int]], repeat: int, tail: bytes, cls: type) -> None:
        body = b"".join(_container_header(k, n) for k, n in headers) * repeat
        buf = b"\x93\x01" + msgpack.packb(kind_of(cls)) + body + tail
        with contextlib.suppress(MalformedMessage):  # warm caches (schemas) outside the trace
            decode_any(buf, RECORDS, limits=DEFAULT_LIMITS)
        tracemalloc.start()
        try:
            check_decode(tally, buf, DEFAULT_LIMITS)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= 64 * len(buf) + 256 * 1024, f"decoding {len(buf)} bytes peaked at {peak}"

    run()


def test_oversize_frame_is_refused_before_parsing(tally: Tally) -> None:
    buf = encode(valid_records()[0]) + b"\x00" * SMALL.max_bytes
    assert check_decode(tally, buf) is None


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_kind_refuses_what_another_kind_accepts(tally: Tally, budget: int) -> None:
    """decode(buf, expect=K) for a frame of another kind: wrong_kind, never a crash."""

    @_settings(budget // 3)
    @given(st.sampled_from(CORPUS), st.sampled_from(RECORDS))
    def run(buf: bytes, cls: type) -> None:
        tally.tried()
        try:
            rec = decode(buf, cls, limits=SMALL)
        except MalformedMessage as exc:
            tally.refused(reason_of(exc))
            return
        assert type(rec) is cls
        tally.accepted()

    run()


def test_nested_headers_are_refused_before_msgpack_allocates(tally: Tally) -> None:
    """Regression: 1000 nested array32 headers (5 KB) made msgpack preallocate 80 MB before
    the depth check; now the depth walk refuses them first."""
    buf = b"\x93\x01\xa1x" + (b"\xdd" + struct.pack(">I", 65536)) * 1000
    tracemalloc.start()
    try:
        assert check_decode(tally, buf, DEFAULT_LIMITS) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"a {len(buf)}-byte frame peaked at {peak} bytes"


def _depth(obj: object) -> int:
    if isinstance(obj, list):
        return 1 + max((_depth(x) for x in obj), default=0)
    if isinstance(obj, dict):
        return 1 + max((_depth(x) for x in obj.values()), default=0)
    return 0


@pytest.mark.parametrize("budget", BUDGETS)
def test_depth_walk_agrees_with_msgpack(tally: Tally, budget: int) -> None:
    """The depth walk refuses exactly the values nested deeper than the limit: it never
    refuses an honest value, whatever its types (str/bin/ext lengths are skipped right)."""
    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=40)
        | st.binary(max_size=300),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=30,
    )

    @_settings(budget)
    @given(st.lists(values, max_size=4), st.integers(1, 6))
    def run(fields: list[object], max_depth: int) -> None:
        raw = [WIRE_VERSION, "api.status", *fields]
        buf = msgpack.packb(raw, use_bin_type=True)
        tally.tried()
        deep = _depth(raw) > max_depth
        try:
            decode_any(buf, RECORDS, limits=Limits(max_depth=max_depth))
        except MalformedMessage as exc:
            refusal = str(exc)
            tally.refused(reason_of(exc))
        else:
            refusal = ""
            tally.accepted()
        assert deep == ("nesting deeper" in refusal), (refusal, _depth(raw))

    run()
