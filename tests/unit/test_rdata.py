"""The R serialisation reader used to build the corpus (scripts/rdata.py), on hand-made bytes."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from scripts.rdata import (
    RDataError,
    RObject,
    read_lazyload_db,
    unserialize,
)

HEADER = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
NIL = struct.pack(">i", 254)


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def char(s: str | None, *, latin1: bool = False) -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    levels = (1 << 2) if latin1 else (1 << 3)
    return i32(9 | (levels << 12), len(raw)) + raw


def strsxp(*items: str | None, attrs: bytes = b"") -> bytes:
    flags = 16 | ((1 << 9) if attrs else 0)
    return i32(flags, len(items)) + b"".join(char(s) for s in items) + attrs


def names_attr(*names: str, symbol_ref: int | None = None) -> bytes:
    tag = i32(255 | (symbol_ref << 8)) if symbol_ref else i32(1) + char("names")
    return i32(2 | (1 << 10)) + tag + strsxp(*names) + NIL


def test_character_vector_with_na_and_encodings() -> None:
    data = HEADER + i32(16, 3) + char("Émma") + char(None) + char("café", latin1=True)
    obj = unserialize(data)
    assert isinstance(obj, RObject)
    assert obj.value == ["Émma", None, "café"]


def test_named_list_resolves_symbol_references() -> None:
    flat = unserialize(HEADER + i32(19 | (1 << 9), 1) + strsxp("one") + names_attr("p"))
    assert isinstance(flat, RObject)
    assert flat.value[0] == RObject(16, ["one"])
    assert flat.names == ["p"]
    # the first names attribute defines the symbol `names` (reference 1); the second refers to it
    inner = strsxp("a", attrs=names_attr("x", symbol_ref=1))
    lst = unserialize(HEADER + i32(19, 2) + strsxp("v", attrs=names_attr("k")) + inner)
    assert isinstance(lst, RObject)
    first, second = lst.value
    assert isinstance(first, RObject) and isinstance(second, RObject)
    assert (first.names, second.names) == (["k"], ["x"])


def test_numbers_and_logicals() -> None:
    data = HEADER + i32(19, 3) + i32(13, 2, 7, -(2**31)) + i32(10, 1, 1)
    data += i32(14, 1) + struct.pack(">d", 2.5)
    obj = unserialize(data)
    assert isinstance(obj, RObject)
    assert [o.value for o in obj.value if isinstance(o, RObject)] == [[7, None], [True], [2.5]]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"A\n" + HEADER[2:] + NIL, "format tag"),
        (HEADER.replace(i32(3), i32(4), 1) + NIL, "version 4"),
        (HEADER + i32(16, 1_000_000_000), "needs 8000000000 bytes"),
        (HEADER + i32(16, 1) + i32(9, 50) + b"short", "needs 50 bytes"),
        (HEADER + i32(3), "SEXP type 3"),
        (HEADER + i32(255 | (7 << 8)), "reference 7"),
        (HEADER + i32(16, 1) + char("x") + b"tail", "4 bytes left"),
        (HEADER + i32(16, 1) + i32(9 | (1 << 15), 2) + b"\xff\xfe", "not valid utf-8"),
        (HEADER + i32(19, 1) * 100 + NIL, "nesting deeper than 64"),
    ],
)
def test_damaged_or_unknown_input_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(RDataError, match=match):
        unserialize(data)


def _lazyload(tmp_path: Path, entries: dict[str, bytes], *, lie: int = 0) -> Path:
    rdb = b""
    spans: list[tuple[int, int]] = []
    for payload in entries.values():
        blob = struct.pack(">I", len(payload) + lie) + zlib.compress(payload)
        spans.append((len(rdb), len(blob)))
        rdb += blob
    variables = i32(19 | (1 << 9), len(spans)) + b"".join(i32(13, 2, o, n) for o, n in spans)
    variables += names_attr(*entries)
    index = i32(19 | (1 << 9), 3) + variables + i32(19, 0) + i32(10, 1, 1)
    index += names_attr("variables", "references", "compressed")
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(HEADER + index, mtime=0))
    return tmp_path / "Rdata.rdx"


def test_lazyload_database_round_trip(tmp_path: Path) -> None:
    rdx = _lazyload(
        tmp_path,
        {
            "emma": HEADER + strsxp("EMMA", "", "By Jane Austen"),
            "mobydick": HEADER + strsxp("Call me Ishmael."),
        },
    )
    db = read_lazyload_db(rdx)
    assert list(db) == ["emma", "mobydick"]
    emma = db["emma"]
    assert isinstance(emma, RObject)
    assert emma.value == ["EMMA", "", "By Jane Austen"]


def test_lazyload_entry_whose_size_header_lies_is_refused(tmp_path: Path) -> None:
    rdx = _lazyload(tmp_path, {"emma": HEADER + strsxp("EMMA")}, lie=10)
    with pytest.raises(RDataError, match="header says"):
        read_lazyload_db(rdx)
