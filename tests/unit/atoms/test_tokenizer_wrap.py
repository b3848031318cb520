"""The tokenizer wrapper over the bundled MiniLM tokenizer.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from atoms.errors import ModelFormatError
from atoms.minilm import minilm_dir
from atoms.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=8)


def test_batch_pads_to_the_longest_with_a_mask(tok: TextTokenizer) -> None:
    batch = tok.encode_batch(["Hello world", "a slightly longer sentence"])
    assert batch.ids.dtype == torch.long
    assert batch.ids.shape == (2, 6)
    assert batch.ids[0].tolist() == [101, 7592, 2088, 102, 0, 0]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch.lengths == [4, 6]
    assert batch.pad_mask.dtype == torch.bool
    assert batch.type_ids.abs().sum() == 0


def test_truncation_keeps_special_tokens(tok: TextTokenizer) -> None:
    ids = tok.encode("one two three four five six seven eight nine ten")
    assert len(ids) == 8
    assert ids[0] == 101
    assert ids[-1] == 102


def test_decode_round_trip_and_left_padding() -> None:
    left = TextTokenizer.from_file(
        minilm_dir() / "tokenizer.json", max_length=16, padding_side="left"
    )
    batch = left.encode_batch(["hi", "hello there friend"])
    assert batch.attention_mask[0].tolist()[:2] == [0, 0]
    assert left.decode(batch.ids[1]) == "hello there friend"
    assert left.decode([101, 7592, 102], skip_special_tokens=False) == "[CLS] hello [SEP]"


def test_bad_inputs(tok: TextTokenizer, tmp_path: Path) -> None:
    assert tok.encode_batch([]).ids.shape == (0, 0)
    with pytest.raises(TypeError, match="text 1 must be a str"):
        tok.encode_batch(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ModelFormatError, match="is missing"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="cannot be loaded"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(ModelFormatError, match="no pad token"):
        TextTokenizer.from_file(minilm_dir() / "tokenizer.json", pad_token="<nope>")


def test_a_prompt_keeps_its_start_token_but_is_not_ended() -> None:
    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=64)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    full = tok.encode("It was a truth")
    assert full[0] == cls and full[-1] == sep
    assert tok.encode_prompt("It was a truth") == full[:-1]
    assert tok.encode_untruncated(["It was a truth " * 40])[0][-1] != sep  # no specials
    assert len(tok.encode_untruncated(["word " * 100])[0]) == 100  # not cut at max_length


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("his father's account, isn't it? yes.", "his father's account, isn't it? yes."),
        ("a well-known man; (at last) -- he said: 'no' $5", None),
        ("we'll see what you've done, i'm sure they're here", None),
    ],
)
def test_wordpiece_decode_rejoins_split_punctuation(text: str, want: str | None) -> None:
    """A BERT tokenizer's decode gives back contractions, hyphens, dashes and brackets as
    written (the quoted 'no' keeps its spaces: the tokenizer cannot tell it apart)."""
    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=64)
    got = tok.decode(tok.encode_prompt(text))
    if want is None:
        want = text.replace("'no'", "' no '")
    assert got == want
    assert "##" not in got
