"""Wire records and framing: round trips, every rejection, bounded decoding."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import MalformedMessage, OversizeMessage
from mesh.framing import FrameDecoder, frame
from mesh.wire import (
    DTYPE_ITEMSIZE,
    WIRE_VERSION,
    Limits,
    TensorBlob,
    decode,
    decode_any,
    encode,
    record,
)

# Hypothesis: few examples and no per-example deadline (2 shared cores, keep fast, not flaky)
FAST = settings(max_examples=40, deadline=None)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@record("t-inner")
@dataclass(frozen=True, slots=True)
class Inner:
    name: str
    weight: float


@record("t-all")
@dataclass(frozen=True, slots=True)
class AllTypes:
    flag: bool
    count: int
    ratio: float
    label: str
    blob: bytes
    nothing: None
    maybe: int | None
    many: tuple[int, ...]
    pair: tuple[str, bytes]
    color: Color
    level: Level
    inner: Inner
    inners: tuple[Inner, ...]
    table: dict[str, int]
    nested_maybe: Inner | None


@record("t-chain")
@dataclass(frozen=True, slots=True)
class Chain:
    value: int
    next: Chain | None


@record("t-pos")
@dataclass(frozen=True, slots=True)
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"n: expected > 0, got {self.n}")


ints64 = st.integers(-(2**63), 2**64 - 1)
floats = st.floats(allow_nan=False)
inners = st.builds(Inner, name=st.text(max_size=8), weight=floats)
all_types = st.builds(
    AllTypes,
    flag=st.booleans(),
    count=ints64,
    ratio=floats,
    label=st.text(max_size=20),
    blob=st.binary(max_size=20),
    nothing=st.none(),
    maybe=st.none() | ints64,
    many=st.lists(ints64, max_size=5).map(tuple),
    pair=st.tuples(st.text(max_size=5), st.binary(max_size=5)),
    color=st.sampled_from(Color),
    level=st.sampled_from(Level),
    inner=inners,
    inners=st.lists(inners, max_size=3).map(tuple),
    table=st.dictionaries(st.text(max_size=5), ints64, max_size=4),
    nested_maybe=st.none() | inners,
)


@st.composite
def tensors(draw: st.DrawFn) -> TensorBlob:
    dtype = draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    n = 1
    for d in shape:
        n *= d
    data = draw(st.binary(min_size=n * DTYPE_ITEMSIZE[dtype], max_size=n * DTYPE_ITEMSIZE[dtype]))
    return TensorBlob(dtype, shape, "raw", data)


def chain(n: int) -> Chain:
    node = None
    for i in range(n):
        node = Chain(i, node)
    assert node is not None
    return node


def sample() -> AllTypes:
    inner = Inner("a", 1.5)
    return AllTypes(
        True,
        7,
        0.5,
        "x",
        b"\x00",
        None,
        None,
        (1, 2),
        ("s", b"b"),
        Color.RED,
        Level.HIGH,
        inner,
        (inner,),
        {"k": 1},
        None,
    )


def raw_fields(rec: object) -> list[object]:
    return msgpack.unpackb(encode(rec))  # type: ignore[no-any-return]


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# --- round trips -----------------------------------------------------------------------


@settings(FAST, max_examples=20)  # a large composite strategy: fewer, still broad
@given(all_types)
def test_all_field_types_round_trip(rec: AllTypes) -> None:
    assert decode(encode(rec), AllTypes) == rec


@FAST
@given(tensors())
def test_tensor_blob_round_trip(t: TensorBlob) -> None:
    assert decode(encode(t), TensorBlob) == t


@FAST
@given(st.integers(0, 7))
def test_recursive_record_round_trip(n: int) -> None:
    rec = chain(n + 1)
    assert decode(encode(rec), Chain) == rec


def test_layout_is_version_kind_fields() -> None:
    assert raw_fields(Inner("a", 2.0)) == [WIRE_VERSION, "t-inner", "a", 2.0]
    assert raw_fields(Chain(1, Chain(2, None))) == [
        WIRE_VERSION,
        "t-chain",
        1,
        ["t-chain", 2, None],
    ]


def test_float_field_accepts_int_on_the_wire() -> None:
    rec = decode(pack([WIRE_VERSION, "t-inner", "a", 3]), Inner)
    assert rec.weight == 3.0
    assert type(rec.weight) is float


def test_equal_dicts_encode_identically() -> None:
    a = replace(sample(), table={"b": 1, "a": 2})
    b = replace(sample(), table={"a": 2, "b": 1})
    assert encode(a) == encode(b)


def test_decode_any_dispatches_on_kind() -> None:
    assert decode_any(encode(Positive(3)), (Inner, Positive)) == Positive(3)


# --- rejections ------------------------------------------------------------------------


def test_truncated_message() -> None:
    buf = encode(sample())
    for cut in (0, 1, len(buf) // 2, len(buf) - 1):
        with pytest.raises(MalformedMessage, match="truncated message"):
            decode(buf[:cut], AllTypes)


def test_trailing_bytes() -> None:
    with pytest.raises(MalformedMessage, match=r"trailing bytes after message \(2 extra\)"):
        decode(encode(Positive(1)) + b"\x01\x02", Positive)


def test_wrong_version() -> None:
    with pytest.raises(MalformedMessage, match="unsupported wire version 2, expected 1"):
        decode(pack([2, "t-pos", 1]), Positive)


def test_unknown_kind() -> None:
    with pytest.raises(MalformedMessage, match="unknown record kind 'nope'"):
        decode(pack([WIRE_VERSION, "nope", 1]), Positive)


def test_wrong_kind_for_expect() -> None:
    with pytest.raises(MalformedMessage, match="wrong record kind 't-inner', expected 't-pos'"):
        decode(encode(Inner("a", 1.0)), Positive)


def test_wrong_field_count() -> None:
    with pytest.raises(MalformedMessage, match="record 't-pos': expected 1 fields, got 2"):
        decode(pack([WIRE_VERSION, "t-pos", 1, 2]), Positive)


def test_not_an_array() -> None:
    with pytest.raises(MalformedMessage, match="expected an array"):
        decode(pack({"a": 1}), Positive)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("flag", 1, "field 'flag': expected bool, got int"),
        ("count", True, "field 'count': expected int, got bool"),
        ("ratio", "1", "field 'ratio': expected float, got str"),
        ("label", b"x", "field 'label': expected str, got bytes"),
        ("blob", "x", "field 'blob': expected bytes, got str"),
        ("nothing", 0, "field 'nothing': expected None, got int"),
        ("maybe", 1.5, r"field 'maybe': expected int \| None, got float"),
        ("many", [1, "2"], r"field 'many\[1\]': expected int, got str"),
        ("many", [1, True], r"field 'many\[1\]': expected int, got bool"),
        ("label", None, "field 'label': expected str, got None"),
        ("pair", ["s"], r"field 'pair': expected tuple\[str, bytes\] of 2 items, got 1"),
        ("color", "green", "field 'color': expected a Color value, got 'green'"),
        ("level", True, "field 'level': expected Level, got bool"),
        ("inner", ["t-pos", 1], "field 'inner': expected record 't-inner', got 't-pos'"),
        ("table", {"k": "v"}, r"field \"table\['k'\]\": expected int, got str"),
        ("table", [], r"field 'table': expected dict\[str, int\], got array"),
    ],
)
def test_wrong_field_type_names_kind_field_and_types(
    field: str, value: object, message: str
) -> None:
    good = raw_fields(sample())
    index = 2 + list(AllTypes.__dataclass_fields__).index(field)
    good[index] = value
    with pytest.raises(MalformedMessage, match=f"record 't-all' {message}"):
        decode(pack(good), AllTypes)


def test_nested_record_error_names_the_inner_kind() -> None:
    good = raw_fields(sample())
    good[2 + 11] = ["t-inner", 5, 1.0]
    with pytest.raises(
        MalformedMessage, match="record 't-inner' field 'name': expected str, got int"
    ):
        decode(pack(good), AllTypes)


def test_post_init_rejection_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match=r"record 't-pos': invalid: n: expected > 0, got 0"):
        decode(pack([WIRE_VERSION, "t-pos", 0]), Positive)


def test_excessive_nesting() -> None:
    buf = encode(chain(10))
    assert decode(buf, Chain, limits=Limits(max_depth=10)) == chain(10)
    with pytest.raises(MalformedMessage, match="nesting deeper than 8"):
        decode(buf, Chain)


def test_nesting_beyond_msgpack_stack_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="nesting deeper than 8"):
        decode(b"\x91" * 5000 + b"\x00", Chain)


def test_oversize_message_checked_before_parsing() -> None:
    buf = encode(Inner("x" * 100, 1.0))
    with pytest.raises(
        OversizeMessage, match=rf"message of {len(buf)} bytes, over the limit of 50"
    ):
        decode(buf, Inner, limits=Limits(max_bytes=50))


def test_too_many_items() -> None:
    rec = replace(sample(), many=tuple(range(20)))
    with pytest.raises(MalformedMessage, match=r"20 exceeds max_array_len\(17\)"):
        decode(encode(rec), AllTypes, limits=Limits(max_items=17))


def test_ext_type_rejected() -> None:
    buf = pack([WIRE_VERSION, "t-inner", msgpack.ExtType(5, b"x"), 1.0])
    with pytest.raises(MalformedMessage, match="ExtType 5 is not allowed"):
        decode(buf, Inner)


def test_invalid_utf8_and_reserved_byte() -> None:
    with pytest.raises(MalformedMessage, match="not valid UTF-8"):
        decode(b"\x93\x01\xa5t-pos\xa1\xff", Positive)
    with pytest.raises(MalformedMessage, match="reserved type byte"):
        decode(b"\xc1", Positive)


def test_duplicate_map_keys() -> None:
    fields = raw_fields(sample())  # the map field is replaced by hand: {"k": 1, "k": 2}
    fields[-2] = "__MAP__"
    packed = pack(fields).replace(pack("__MAP__"), b"\x82\xa1k\x01\xa1k\x02")
    with pytest.raises(MalformedMessage, match="duplicate keys"):
        decode(packed, AllTypes)


def test_encode_rejects_wrong_python_types() -> None:
    with pytest.raises(TypeError, match="field 'name': expected str, got int"):
        encode(Inner(3, 1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a @record class"):
        encode(object())


def test_record_needs_frozen_dataclass() -> None:
    with pytest.raises(TypeError, match="must be a frozen dataclass"):

        @record("t-bad")
        @dataclass
        class Bad:
            x: int


# --- TensorBlob ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("complex64", (1,), "raw", b"\0" * 8), "tensor dtype: expected one of"),
        (("float32", (2, -1), "raw", b""), "expected non-negative dims"),
        (("uint8", (1,) * 9, "raw", b"\0"), "expected at most 8 dims, got 9"),
        (("float32", (2,), "Raw!", b"\0" * 8), "tensor codec: expected a short identifier"),
        (("float32", (2, 3), "raw", b"\0" * 23), r"expected 24 bytes for float32\[2, 3\], got 23"),
    ],
)
def test_tensor_blob_validation(
    args: tuple[str, tuple[int, ...], str, bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TensorBlob(*args)


def test_tensor_blob_other_codec_length_unchecked_and_rejected_from_wire() -> None:
    assert TensorBlob("float32", (1000,), "int8-absmax", b"\0" * 10).raw_nbytes == 4000
    bad = pack([WIRE_VERSION, "tensor", "float32", [2], "raw", b"\0" * 7])
    with pytest.raises(MalformedMessage, match="record 'tensor': invalid: tensor data: expected 8"):
        decode(bad, TensorBlob)


# --- framing ---------------------------------------------------------------------------


@FAST
@given(st.lists(st.binary(max_size=40), max_size=6), st.data())
def test_framing_split_at_any_boundaries(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p, max_frame_bytes=64) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder(64)
    out: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[a:b])
    assert out == payloads
    assert decoder.pending_bytes == 0


def test_framing_every_single_byte_boundary() -> None:
    payloads = [b"", b"abc", bytes(range(50))]
    stream = b"".join(frame(p, max_frame_bytes=64) for p in payloads)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(64)
        first = decoder.feed(stream[:cut])
        assert decoder.pending_bytes == cut - sum(4 + len(p) for p in first)
        assert first + decoder.feed(stream[cut:]) == payloads


def test_oversize_frame_rejected_on_header_alone() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(struct.pack(">I", 101)[:3]) == []
    with pytest.raises(
        OversizeMessage, match="frame of 101 bytes announced, over the limit of 100"
    ):
        decoder.feed(struct.pack(">I", 101)[3:])
    assert decoder.pending_bytes == 0
    with pytest.raises(OversizeMessage, match="frame of 101 bytes announced"):
        decoder.feed(b"more")


def test_frame_refuses_oversize_payload() -> None:
    with pytest.raises(OversizeMessage, match="frame of 11 bytes, over the limit of 10"):
        frame(b"x" * 11, max_frame_bytes=10)


def test_per_call_limit_refuses_on_the_length_prefix_before_the_body() -> None:
    """`next_frame(max_bytes)` bounds one frame below the stream's limit: a 64 MiB announcement
    read with a 16 KiB limit fails on its 4 header bytes, and the reader is told to read no
    more than the header (`wanted_bytes`) before it knows."""
    decoder = FrameDecoder(64 * 1024 * 1024)
    assert decoder.wanted_bytes(16 * 1024) == 4
    decoder.push(struct.pack(">I", 64 * 1024 * 1024))
    with pytest.raises(OversizeMessage, match="67108864 bytes announced, over the limit of 16384"):
        decoder.wanted_bytes(16 * 1024)
    assert decoder.pending_bytes == 0
    with pytest.raises(OversizeMessage):  # broken for good: the stream must be closed
        decoder.next_frame()


def test_per_call_limit_lets_frames_within_it_through_and_never_exceeds_the_stream_limit() -> None:
    decoder = FrameDecoder(100)
    decoder.push(frame(b"a" * 10, max_frame_bytes=100) + frame(b"b" * 50, max_frame_bytes=100))
    assert decoder.next_frame(10) == b"a" * 10
    assert decoder.limit(1000) == 100 and decoder.limit(None) == 100
    assert decoder.wanted_bytes(100) == 0  # the next frame is complete
    with pytest.raises(OversizeMessage, match="50 bytes announced, over the limit of 49"):
        decoder.next_frame(49)
