"""A small reader of R's lazy-load data bases (`data/Rdata.rdx` + `data/Rdata.rdb`).

Only what the text packages we build corpora from contain (janeaustenr, tokenizers) is
understood: R's XDR serialisation (format "X\\n", versions 2 and 3) of character vectors,
generic vectors (lists), pairlists (attributes), symbols, references, logical, integer and
double vectors, and NULL. Anything else raises `RDataError` naming the type code and offset.

Rule 1: every length is checked against the bytes that remain before it allocates, and the
nesting depth is bounded, so a damaged file raises `RDataError` instead of eating memory.
Rule 2: strings come back as `str` (UTF-8, Latin-1 and ASCII CHARSXPs decode; NA is `None`).

The lazy-load layout (R's `makeLazyLoadDB`): the .rdx is a gzip-compressed serialisation of
`list(variables = list(name = c(offset, length), ...), references = ..., compressed = TRUE)`;
an entry of the .rdb at `offset` is a 4-byte big-endian uncompressed length then zlib data
holding the serialisation of that one variable.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 64
MAX_INDEX_BYTES = 1 << 20  # an .rdx holds a few names and offsets
MAX_ENTRY_BYTES = 256 << 20  # one variable, uncompressed

# SEXP type codes (R's Rinternals.h / serialize.c)
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP = 9, 10, 13, 14
STRSXP, VECSXP = 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241

_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_UTF8, _LATIN1, _BYTES, _ASCII = 1 << 3, 1 << 2, 1 << 1, 1 << 6
_NA_INT = -(2**31)


class RDataError(ValueError):
    """Bytes that are not an R serialisation this reader understands."""


@dataclass(slots=True)
class RObject:
    """An R vector or list with its attributes (`names`, `class`, `row.names`...).

    Args:
        rtype: the SEXP type code (STRSXP, VECSXP, ...).
        value: the elements (str | None for STRSXP, RObject | ... for VECSXP).
        attributes: attribute name -> value, in file order.
    """

    rtype: int
    value: list[object]
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        names = self.attributes.get("names")
        return names.value if isinstance(names, RObject) else None  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Symbol:
    """An R symbol (a name), as found in pairlist tags."""

    name: str


class _Reader:
    """Recursive-descent reader over one serialisation's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[object] = []

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(
                f"{what} at byte {self.pos}: needs {n} bytes, {len(self.data) - self.pos} remain"
            )

    def int32(self) -> int:
        self.need(4, "integer")
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(v)

    def length(self, elem_bytes: int, what: str) -> int:
        n = self.int32()
        if n == -1:  # a long vector: two more ints
            n = (self.int32() << 32) + self.int32()
        if n < 0:
            raise RDataError(f"{what} at byte {self.pos}: negative length {n}")
        self.need(n * elem_bytes, f"{what} of length {n}")
        return n

    def header(self) -> None:
        self.need(2, "format tag")
        tag = self.data[:2]
        if tag != b"X\n":
            raise RDataError(f"expected the XDR format tag b'X\\n', got {tag!r}")
        self.pos = 2
        version = self.int32()
        self.int32()  # the R version that wrote it
        self.int32()  # the oldest R version that can read it
        if version == 3:
            n = self.length(1, "native encoding name")
            self.pos += n
        elif version != 2:
            raise RDataError(f"serialisation version {version}: only 2 and 3 are understood")

    def item(self, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise RDataError(f"nesting deeper than {MAX_DEPTH} at byte {self.pos}")
        at = self.pos
        flags = self.int32()
        rtype = flags & 0xFF
        if rtype in (NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return None
        if rtype == REFSXP:
            index = flags >> 8 or self.int32()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"reference {index} at byte {at}: {len(self.refs)} known")
            return self.refs[index - 1]
        if rtype == SYMSXP:
            name = self.item(depth + 1)
            sym = Symbol(name if isinstance(name, str) else "")
            self.refs.append(sym)
            return sym
        if rtype == LISTSXP:
            return self.pairlist(flags, depth)
        if rtype == CHARSXP:
            return self.charsxp(flags)
        if rtype in (STRSXP, VECSXP, LGLSXP, INTSXP, REALSXP):
            obj = RObject(rtype, self.vector(rtype, depth))
            if flags & _HAS_ATTR:
                attrs = self.item(depth + 1)
                if not isinstance(attrs, dict):
                    raise RDataError(f"attributes of the object at byte {at} are not a pairlist")
                obj.attributes = attrs
            return obj
        raise RDataError(f"SEXP type {rtype} at byte {at} is not understood by this reader")

    def pairlist(self, flags: int, depth: int) -> dict[str, object]:
        """A pairlist (attribute list) as a dict tag -> value; iterative along CDRs."""
        out: dict[str, object] = {}
        while True:
            if flags & _HAS_ATTR:
                self.item(depth + 1)  # attributes of a pairlist cell: none we need
            tag = self.item(depth + 1) if flags & _HAS_TAG else None
            value = self.item(depth + 1)
            out[tag.name if isinstance(tag, Symbol) else str(len(out))] = value
            at = self.pos
            flags = self.int32()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise RDataError(f"pairlist continues with type {flags & 0xFF} at byte {at}")

    def charsxp(self, flags: int) -> str | None:
        n = self.int32()
        if n == -1:
            return None  # NA_character_
        if n < 0:
            raise RDataError(f"string at byte {self.pos}: negative length {n}")
        self.need(n, "string")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        levels = flags >> 12
        encoding = "latin-1" if levels & _LATIN1 else "utf-8"
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise RDataError(
                f"string at byte {self.pos - n + exc.start} is not valid {encoding}"
            ) from None

    def vector(self, rtype: int, depth: int) -> list[object]:
        if rtype == STRSXP:
            n = self.length(8, "character vector")  # each element: flags + length at least
            out: list[object] = []
            for _ in range(n):
                flags = self.int32()
                if flags & 0xFF != CHARSXP:
                    raise RDataError(f"character vector element of type {flags & 0xFF}")
                out.append(self.charsxp(flags))
            return out
        if rtype == VECSXP:
            n = self.length(4, "list")
            return [self.item(depth + 1) for _ in range(n)]
        if rtype == REALSXP:
            n = self.length(8, "double vector")
            vals = struct.unpack_from(f">{n}d", self.data, self.pos)
            self.pos += 8 * n
            return list(vals)
        n = self.length(4, "integer vector")
        ints = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return [None if v == _NA_INT else (bool(v) if rtype == LGLSXP else v) for v in ints]


def unserialize(data: bytes) -> object:
    """The R object of one XDR serialisation (`serialize(x, NULL, xdr = TRUE)`)."""
    reader = _Reader(data)
    reader.header()
    obj = reader.item()
    if reader.pos != len(data):
        raise RDataError(f"{len(data) - reader.pos} bytes left after the object")
    return obj


def _bounded_gunzip(raw: bytes, limit: int, what: str) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            out = f.read(limit + 1)
    except (OSError, EOFError) as exc:
        raise RDataError(f"{what} is not gzip data: {exc}") from None
    if len(out) > limit:
        raise RDataError(f"{what} inflates past {limit} bytes")
    return out


def read_lazyload_db(rdx: Path) -> dict[str, object]:
    """Every variable of a lazy-load data base, by name (the .rdb sits next to `rdx`).

    Raises:
        RDataError: the index or an entry is damaged or holds types this reader lacks.
        OSError: the files cannot be read.
    """
    index = unserialize(_bounded_gunzip(rdx.read_bytes(), MAX_INDEX_BYTES, str(rdx)))
    if not isinstance(index, RObject) or index.names is None:
        raise RDataError(f"{rdx}: the index is not a named list")
    parts = dict(zip(index.names, index.value, strict=True))
    variables, compressed = parts.get("variables"), parts.get("compressed")
    if not isinstance(variables, RObject) or variables.names is None:
        raise RDataError(f"{rdx}: the index has no named 'variables' list")
    if not isinstance(compressed, RObject) or compressed.value != [True]:
        raise RDataError(f"{rdx}: only zlib-compressed data bases are understood")
    rdb = rdx.with_suffix(".rdb").read_bytes()
    out: dict[str, object] = {}
    for name, where in zip(variables.names, variables.value, strict=True):
        if not isinstance(where, RObject) or len(where.value) != 2 or name is None:
            raise RDataError(f"{rdx}: variable {name!r} has no (offset, length) pair")
        offset, length = (int(v) for v in where.value)  # type: ignore[call-overload]
        out[name] = unserialize(_entry(rdb, offset, length, name))
    return out


def _entry(rdb: bytes, offset: int, length: int, name: str) -> bytes:
    if offset < 0 or length < 5 or offset + length > len(rdb):
        raise RDataError(
            f"entry {name!r} ({offset}+{length}) lies outside the {len(rdb)}-byte .rdb"
        )
    blob = rdb[offset : offset + length]
    (size,) = struct.unpack_from(">I", blob, 0)
    if size > MAX_ENTRY_BYTES:
        raise RDataError(f"entry {name!r} claims {size} bytes, over the {MAX_ENTRY_BYTES} bound")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(blob[4:], size + 1)
    except zlib.error as exc:
        raise RDataError(f"entry {name!r} is not zlib data: {exc}") from None
    if len(data) != size:
        raise RDataError(f"entry {name!r}: header says {size} bytes, inflated {len(data)}")
    return data
