"""Typed, versioned wire records (their framing on a stream: `mesh.framing`).

A record is a frozen dataclass registered with `@record("kind")`. On the wire it is the
msgpack array `[WIRE_VERSION, kind, *fields]`; a record nested inside another is
`[kind, *fields]`. Field types come from the dataclass annotations and are checked
recursively on decode, so a decoded object is always a valid, fully typed record.

Rule 1: msgpack is imported here and nowhere else; no msgpack exception leaves this module.
Rule 2: everything from a peer is bounded before it is parsed: total size first, then
nesting depth (a walk over type bytes, before msgpack preallocates per container), then
string/bytes/array/map lengths inside msgpack (array/map counts also capped by the size).
Rule 3: decode either returns a valid record or raises `MalformedMessage` (or its subclass
`OversizeMessage`); it never returns a partially checked object.
Rule 4: no ExtType, no pickle, no global ExtType registry; the only global is the table of
record kinds, filled at import time by `@record` and never changed afterwards.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack

from mesh.errors import MalformedMessage, OversizeMessage

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

WIRE_VERSION: int = 1
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every decode.

    Attributes:
        max_bytes: total encoded size, and the cap for any single str/bytes inside.
        max_depth: containers nested inside each other (the top-level array is depth 1).
        max_items: elements of any one array or map.
    """

    max_bytes: int = 16 * MiB
    max_depth: int = 8
    max_items: int = 65536

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name}: expected a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()

_KIND_RE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]{0,63}")
_KINDS: dict[str, type] = {}  # kind -> record class; filled by @record at import time
_SCHEMAS: dict[type, _RecordSchema] = {}  # built lazily: annotations may name later classes
_EXPECTED: dict[tuple[type, ...], dict[str, _RecordSchema]] = {}  # decode's `expect`, by kind


