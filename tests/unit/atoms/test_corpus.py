"""The shipped corpus and its split (atoms/corpus.py): determinism, bounds, refusals, hashes."""

from __future__ import annotations

import hashlib
import lzma
import re
from collections import Counter
from pathlib import Path

import pytest

from atoms.corpus import (
    corpus_path,
    corpus_text,
    is_validation,
    paragraphs,
    read_text,
    split_paragraphs,
)
from atoms.errors import AtomError, DataError

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "data" / "corpus" / "README.md"

TEXT = "\n\n".join(f"Paragraph {i}: the sea, said she, was {i % 7} miles off." for i in range(2000))


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, validation = split_paragraphs(TEXT)
    assert (train, validation) == split_paragraphs(TEXT)
    t, v = paragraphs(train), paragraphs(validation)
    assert not set(t) & set(v)
    assert Counter(t) + Counter(v) == Counter(paragraphs(TEXT))
    assert 40 <= len(v) <= 180  # about 5 % of 2000
    assert all(is_validation(p) for p in v) and not any(is_validation(p) for p in t)


def test_a_paragraphs_split_depends_only_on_its_text() -> None:
    paras = paragraphs(TEXT)
    reordered = "\n\n".join(reversed(paras[:500])) + "\n\n  \n\n" + "\n\n".join(paras[500:])
    _, validation = split_paragraphs(reordered)
    _, expected = split_paragraphs(TEXT)
    assert set(paragraphs(validation)) == set(paragraphs(expected))


def test_paragraphs_are_cut_at_blank_lines_and_stripped() -> None:
    text = "  one\nline two \n\n\n three \r\n \t\nfour\n"
    assert paragraphs(text) == ["one\nline two", "three", "four"]
    assert split_paragraphs("") == ("", "")


def test_txt_and_xz_read_alike(tmp_path: Path) -> None:
    text = "Call me Ishmael. — Café\n"
    (tmp_path / "a.txt").write_text("\ufeff" + text, encoding="utf-8")
    (tmp_path / "a.xz").write_bytes(lzma.compress(text.encode()))
    assert read_text(tmp_path / "a.txt") == text
    assert read_text(tmp_path / "a.xz") == text


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b" \n\n\t\n", "is empty"),
        ("latin1.txt", "abc caf\u00e9".encode("latin-1"), "byte 0xe9 at offset 7"),
        ("nul.txt", b"some text\x00more", "control byte 0x00 at offset 9"),
        ("bell.txt", "é\x07".encode(), "control byte 0x07 at offset 2"),
        ("cut.xz", lzma.compress(b"x" * 5000)[:-20], "truncated|not valid xz"),
        ("junk.xz", b"not xz at all", "not valid xz"),
        ("table.tsv", b"a\tb\n", "expected a .txt, .jsonl, .csv or .xz"),
    ],
)
def test_bad_files_are_refused_with_the_reason(
    tmp_path: Path, name: str, data: bytes, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=match) as info:
        read_text(path)
    assert isinstance(info.value, AtomError) and isinstance(info.value, ValueError)
    assert name in str(info.value)


def test_size_bound_holds_before_reading_and_after_inflating(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_bytes(b"a" * 2000)
    with pytest.raises(DataError, match="at most 1000 bytes, it has 2000"):
        read_text(tmp_path / "big.txt", max_bytes=1000)
    (tmp_path / "bomb.xz").write_bytes(lzma.compress(b"a" * 100_000))  # ~100 bytes packed
    with pytest.raises(DataError, match="inflates past the 1000-byte bound"):
        read_text(tmp_path / "bomb.xz", max_bytes=1000)
    with pytest.raises(DataError, match="missing"):
        read_text(tmp_path / "absent.txt")


def _readme_sha256(row: str) -> str:
    m = re.search(
        rf"^\| {re.escape(row)} \| (\d+) \| `([0-9a-f]{{64}})` \|$", README.read_text(), re.M
    )
    assert m is not None, f"data/corpus/README.md has no row {row!r}"
    return m.group(2)


def test_the_shipped_file_is_the_one_the_readme_describes() -> None:
    path = corpus_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _readme_sha256(
        "`english.txt.xz` (shipped)"
    )
    text = read_text(path)
    assert hashlib.sha256(text.encode()).hexdigest() == _readme_sha256("its text (UTF-8)")


def test_shipped_splits() -> None:
    train, validation = corpus_text("train"), corpus_text("validation")
    n_train, n_val = len(paragraphs(train)), len(paragraphs(validation))
    assert (n_train, n_val) == (12312, 640)  # data/corpus/README.md
    assert train.startswith("SENSE AND SENSIBILITY\n\nby Jane Austen")
    assert "gutenberg" not in (train + validation).lower()
    with pytest.raises(ValueError, match="expected one of"):
        corpus_text("test")
