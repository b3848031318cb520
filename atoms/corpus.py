"""The shipped English training corpus and its deterministic train/validation split.

The corpus (`data/corpus/english.txt.xz` at the repository root; provenance, licence and
hashes in `data/corpus/README.md`) is plain UTF-8 text: paragraphs separated by one blank
line. `scripts/build_corpus.py` rebuilds it from Debian packages.

Rule 1: the split is per paragraph and depends only on the paragraph's own text: a paragraph
goes to validation when BLAKE2b-64 of its UTF-8 bytes, read as a big-endian integer, is
< 5 modulo 100 (about 5 %). Edits elsewhere never move a paragraph between splits, and equal
paragraphs (e.g. "CHAPTER I") always land on the same side.
Rule 2: every file is bounded before it is read (`MAX_TEXT_BYTES`, compressed and inflated),
and anything that is not non-empty UTF-8 text raises `DataError` naming the file and offset.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import re
from pathlib import Path

from .errors import DataError

MAX_TEXT_BYTES = 512 << 20
VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # tab, LF, FF, CR are text


def corpus_path() -> Path:
    """The shipped corpus file (`data/corpus/english.txt.xz` under the repository root).

    Raises:
        DataError: the file is absent (e.g. an installed wheel, which does not carry data/).
    """
    path = Path(__file__).resolve().parents[1] / "data" / "corpus" / "english.txt.xz"
    if not path.is_file():
        raise DataError(
            f"corpus file {path} is missing: it ships in the repository (data/corpus/), "
            "not in the wheel; run from a checkout or rebuild it with scripts/build_corpus.py"
        )
    return path


TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")


def read_text(path: Path, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a `.txt`, `.jsonl` or `.csv` file, or of one of them compressed with xz
    (`.xz`), bounded by `max_bytes` before and after inflating.

    Raises:
        DataError: missing, empty, larger than `max_bytes`, a damaged .xz, not UTF-8
            (the message gives the byte offset), or holding control bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} is missing")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"text file {path}: expected at most {max_bytes} bytes, it has {size}")
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = _inflate_xz(raw, path, max_bytes)
    elif path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"text file {path}: expected a {', '.join(TEXT_SUFFIXES)} or .xz file")
    return _decode(raw, path)


def _inflate_xz(raw: bytes, path: Path, max_bytes: int) -> bytes:
    inflater = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = inflater.decompress(raw, max_length=max_bytes + 1)
    except lzma.LZMAError as exc:
        raise DataError(f"text file {path} is not valid xz data: {exc}") from None
    if len(out) > max_bytes:
        raise DataError(f"text file {path}: inflates past the {max_bytes}-byte bound")
    if not inflater.eof:
        raise DataError(f"text file {path}: the xz stream is truncated")
    return out


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text file {path}: expected UTF-8, got byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        ) from None
    text = text.removeprefix("\ufeff")
    bad = _BAD_CONTROL.search(text)
    if bad is not None:
        offset = len(text[: bad.start()].encode("utf-8"))
        raise DataError(
            f"text file {path}: expected text, got control byte 0x{ord(bad.group()):02x} "
            f"at offset {offset}"
        )
    if not text.strip():
        raise DataError(f"text file {path} is empty")
    return text


def paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of `text` (separated by blank lines), stripped, in order."""
    return [p for p in (part.strip() for part in _PARAGRAPH_BREAK.split(text)) if p]


def is_validation(paragraph: str) -> bool:
    """Whether a (stripped) paragraph belongs to the validation split (module Rule 1)."""
    digest = hashlib.blake2b(paragraph.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < VALIDATION_PERCENT


def split_paragraphs(text: str) -> tuple[str, str]:
    """(train, validation) texts: the paragraphs of each split, in order, blank-line separated."""
    train: list[str] = []
    validation: list[str] = []
    for p in paragraphs(text):
        (validation if is_validation(p) else train).append(p)
    return "\n\n".join(train), "\n\n".join(validation)


@functools.lru_cache(maxsize=1)
def _shipped_split() -> tuple[str, str]:
    return split_paragraphs(read_text(corpus_path()))


def corpus_text(split: str) -> str:
    """The "train" or "validation" text of the shipped corpus.

    Raises:
        ValueError: an unknown split name.
        DataError: the shipped file is missing or damaged.
    """
    if split not in SPLITS:
        raise ValueError(f"corpus split: expected one of {SPLITS}, got {split!r}")
    train, validation = _shipped_split()
    return train if split == "train" else validation