def record(kind: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as a wire record of the given kind.

    Apply it above `@dataclass(frozen=True, slots=True)`. Field types are resolved lazily
    (on first encode/decode), so a record may refer to classes defined after it, or to itself.

    Args:
        kind: short unique name written on the wire.

    Returns:
        The class decorator.

    Raises:
        TypeError: not a frozen dataclass, or a field that is not part of `__init__`.
        ValueError: the kind is malformed or already taken by another class.
    """
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise ValueError(f"record kind: expected {_KIND_RE.pattern}, got {kind!r}")

    def register(cls: type[T]) -> type[T]:
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(
                f"@record({kind!r}): {cls.__name__} must be a frozen dataclass "
                "(put @record above @dataclass(frozen=True, slots=True))"
            )
        if any(not f.init for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
            raise TypeError(f"@record({kind!r}): every field of {cls.__name__} must be in __init__")
        other = _KINDS.get(kind)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"@record({kind!r}): kind already used by {other.__qualname__}")
        _KINDS[kind] = cls
        cls.__wire_kind__ = kind  # type: ignore[attr-defined]
        return cls

    return register


def kind_of(cls: type) -> str:
    """Return the wire kind of a record class (TypeError if it is not a record)."""
    kind = getattr(cls, "__wire_kind__", None)
    if kind is None or _KINDS.get(kind) is not cls:
        raise TypeError(f"{cls!r} is not a @record class")
    return typing.cast("str", kind)


# ---------------------------------------------------------------------------------------
# Type specs: one small object per annotation, with enc (our object -> msgpack-able)
# and dec (msgpack object -> our object, checked). `kind` and `path` name the record
# and the field (e.g. "shape[2]") in error messages.


class _Ctx:
    __slots__ = ("limits",)

    def __init__(self, limits: Limits) -> None:
        self.limits = limits


def _got(value: object) -> str:
    names = {list: "array", dict: "map", type(None): "None"}
    return names.get(type(value), type(value).__name__)


def _type_error(kind: str, path: str, expected: str, value: object) -> MalformedMessage:
    return MalformedMessage(
        f"record {kind!r} field {path!r}: expected {expected}, got {_got(value)}"
    )


def _check_depth(ctx: _Ctx, depth: int) -> None:
    if depth > ctx.limits.max_depth:
        raise MalformedMessage(f"nesting deeper than {ctx.limits.max_depth}")


class _Spec:
    name: str = "?"

    def shape_ok(self, raw: Any) -> bool:
        """Cheap check of the msgpack type alone (used by `_Optional` for its message)."""
        return True

    def enc(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        raise NotImplementedError


def _fits(value: int) -> bool:
    """Whether an int fits msgpack's 64 bits (signed or unsigned)."""
    return -(2**63) <= value < 2**64


class _Scalar(_Spec):
    """bool, int, str, bytes, None: exact types (a bool is never an int here)."""

    def __init__(self, tp: type) -> None:
        self.tp = tp
        self.name = "None" if tp is type(None) else tp.__name__

    def shape_ok(self, raw: Any) -> bool:
        return self._ok(raw)

    def _ok(self, value: object) -> bool:
        return type(value) is self.tp or (
            self.tp is int and isinstance(value, int) and not isinstance(value, bool)
        )

    def enc(self, value: Any, path: str) -> Any:
        if not self._ok(value):
            raise TypeError(f"field {path!r}: expected {self.name}, got {_got(value)}")
        if self.tp is int and not _fits(value):
            raise ValueError(f"field {path!r}: int {value} does not fit in 64 bits")
        return int(value) if self.tp is int else value

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if not self._ok(raw):
            raise _type_error(kind, path, self.name, raw)
        return raw


class _Float(_Spec):
    name = "float"

    def shape_ok(self, raw: Any) -> bool:
        return isinstance(raw, (int, float)) and not isinstance(raw, bool)

    def enc(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"field {path!r}: expected float, got {_got(value)}")
        return float(value)

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise _type_error(kind, path, self.name, raw)
        if isinstance(raw, int) and abs(raw) > 2**53:  # would silently lose precision
            raise _type_error(kind, path, "float (int beyond 2**53)", raw)
        return float(raw)


class _Optional(_Spec):
    def __init__(self, inner: _Spec) -> None:
        self.inner = inner
        self.name = f"{inner.name} | None"

    def enc(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.enc(value, path)

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if raw is None:
            return None
        if not self.inner.shape_ok(raw):
            raise _type_error(kind, path, self.name, raw)
        return self.inner.dec(raw, ctx, depth, kind, path)


class _VarTuple(_Spec):
    def __init__(self, item: _Spec) -> None:
        self.item = item
        self.name = f"tuple[{item.name}, ...]"

    def shape_ok(self, raw: Any) -> bool:
        return type(raw) is list

    def enc(self, value: Any, path: str) -> Any:
        if not isinstance(value, tuple):
            raise TypeError(f"field {path!r}: expected {self.name}, got {_got(value)}")
        return [self.item.enc(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if type(raw) is not list:
            raise _type_error(kind, path, self.name, raw)
        _check_depth(ctx, depth + 1)
        return tuple(
            self.item.dec(v, ctx, depth + 1, kind, f"{path}[{i}]") for i, v in enumerate(raw)
        )


class _FixedTuple(_Spec):
    def __init__(self, items: tuple[_Spec, ...]) -> None:
        self.items = items
        self.name = f"tuple[{', '.join(s.name for s in items) or '()'}]"

    def shape_ok(self, raw: Any) -> bool:
        return type(raw) is list

    def enc(self, value: Any, path: str) -> Any:
        if not isinstance(value, tuple) or len(value) != len(self.items):
            raise TypeError(f"field {path!r}: expected {self.name}, got {value!r:.60}")
        return [
            s.enc(v, f"{path}[{i}]") for i, (s, v) in enumerate(zip(self.items, value, strict=True))
        ]

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if type(raw) is not list:
            raise _type_error(kind, path, self.name, raw)
        if len(raw) != len(self.items):
            raise MalformedMessage(
                f"record {kind!r} field {path!r}: expected {self.name} of {len(self.items)} "
                f"items, got {len(raw)} items"
            )
        _check_depth(ctx, depth + 1)
        pairs = enumerate(zip(self.items, raw, strict=True))
        return tuple(s.dec(v, ctx, depth + 1, kind, f"{path}[{i}]") for i, (s, v) in pairs)


class _Dict(_Spec):
    def __init__(self, value: _Spec) -> None:
        self.value = value
        self.name = f"dict[str, {value.name}]"

    def shape_ok(self, raw: Any) -> bool:
        return type(raw) is dict

    def enc(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict) or not all(type(k) is str for k in value):
            raise TypeError(f"field {path!r}: expected {self.name}, got {_got(value)}")
        # sorted keys: the same record always encodes to the same bytes
        return {k: self.value.enc(value[k], f"{path}[{k!r}]") for k in sorted(value)}

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if type(raw) is not dict:
            raise _type_error(kind, path, self.name, raw)
        _check_depth(ctx, depth + 1)
        out = {}
        for k, v in raw.items():
            if type(k) is not str:
                raise _type_error(kind, f"{path} key", "str", k)
            out[k] = self.value.dec(v, ctx, depth + 1, kind, f"{path}[{k!r}]")
        return out


class _Enum(_Spec):
    def __init__(self, tp: type[enum.Enum]) -> None:
        self.tp = tp
        self.name = tp.__name__

    def shape_ok(self, raw: Any) -> bool:
        return isinstance(raw, (int, str)) and not isinstance(raw, bool)

    def enc(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.tp):
            raise TypeError(f"field {path!r}: expected {self.name}, got {_got(value)}")
        if isinstance(value.value, bool) or not isinstance(value.value, (int, str)):
            raise TypeError(f"field {path!r}: enum {self.name} values must be int or str")
        return value.value

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise _type_error(kind, path, self.name, raw)
        try:
            return self.tp(raw)
        except ValueError:
            raise MalformedMessage(
                f"record {kind!r} field {path!r}: expected a {self.name} value, got {raw!r:.40}"
            ) from None


class _Nested(_Spec):
    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__

    def shape_ok(self, raw: Any) -> bool:
        return type(raw) is list

    def enc(self, value: Any, path: str) -> Any:
        if type(value) is not self.cls:
            raise TypeError(f"field {path!r}: expected {self.name}, got {_got(value)}")
        schema = _schema(self.cls)
        return [schema.kind, *schema.enc_fields(value)]

    def dec(self, raw: Any, ctx: _Ctx, depth: int, kind: str, path: str) -> Any:
        if type(raw) is not list:
            raise _type_error(kind, path, self.name, raw)
        _check_depth(ctx, depth + 1)
        schema = _schema(self.cls)
        if not raw or raw[0] != schema.kind:
            got = repr(raw[0])[:40] if raw else "an empty array"
            raise MalformedMessage(
                f"record {kind!r} field {path!r}: expected record {schema.kind!r}, got {got}"
            )
        return schema.dec_fields(raw[1:], ctx, depth + 1)


_SCALARS = {bool, int, str, bytes, type(None)}


def _compile(tp: Any, owner: str) -> _Spec:
    """Turn one resolved annotation into a spec; TypeError for anything not allowed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is None or tp in _SCALARS:
        return _Scalar(type(None) if tp is None else tp)
    if tp is float:
        return _Float()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Enum(tp)
    if isinstance(tp, type) and getattr(tp, "__wire_kind__", None) is not None:
        return _Nested(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(rest) == 1:
            return _Optional(_compile(rest[0], owner))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _VarTuple(_compile(args[0], owner))
        if args == ((),):
            return _FixedTuple(())
        return _FixedTuple(tuple(_compile(a, owner) for a in args))
    if origin is dict and len(args) == 2 and args[0] is str:
        return _Dict(_compile(args[1], owner))
    raise TypeError(f"record {owner}: field type {tp!r} is not allowed on the wire")


def _exact(spec: _Spec) -> type | None:
    """The one Python type a field's value may have to pass as it is, both ways (a scalar
    other than int, or float), else None. The fast path of `_RecordSchema`: such a value is
    taken when its type is exactly this one, and anything else goes to the spec, which
    accepts or names the error exactly as before. An int is range-checked on the way out,
    and a float from msgpack may be an int on the way in, so neither is exact."""
    if isinstance(spec, _Scalar) and spec.tp is not int:
        return spec.tp
    return None


class _RecordSchema:
    __slots__ = ("cls", "exact", "fields", "kind", "names", "plan")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.kind: str = cls.__wire_kind__  # type: ignore[attr-defined]
        try:
            hints = typing.get_type_hints(cls)
        except NameError as exc:  # e.g. a record defined inside a function
            raise TypeError(f"record {self.kind!r}: cannot resolve field types: {exc}") from None
        self.names = tuple(f.name for f in dataclasses.fields(cls))
        self.fields = tuple(_compile(hints[n], self.kind) for n in self.names)
        # per field: (name, spec, exact type or None, int scalar?, scalar item type of a
        # tuple[X, ...] or None), in the order of the wire
        self.plan = tuple(
            (
                n,
                s,
                _exact(s),
                isinstance(s, _Scalar) and s.tp is int,
                s.item.tp if isinstance(s, _VarTuple) and isinstance(s.item, _Scalar) else None,
            )
            for n, s in zip(self.names, self.fields, strict=True)
        )

    def enc_fields(self, rec: object) -> list[Any]:
        out = []
        for n, s, exact, is_int, _ in self.plan:
            value = getattr(rec, n)
            if type(value) is exact or (is_int and type(value) is int and _fits(value)):
                out.append(value)  # what `s.enc` returns for it, without the call
            else:
                out.append(s.enc(value, n))
        return out

    def dec_fields(self, raw: list[Any], ctx: _Ctx, depth: int) -> object:
        if len(raw) != len(self.fields):
            raise MalformedMessage(
                f"record {self.kind!r}: expected {len(self.fields)} fields, got {len(raw)}"
            )
        values: dict[str, Any] = {}
        nested_ok = depth + 1 <= ctx.limits.max_depth
        for (n, s, exact, is_int, items), v in zip(self.plan, raw, strict=True):
            if type(v) is exact or (is_int and type(v) is int):
                values[n] = v  # what `s.dec` returns for it, without the call
            elif (
                items is not None
                and nested_ok
                and type(v) is list
                and all(type(x) is items for x in v)
            ):
                values[n] = tuple(v)  # a msgpack int always fits: `s.dec`'s result
            else:
                values[n] = s.dec(v, ctx, depth, self.kind, n)
        try:
            return self.cls(**values)  # by name: records with many fields are kw_only
        except (ValueError, TypeError) as exc:  # __post_init__ rejected the values
            raise MalformedMessage(f"record {self.kind!r}: invalid: {exc}") from None


def _schema(cls: type) -> _RecordSchema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        kind_of(cls)
        schema = _SCHEMAS[cls] = _RecordSchema(cls)
    return schema


# ---------------------------------------------------------------------------------------
# encode / decode


def encode(rec: object) -> bytes:
    """Encode a record as the msgpack array `[WIRE_VERSION, kind, *fields]`.

    Args:
        rec: an instance of a `@record` class.

    Returns:
        The encoded bytes; equal records give equal bytes (map keys are sorted).

    Raises:
        TypeError: `rec` is not a record, or a field value does not match its annotation.
        ValueError: an int does not fit in 64 bits.
    """
    schema = _schema(type(rec))
    out: bytes = msgpack.packb(
        [WIRE_VERSION, schema.kind, *schema.enc_fields(rec)], use_bin_type=True
    )
    return out


def _reject_ext(code: int, data: bytes) -> object:
    raise MalformedMessage(f"msgpack ExtType {code} is not allowed")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedMessage("map with duplicate keys")
    return out


def _msgpack_steps() -> tuple[tuple[int, int], ...]:
    """For each type byte: (what, n). what 0: a scalar of n more bytes; 1: a container of n
    items; 2: a str/bin/ext whose length takes n bytes (ext: then a type byte, n + 8);
    3: an array or map whose item count takes n bytes (map: n + 8); 4: the unused 0xC1."""
    steps = [(0, 0)] * 256
    for b in range(0x80, 0x90):
        steps[b] = (1, 2 * (b & 0x0F))  # fixmap: key and value per pair
    for b in range(0x90, 0xA0):
        steps[b] = (1, b & 0x0F)  # fixarray
    for b in range(0xA0, 0xC0):
        steps[b] = (0, b & 0x1F)  # fixstr
    fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4,
             0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}  # fmt: skip
    for b, n in fixed.items():
        steps[b] = (0, n)
    for b, n in {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}.items():
        steps[b] = (2, n)  # bin, str
    for b, n in {0xC7: 1, 0xC8: 2, 0xC9: 4}.items():
        steps[b] = (2, n + 8)  # ext: length, type byte, data
    for b, n in {0xDC: 2, 0xDD: 4, 0xDE: 2 + 8, 0xDF: 4 + 8}.items():
        steps[b] = (3, n)  # array, map
    steps[0xC1] = (4, 0)
    return tuple(steps)


_STEPS = _msgpack_steps()
# Every byte that is not a container type byte (fixmap, fixarray, array16/32, map16/32):
# deleting them leaves an upper bound on the containers a message can open.
_NOT_CONTAINER = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))
_QUICK_BYTES = 4096


def _check_nesting(buf: bytes, max_depth: int) -> None:
    """Refuse containers nested deeper than `max_depth` before msgpack parses `buf`.

    msgpack preallocates up to 10000 slots (80 KB) for every array or map header it meets
    and nests up to 1024 deep before it refuses, so without this walk a 5 KB frame of
    nested headers made the decoder allocate 80 MB. The walk reads only type bytes and
    lengths (str/bin payloads are skipped), stops at the end of the first value, and leaves
    every other error (truncation, reserved bytes, trailing data) to msgpack's messages.
    Cost: ~0.3 us per msgpack value, nothing per payload byte (measured: 2 ms of the 9 ms
    a 1000-entry sync chunk takes to decode; 5 us for a 6 MB tensor frame).

    Raises:
        MalformedMessage: a container at depth > `max_depth` (the top-level array is 1).
    """
    if len(buf) <= _QUICK_BYTES and len(buf.translate(None, _NOT_CONTAINER)) <= max_depth:
        return  # no more container bytes than max_depth: cannot nest deeper (~0.3 us)
    steps, open_items = _STEPS, [1]  # items still to come in each open container (+ the root)
    pos, end = 0, len(buf)
    while pos < end:
        what, n = steps[buf[pos]]
        pos += 1
        if what == 0:
            pos += n
        elif what == 1 or what == 3:
            if what == 3:
                width = n & 7
                n = int.from_bytes(buf[pos : pos + width], "big") << (n >> 3)
                pos += width
            if len(open_items) > max_depth:
                raise MalformedMessage(f"nesting deeper than {max_depth}")
            if n:
                open_items.append(n)
                continue
        elif what == 2:
            width = n & 7
            pos += width + int.from_bytes(buf[pos : pos + width], "big") + (n >> 3)
        else:
            return
        # a value is complete: it fills one item of its container, maybe completing it
        while True:
            open_items[-1] -= 1
            if open_items[-1]:
                break
            open_items.pop()
            if not open_items:
                return  # the first value is complete; msgpack reports any trailing bytes


def _unpack(buf: bytes, limits: Limits) -> Any:
    """Bounded msgpack parse, every failure as MalformedMessage / OversizeMessage."""
    if len(buf) > limits.max_bytes:
        raise OversizeMessage(f"message of {len(buf)} bytes, over the limit of {limits.max_bytes}")
    _check_nesting(buf, limits.max_depth)
    # msgpack 1.x `unpackb` has no max_buffer_size; the size check above plays its role.
    # An array item or a map pair takes at least one byte, so no honest container announces
    # more items than the message has bytes: capping at len(buf) keeps msgpack's
    # preallocation for each header within 8 x len(buf) bytes.
    cap = max(1, min(limits.max_items, len(buf)))
    try:
        return msgpack.unpackb(
            buf, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            object_pairs_hook=_pairs, max_bin_len=limits.max_bytes,
            max_str_len=limits.max_bytes, max_array_len=cap, max_map_len=cap,
        )  # fmt: skip
    except msgpack.ExtraData as exc:
        raise MalformedMessage(f"trailing bytes after message ({len(exc.extra)} extra)") from None
    except msgpack.StackError:
        raise MalformedMessage(f"nesting deeper than {limits.max_depth}") from None
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"string is not valid UTF-8 at byte {exc.start}") from None
    except msgpack.FormatError:
        raise MalformedMessage("invalid msgpack: reserved type byte") from None
    except ValueError as exc:  # msgpack reports truncation and length caps as ValueError
        if "incomplete input" in str(exc):
            raise MalformedMessage(f"truncated message ({len(buf)} bytes)") from None
        raise MalformedMessage(f"invalid msgpack: {exc}") from None


def _decode_top(buf: bytes, expect: tuple[type, ...], limits: Limits) -> object:
    schemas = _EXPECTED.get(expect)
    if schemas is None:
        schemas = _EXPECTED[expect] = {_schema(cls).kind: _schema(cls) for cls in expect}
    raw = _unpack(bytes(buf) if not isinstance(buf, bytes) else buf, limits)
    if type(raw) is not list or len(raw) < 2:
        raise MalformedMessage(f"expected an array [version, kind, ...], got {_got(raw)}")
    version, kind = raw[0], raw[1]
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedMessage(f"unsupported wire version {version!r:.20}, expected {WIRE_VERSION}")
    if type(kind) is not str:
        raise MalformedMessage(f"record kind: expected str, got {_got(kind)}")
    schema = schemas.get(kind)
    if schema is None:
        wanted = " or ".join(repr(k) for k in schemas)
        if kind not in _KINDS:
            raise MalformedMessage(f"unknown record kind {kind!r:.40}, expected {wanted}")
        raise MalformedMessage(f"wrong record kind {kind!r}, expected {wanted}")
    return schema.dec_fields(raw[2:], _Ctx(limits), 1)


def decode(buf: bytes, expect: type[T], *, limits: Limits = DEFAULT_LIMITS) -> T:
    """Decode bytes from a peer into one record type, checking every field.

    Args:
        buf: the encoded message (exactly one; trailing bytes are an error).
        expect: the record class required here.
        limits: size, depth and item bounds.

    Returns:
        A valid instance of `expect`.

    Raises:
        OversizeMessage: `buf` is larger than `limits.max_bytes`.
        MalformedMessage: anything else wrong; the message says what and where.
    """
    return typing.cast("T", _decode_top(buf, (expect,), limits))


def decode_any(buf: bytes, expect: tuple[type, ...], *, limits: Limits = DEFAULT_LIMITS) -> object:
    """Decode bytes into whichever of several record types the kind names.

    Args:
        buf: the encoded message.
        expect: the record classes accepted here (dispatch with `match` / isinstance).
        limits: size, depth and item bounds.

    Returns:
        A valid instance of one of `expect`.

    Raises:
        OversizeMessage, MalformedMessage: as for `decode`.
    """
    return _decode_top(buf, expect, limits)


# ---------------------------------------------------------------------------------------
# Tensors

DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1,
    "uint8": 1, "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip
MAX_NDIM = 8
_CODEC_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


@record("tensor")
@dataclass(frozen=True, slots=True)
class TensorBlob:
    """A tensor on the wire: dtype name, shape and encoded bytes.

    For codec "raw", `data` is the C-contiguous little-endian buffer and its length is
    checked here; other codecs (e.g. "int8-absmax") are checked by whoever decodes them.
    """

    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(
                f"tensor dtype: expected one of {sorted(DTYPE_ITEMSIZE)}, got {self.dtype!r:.40}"
            )
        if len(self.shape) > MAX_NDIM:
            raise ValueError(
                f"tensor shape: expected at most {MAX_NDIM} dims, got {len(self.shape)}"
            )
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor shape: expected non-negative dims, got {self.shape}")
        if not _CODEC_RE.fullmatch(self.codec):
            raise ValueError(f"tensor codec: expected a short identifier, got {self.codec!r:.40}")
        if self.codec == "raw" and len(self.data) != self.raw_nbytes:
            raise ValueError(
                f"tensor data: expected {self.raw_nbytes} bytes for "
                f"{self.dtype}{list(self.shape)}, "
                f"got {len(self.data)}"
            )

    @property
    def numel(self) -> int:
        """Number of elements, prod(shape)."""
        return math.prod(self.shape)

    @property
    def raw_nbytes(self) -> int:
        """Size of the uncompressed tensor in bytes."""
        return self.numel * DTYPE_ITEMSIZE[self.dtype]
