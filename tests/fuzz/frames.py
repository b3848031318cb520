"""Frame generators shared by the fuzz modules: every wire record kind, type-shaped raw
values for its fields, a corpus of valid records, byte mutations, and the refusal reason
of a `MalformedMessage` reduced to a stable category."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mesh.errors import MalformedMessage
from mesh.wire import WIRE_VERSION, Limits, decode, encode, kind_of

# Every module that defines wire records (records register at import time).
RECORD_MODULES = (
    "mesh.hlc",
    "mesh.identity.envelope",
    "mesh.membership",
    "mesh.scoring",
    "mesh.state",
    "mesh.state_records",
    "mesh.sync",
    "mesh.transport.direct",
    "mesh.wire",
    "nexusd.api.records",
    "nexusd.exec.wire",
    "nexusd.exec.train_wire",
)


def _record_classes() -> tuple[type, ...]:
    found: dict[str, type] = {}
    for name in RECORD_MODULES:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, type) and getattr(obj, "__wire_kind__", None):
                found[kind_of(obj)] = obj
    return tuple(found[k] for k in sorted(found))


RECORDS = _record_classes()
CI = 300  # examples per generator in the default run
LONG = 6000  # with -m slow
BUDGETS = [pytest.param(CI, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
SMALL = Limits(max_bytes=64 * 1024, max_depth=8, max_items=1024)


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# ---------------------------------------------------------------------------------------
# Refusal reasons: the decoder's message, reduced to a stable category

_REASONS = (
    ("oversize", r"over the limit"),
    ("truncated", r"^truncated"),
    ("trailing_bytes", r"^trailing bytes"),
    ("bad_utf8", r"UTF-8"),
    ("nesting", r"nesting deeper"),
    ("ext_type", r"ExtType"),
    ("duplicate_keys", r"duplicate keys"),
    ("not_a_record", r"^expected an array"),
    ("wire_version", r"wire version"),
    ("unknown_kind", r"unknown record kind|record kind: expected"),
    ("wrong_kind", r"wrong record kind|expected record '"),
    ("field_count", r"expected \d+ fields|items, got"),
    ("field_type", r"field .*: expected"),
    ("invalid_value", r": invalid: "),
    ("invalid_msgpack", r"invalid msgpack|reserved type"),
)


def reason_of(exc: MalformedMessage) -> str:
    text = str(exc)
    for reason, pattern in _REASONS:
        if re.search(pattern, text):
            return reason
    return f"other:{type(exc).__name__}"


# ---------------------------------------------------------------------------------------
# Type-shaped raw values: msgpack objects that follow a record's annotations, with edge
# values, and now and then a value of the wrong type

_ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_INTS = (
    st.integers(-4, 70)
    | st.sampled_from([-(2**63), -(2**31), 2**31, 2**47, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1])
    | st.integers(-(2**63), 2**64 - 1)
)
_BYTE_LENS = st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65])


def _raw_for(tp: Any, depth: int) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        shaped: st.SearchStrategy[Any] = st.booleans()
    elif tp is int:
        shaped = _INTS
    elif tp is float:
        shaped = st.floats() | _INTS
    elif tp is str:
        shaped = st.text(max_size=12) | st.sampled_from(["raw", "float32", "minilm", "a" * 300])
    elif tp is bytes:
        shaped = _BYTE_LENS.flatmap(lambda n: st.binary(min_size=n, max_size=n)) | st.binary(
            max_size=80
        )
    elif tp is None or tp is type(None):
        shaped = st.none()
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        shaped = st.sampled_from([m.value for m in tp]) | st.integers(-2, 9) | st.text(max_size=6)
    elif isinstance(tp, type) and getattr(tp, "__wire_kind__", None):
        shaped = _fields_of(tp, depth + 1).map(_prefixed(kind_of(tp)))
    elif origin in (typing.Union, types.UnionType):
        shaped = st.one_of([_raw_for(a, depth) for a in args])
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        shaped = st.lists(_raw_for(args[0], depth + 1), max_size=3 if depth < 3 else 0)
    elif origin is tuple:
        items = [] if args == ((),) else [_raw_for(a, depth + 1) for a in args]
        shaped = st.tuples(*items).map(list)
    elif origin is dict:
        shaped = st.dictionaries(
            st.text(max_size=6), _raw_for(args[1], depth + 1), max_size=3 if depth < 3 else 0
        )
    else:
        raise TypeError(f"no strategy for {tp!r}")
    return st.one_of(shaped, _ANY) if depth > 0 else shaped


def _prefixed(kind: str) -> Callable[[list[Any]], list[Any]]:
    return lambda fields: [kind, *fields]


def _fields_of(cls: type, depth: int) -> st.SearchStrategy[list[Any]]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return st.tuples(*(_raw_for(hints[n], depth) for n in names)).map(list)


@st.composite
def shaped_frames(draw: st.DrawFn, classes: tuple[type, ...] = RECORDS) -> bytes:
    cls = draw(st.sampled_from(classes))
    fields = draw(_fields_of(cls, 0))
    shape = draw(st.sampled_from(["exact", "exact", "exact", "missing", "extra", "version"]))
    if shape == "missing" and fields:
        fields = fields[:-1]
    elif shape == "extra":
        fields = [*fields, draw(_ANY)]
    version = draw(st.sampled_from([0, 2, -1, "1", None])) if shape == "version" else WIRE_VERSION
    out: bytes = msgpack.packb([version, kind_of(cls), *fields], use_bin_type=True)
    return out


# ---------------------------------------------------------------------------------------
# Valid frames: one real record per family, built through the public constructors


def valid_records() -> list[object]:
    from mesh.hlc import HybridClock, Timestamp
    from mesh.identity import LargeBody, NodeKey, SignedEnvelope, seal
    from mesh.membership import JoinRefusal, JoinReject, SignedJoinRequest
    from mesh.state import HostedSpan, Slot, SlotKind
    from mesh.state_records import Advert, LoadReport, MemberCert, NodeState
    from mesh.wire import TensorBlob
    from nexusd.api import records as api

    key = NodeKey.from_seed(b"\x07" * 32)
    env = seal(key, "nexus/state/1", b"body", clock=HybridClock(max_drift_s=5), now=1.8e9)
    signed = decode(env, SignedEnvelope)
    return [
        signed,
        Timestamp(1_800_000_000_000, 3),
        LargeBody(b"hdr", b"\x01" * 32, 1000),
        SignedJoinRequest(b"\x92\x01\xa1x", b"\x02" * 64),
        JoinReject(JoinRefusal.STALE, "too old"),
        TensorBlob("float32", (2, 3), "raw", bytes(24)),
        Slot(SlotKind.ADVERT, key.node_id),
        HostedSpan("nexus-1.1", 0, 4, "float32"),
        Advert(
            (HostedSpan("minilm", 0, 8, "float32"),),
            1 << 30,
            4096,
            ("raw", "fp16"),
            ("/ip4/127.0.0.1/tcp/1",),
            NodeState.ONLINE,
            30_000,
        ),
        LoadReport(2, 0.5, (("minilm", 3, 12.5),), ((key.node_id, 0.7),)),
        MemberCert(b"\x05" * 16, key.node_id, "node1", ("member",), 1, 10**12, key.node_id),
        api.GenerateRequest(prompt="hello", model="nexus-1.1", max_new_tokens=8),
        api.EmbedRequest(texts=("a", "b"), model="minilm"),
        api.ErrorReply("malformed", "bad"),
        api.StatusRequest(),
        api.PeersRequest(2, "minilm", 5.0),
    ]


@st.composite
def mutated_frames(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    buf = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice", "dup"]))
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[at] = draw(
                st.sampled_from(
                    [
                        0x00,
                        0x7F,
                        0x80,
                        0x90,
                        0xC0,
                        0xC1,
                        0xC4,
                        0xC6,
                        0xCF,
                        0xD3,
                        0xDC,
                        0xDD,
                        0xDE,
                        0xDF,
                        0xFF,
                    ]
                )
            )
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        elif op == "splice":
            other = draw(st.sampled_from(corpus))
            buf[at:] = other[draw(st.integers(0, len(other))) :]
        elif op == "dup":
            buf += buf[at:]
    return bytes(buf)


def corpus() -> list[bytes]:
    return [encode(r) for r in valid_records()]
