"""Build `data/classify/novels.jsonl.xz`: short passages labelled with the novel they come from.

    python -m scripts.build_classify            # from the shipped corpus
    python -m scripts.build_classify --check    # rebuild in memory, compare with the file

Each line is `{"text": ..., "label": ..., "split": "train"|"validation"}`; the labels are
the seven books of the corpus (`scripts.build_corpus.BOOKS`). data/classify/README.md
documents the set.

Rule 1: the set is a pure function of the corpus text: books are cut at their title
paragraphs, passages are drawn from the corpus split (`atoms.corpus.is_validation`), so a
validation passage never shares a paragraph with a training passage, nor with the text a
generator is trained on.
Rule 2: a passage is 1-3 consecutive sentences of one paragraph, 10-60 words: sentences are
taken greedily from the start of the paragraph until the passage has 10 words (at most 3),
kept if it has 10-60 words, and the next passage starts after it. Of each book's candidates
in a split, the `per_class` whose BLAKE2b of the text is smallest are kept (balanced,
order-free, deterministic); lines are sorted by (split, BLAKE2b of the text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from atoms.corpus import corpus_path, is_validation, paragraphs, read_text

from .build_corpus import BOOKS, XZ_PRESET

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "classify" / "novels.jsonl.xz"
PER_CLASS = {"train": 300, "validation": 60}
MIN_WORDS, MAX_WORDS, MAX_SENTENCES = 10, 60, 3
# "Mr. Darcy": a period after these does not end a sentence
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "dr",
    "st",
    "col",
    "capt",
    "messrs",
    "esq",
    "rev",
    "sir",
    "no",
    "vol",
}
_SENTENCE_END = re.compile(r"""(?<=[.!?])(["')\]]*)\s+(?=["'(]?[A-Z])""")


def books(text: str) -> dict[str, list[str]]:
    """label -> the book's paragraphs, cutting the corpus at the title paragraphs."""
    paras = paragraphs(text)
    starts = []
    for book in BOOKS:
        found = [i for i, p in enumerate(paras) if p == book.title]
        if len(found) != 1:
            raise SystemExit(f"title {book.title!r} occurs {len(found)} times in the corpus")
        starts.append(found[0])
    if starts != sorted(starts) or starts[0] != 0:
        raise SystemExit("the corpus does not hold the books in the expected order")
    ends = [*starts[1:], len(paras)]
    return {b.label: paras[i:j] for b, i, j in zip(BOOKS, starts, ends, strict=True)}


def sentences(paragraph: str) -> list[str]:
    """The paragraph cut after ., ! or ? (and closing quotes) before a capital letter."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(paragraph):
        sentence = paragraph[start : m.end(1)]
        last_word = sentence.rsplit(None, 1)[-1].strip("\"'(.").lower()
        if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word != "i"):  # "Mr.", "J."
            continue
        out.append(sentence.strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def passages(paragraph: str) -> Iterator[str]:
    """The paragraph's candidate passages (module Rule 2)."""
    sents = sentences(paragraph)
    i = 0
    while i < len(sents):
        j = i + 1
        while j < len(sents) and j - i < MAX_SENTENCES and _words(sents[i:j]) < MIN_WORDS:
            j += 1
        if MIN_WORDS <= _words(sents[i:j]) <= MAX_WORDS:
            yield " ".join(sents[i:j])
        i = j


def _words(sents: list[str]) -> int:
    return sum(len(s.split()) for s in sents)


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def build_rows(text: str, per_class: dict[str, int]) -> list[dict[str, str]]:
    """The labelled set: `per_class[split]` passages per book and split (module Rules)."""
    rows: list[dict[str, str]] = []
    for label, paras in books(text).items():
        pools: dict[str, set[str]] = {"train": set(), "validation": set()}
        for para in paras:
            pools["validation" if is_validation(para) else "train"].update(passages(para))
        for split, pool in pools.items():
            if len(pool) < per_class[split]:
                raise SystemExit(
                    f"{label}/{split}: {len(pool)} passages, {per_class[split]} wanted"
                )
            chosen = sorted(pool, key=_key)[: per_class[split]]
            rows.extend({"text": t, "label": label, "split": split} for t in chosen)
    rows.sort(key=lambda r: (r["split"] != "train", _key(r["text"])))
    return rows


def encode(rows: list[dict[str, str]]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False, sort_keys=False) for r in rows)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--corpus", type=Path, default=None, help="corpus file (default: the shipped one)"
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the rebuilt bytes differ from --out",
    )
    args = p.parse_args(argv)
    rows = build_rows(read_text(args.corpus or corpus_path()), PER_CLASS)
    packed = encode(rows)
    for split in PER_CLASS:
        n = sum(r["split"] == split for r in rows)
        print(f"{split}: {n} passages, {n // len(BOOKS)} per label")
    digest = hashlib.sha256(packed).hexdigest()
    print(f"{args.out.name}: {len(packed)} bytes, sha256 {digest}")
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == packed
        print("matches the shipped file" if same else "DIFFERS from the shipped file")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(packed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
