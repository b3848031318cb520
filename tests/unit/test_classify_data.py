"""The shipped classification set (data/classify/): balance, bounds, no leak between splits,
its hash, and that scripts/build_classify.py rebuilds it byte for byte from the corpus."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from atoms.corpus import corpus_path, corpus_text, read_text
from scripts.build_classify import OUT, PER_CLASS, build_rows, encode, passages, sentences

ROOT = Path(__file__).resolve().parents[2]
LABELS = {
    "sense-and-sensibility",
    "pride-and-prejudice",
    "mansfield-park",
    "emma",
    "northanger-abbey",
    "persuasion",
    "moby-dick",
}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in read_text(OUT).splitlines()]


def test_balanced_seven_classes_in_two_splits(rows: list[dict[str, str]]) -> None:
    assert all(list(r) == ["text", "label", "split"] for r in rows)
    counts = Counter((r["split"], r["label"]) for r in rows)
    assert set(counts) == {(s, lab) for s in ("train", "validation") for lab in LABELS}
    assert {counts[k] for k in counts if k[0] == "train"} == {300}
    assert {counts[k] for k in counts if k[0] == "validation"} == {60}
    assert all(10 <= len(r["text"].split()) <= 60 for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)


def test_passages_come_from_their_own_corpus_split(rows: list[dict[str, str]]) -> None:
    text = {"train": corpus_text("train"), "validation": corpus_text("validation")}
    for r in rows:
        other = "validation" if r["split"] == "train" else "train"
        assert r["text"] in text[r["split"]]
        assert r["text"] not in text[other], r["text"]


def test_the_shipped_file_matches_its_readme_and_its_builder() -> None:
    packed = OUT.read_bytes()
    readme = (ROOT / "data" / "classify" / "README.md").read_text()
    m = re.search(
        r"^\| `novels.jsonl.xz` \(shipped\) \| (\d+) \| `([0-9a-f]{64})` \|$", readme, re.M
    )
    assert m is not None
    assert (int(m.group(1)), m.group(2)) == (len(packed), hashlib.sha256(packed).hexdigest())
    rebuilt = encode(build_rows(read_text(corpus_path()), PER_CLASS))
    assert hashlib.sha256(rebuilt).hexdigest() == hashlib.sha256(packed).hexdigest()


def test_sentences_skip_titles_and_initials_and_keep_closing_quotes() -> None:
    para = '"Mr. Darcy is here!" said she. "J. Smith came." Yes, Mrs. Bennet. So did I. Then?'
    assert sentences(para) == [
        '"Mr. Darcy is here!" said she.',
        '"J. Smith came."',
        "Yes, Mrs. Bennet.",
        "So did I.",
        "Then?",
    ]


def test_passages_group_short_sentences_and_drop_long_ones() -> None:
    short = "Yes. Yes. Yes. It rained all day on the wide grey sea that morning."
    assert list(passages(short)) == ["It rained all day on the wide grey sea that morning."]
    long_one = " ".join(["word"] * 61) + "."
    assert list(passages(long_one)) == []
    mixed = "She came in at last. It was a long and tiring day for everyone, she said."
    assert list(passages(mixed)) == [mixed]
