"""Rebuild `data/corpus/english.txt.xz` from the Debian packages that ship the texts as R data.

    python -m scripts.build_corpus                  # apt-get download into a temp dir
    python -m scripts.build_corpus --debs DIR       # use .deb files already in DIR
    python -m scripts.build_corpus --check          # rebuild in memory, compare with the file

Sources: `r-cran-janeaustenr` (Jane Austen's six novels, one R character vector of lines
per novel) and `r-cran-tokenizers` (`mobydick`: Moby-Dick as one string, with the Project
Gutenberg header and licence). Provenance and licences: data/corpus/README.md.

Rule 1: the output is a pure function of the two packages' bytes: same input, same
text, same xz bytes (fixed preset, no timestamps in the xz format), whose sizes and sha256
are printed.
Rule 2: normalisation, in this order (data/corpus/README.md repeats it):
  - lines are stripped; runs of non-blank lines join with one space into a paragraph;
    paragraphs are separated by exactly one blank line; whitespace runs become one space;
    text is NFC; CRLF and the byte-order mark go;
  - `_` (Gutenberg's italics markup) is removed; paragraphs of only `*` (section breaks) go;
  - title pages, "VOLUME I", chapter headings and "THE END" are kept, as they are part of
    the books (each book starts with its title paragraph, which the classify builder uses
    as the book boundary);
  - editorial matter is dropped: Northanger Abbey's closing "A NOTE ON THE TEXT" (a modern
    publisher's note), and every Project Gutenberg header, transcriber's note, licence and
    trailer of Moby-Dick; the result must not contain the word "Gutenberg".
Books are written in publication order.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .rdata import RObject, read_lazyload_db

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "corpus" / "english.txt.xz"
PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers")
XZ_PRESET = 9 | lzma.PRESET_EXTREME
_SITE = Path("usr/lib/R/site-library")


@dataclass(frozen=True, slots=True)
class Book:
    """One novel of the corpus: where it comes from and its title paragraph."""

    key: str  # the R variable
    package: str
    title: str  # the book's first paragraph, after normalisation
    label: str  # short name used by the classify set


# publication order: 1811, 1813, 1814, 1815, 1817 (Dec), 1817 (Dec), 1851
BOOKS = (
    Book("sensesensibility", "janeaustenr", "SENSE AND SENSIBILITY", "sense-and-sensibility"),
    Book("prideprejudice", "janeaustenr", "PRIDE AND PREJUDICE", "pride-and-prejudice"),
    Book("mansfieldpark", "janeaustenr", "MANSFIELD PARK", "mansfield-park"),
    Book("emma", "janeaustenr", "EMMA", "emma"),
    Book("northangerabbey", "janeaustenr", "NORTHANGER ABBEY", "northanger-abbey"),
    Book("persuasion", "janeaustenr", "Persuasion", "persuasion"),
    Book("mobydick", "tokenizers", "MOBY DICK; OR THE WHALE", "moby-dick"),
)


def download(dest: Path) -> dict[str, Path]:
    """`apt-get download` the packages into `dest`; package -> .deb path."""
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=dest, check=True, stdout=sys.stderr)
    return find_debs(dest)


def find_debs(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        found = sorted(folder.glob(f"{pkg}_*.deb"))
        if len(found) != 1:
            raise SystemExit(f"{folder}: expected one {pkg}_*.deb, found {len(found)}")
        out[pkg] = found[0]
    return out


def deb_version(deb: Path) -> str:
    res = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    )
    return res.stdout.strip()


def extract(debs: dict[str, Path], dest: Path) -> dict[str, object]:
    """Every R data variable of the packages, by name."""
    variables: dict[str, object] = {}
    for pkg, deb in debs.items():
        root = dest / pkg
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        rpkg = pkg.removeprefix("r-cran-")
        variables.update(read_lazyload_db(root / _SITE / rpkg / "data" / "Rdata.rdx"))
    return variables


def lines_of(variables: dict[str, object], key: str) -> list[str]:
    obj = variables.get(key)
    if not isinstance(obj, RObject) or not all(isinstance(s, str) for s in obj.value):
        raise SystemExit(f"R variable {key!r}: expected a character vector without NA")
    values = [str(s) for s in obj.value]
    if len(values) == 1:  # mobydick: the whole book in one string
        return values[0].replace("\r\n", "\n").split("\n")
    return values


def normalise(lines: list[str]) -> list[str]:
    """Paragraphs from lines (module Rule 2)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        line = line.strip()
        if line:
            current.append(line)
            continue
        if current:
            para = " ".join(" ".join(current).replace("_", "").split())
            para = unicodedata.normalize("NFC", para.removeprefix("\ufeff").strip())
            if para and not re.fullmatch(r"[* ]+", para):
                paragraphs.append(para)
            current = []
    return paragraphs


def cut(paragraphs: list[str], start: str, stop: str | None, book: str) -> list[str]:
    """The paragraphs from the first equal to `start` up to (without) the first starting
    with `stop` after it."""
    try:
        i = paragraphs.index(start)
    except ValueError:
        raise SystemExit(f"{book}: no paragraph {start!r}") from None
    if stop is None:
        return paragraphs[i:]
    for j in range(i + 1, len(paragraphs)):
        if paragraphs[j].startswith(stop):
            return paragraphs[i:j]
    raise SystemExit(f"{book}: no paragraph starting {stop!r} after {start!r}")


def book_paragraphs(variables: dict[str, object], book: Book) -> list[str]:
    paras = normalise(lines_of(variables, book.key))
    if book.key == "northangerabbey":
        return cut(paras, book.title, "A NOTE ON THE TEXT", book.key)
    if book.key == "mobydick":
        paras = cut(paras, book.title, "End of Project Gutenberg's", book.key)
        notes = paras.index("Original Transcriber's Notes:")
        etymology = paras.index("ETYMOLOGY.")
        return paras[:notes] + paras[etymology:]
    return cut(paras, book.title, None, book.key)


def build_text(variables: dict[str, object]) -> str:
    """The corpus text: every book's paragraphs, blank-line separated, newline-terminated."""
    out: list[str] = []
    for book in BOOKS:
        paras = book_paragraphs(variables, book)
        if paras.count(book.title) != 1 or paras[0] != book.title:
            raise SystemExit(f"{book.key}: its title paragraph must open it and occur once")
        out.extend(paras)
    text = "\n\n".join(out) + "\n"
    if "gutenberg" in text.lower():
        raise SystemExit("Project Gutenberg text remains in the corpus")
    return text


def compress(text: str) -> bytes:
    return lzma.compress(
        text.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--debs",
        type=Path,
        default=None,
        help="folder holding the .deb files (default: apt-get download into a temp dir)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the rebuilt bytes differ from --out",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nexus-corpus-") as tmp:
        debs = find_debs(args.debs) if args.debs else download(Path(tmp))
        for pkg, deb in debs.items():
            print(f"{pkg} {deb_version(deb)} sha256 {sha256(deb.read_bytes())}")
        text = build_text(extract(debs, Path(tmp) / "x"))
    raw, packed = text.encode("utf-8"), compress(text)
    print(f"text: {len(raw)} bytes, sha256 {sha256(raw)}")
    print(f"{args.out.name}: {len(packed)} bytes, sha256 {sha256(packed)}")
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == packed
        print("matches the shipped file" if same else "DIFFERS from the shipped file")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(packed)
    return 0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
