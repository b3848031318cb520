"""Training data: LM windows and paragraphs, labelled files, errors, deterministic order."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest
import torch

from atoms.datasets import (
    Order,
    classify_dataset,
    lm_dataset,
    paragraph_examples,
    read_labelled,
    special_ids,
)
from atoms.errors import DataError
from atoms.minilm import minilm_dir
from atoms.tokenizer import TextTokenizer
from atoms.training import IGNORE


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=16)


def test_lm_windows_keep_long_paragraphs_and_start_from_bos(tok: TextTokenizer) -> None:
    long = " ".join(["the whale swam on"] * 20)  # longer than the tokenizer's max_length
    text = "\n\n".join([long, "a short one.", "held out text here"])
    ds = lm_dataset(text, tok, length=8, digest="d", validation_text="held out text here")
    bos, eos = special_ids(tok)
    assert ds.train.inputs.shape[1] == 8 and bool((ds.train.inputs[:, 0] == bos).all())
    # targets are the stream itself: the window's input shifted by one
    assert torch.equal(ds.train.inputs[:, 1:], ds.train.targets[:, :-1])
    assert len(ds.train) * 8 > 16  # the long paragraph was not truncated at max_length
    stream = ds.train.targets.flatten().tolist()
    assert eos in stream
    assert (
        ds.validation.target_count() == len(tok.encode_untruncated(["held out text here"])[0]) + 1
    )


def test_paragraph_examples_pad_with_ignored_targets() -> None:
    ex = paragraph_examples([[5, 6], [7, 8, 9, 10]], 4, bos=1, eos=2)
    assert ex.inputs.tolist() == [[1, 5, 6, 0], [1, 7, 8, 9]]
    assert ex.targets.tolist() == [[5, 6, 2, IGNORE], [7, 8, 9, 10]]


def test_too_little_text_is_a_clear_error(tok: TextTokenizer) -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        lm_dataset("tiny", tok, length=64, digest="d", validation_text="x")


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labelled_jsonl_csv_and_xz(tmp_path: Path, tok: TextTokenizer) -> None:
    rows = [
        {"text": f"sentence {i}", "label": "ab"[i % 2], "split": "validation" if i > 5 else "train"}
        for i in range(8)
    ]
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    xz = tmp_path / "d.jsonl.xz"
    xz.write_bytes(lzma.compress(jl.read_bytes()))
    csv = tmp_path / "d.csv"
    csv.write_text(
        "text,label,split\n" + "".join(f"{r['text']},{r['label']},{r['split']}\n" for r in rows)
    )
    for path in (jl, xz, csv):
        ds = classify_dataset(read_labelled(path), tok, digest="d")
        assert ds.labels == ("a", "b") and len(ds.train) == 6 and len(ds.validation) == 2
        assert ds.train.mask is not None and ds.train.targets.tolist() == [0, 1, 0, 1, 0, 1]


def test_bad_labelled_data_is_refused_with_its_line(tmp_path: Path, tok: TextTokenizer) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_labelled(empty)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_labelled(latin)
    broken = write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": "a"}])
    broken.write_text(broken.read_text() + '{"text": "y"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: `label`"):
        read_labelled(broken)
    stray = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"text": "one", "label": "a", "split": "train"},
            {"text": "two", "label": "b", "split": "train"},
            {"text": "three", "label": "c", "split": "validation"},
        ],
    )
    with pytest.raises(DataError, match=r"not in the label set \['a', 'b'\]: \['c'\]"):
        classify_dataset(read_labelled(stray), tok, digest="d")
    with pytest.raises(DataError, match="labels not in the label set"):
        classify_dataset(read_labelled(stray)[:2], tok, digest="d", labels=["a", "c"])


def test_order_is_a_pure_function_of_seed_and_index() -> None:
    a, b = Order(10, 3, seed=4), Order(10, 3, seed=4)
    seq = [a.rows(j) for j in range(10)]
    assert [b.rows(j) for j in reversed(range(10))] == list(reversed(seq))
    flat = [i for rows in seq for i in rows]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert flat[:10] != flat[10:20]  # the next epoch is shuffled anew
    assert Order(10, 3, seed=5).rows(0) != seq[0] or Order(10, 3, seed=5).rows(1) != seq[1]
