"""Text <-> token ids, over a Hugging Face fast tokenizer file (`tokenizer.json`).

Rule 1: the wrapper owns its `tokenizers.Tokenizer` and configures padding and truncation
once, in the constructor; the padding/truncation stored in the json file are overridden
(the MiniLM file pads to a fixed 128, sentence-transformers pads to the longest and
truncates at 256).
Rule 2: batches come back as int64 tensors: ids, attention mask (1 = real token) and
token type ids, all (B, T).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders

from .errors import ModelFormatError

if TYPE_CHECKING:
    from collections.abc import Sequence

_PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<unk>", "</s>", "<|endoftext|>")


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """A padded batch of token ids.

    Args:
        ids: (B, T) int64 token ids.
        attention_mask: (B, T) int64, 1 where a token is real, 0 where padded.
        type_ids: (B, T) int64 segment ids (all zero for single texts).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    type_ids: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {
            tuple(self.ids.shape),
            tuple(self.attention_mask.shape),
            tuple(self.type_ids.shape),
        }
        if len(shapes) != 1 or self.ids.dim() != 2:
            raise ValueError(f"token batch tensors must share one (B,T) shape, got {shapes}")

    @property
    def pad_mask(self) -> torch.Tensor:
        """(B, T) bool, True where a token is real (the `ForwardContext.pad_mask` form)."""
        return self.attention_mask.bool()

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.attention_mask.sum(dim=1)]


class TextTokenizer:
    """Batch encoding with padding to the longest text and truncation at `max_length`.

    Args:
        tokenizer: a loaded `tokenizers.Tokenizer` (this object takes ownership).
        max_length: the longest sequence returned, special tokens included.
        padding_side: "right" (encoders) or "left" (batched causal generation).
        pad_token: the padding token; by default the file's own, else a usual name, else id 0.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        padding_side: str = "right",
        pad_token: str | None = None,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"tokenizer max_length must be >= 1, got {max_length}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._tok = tokenizer
        self._wordpiece = isinstance(tokenizer.decoder, decoders.WordPiece)
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_token, self.pad_id = self._find_pad(pad_token)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(
            direction=padding_side, pad_id=self.pad_id, pad_token=self.pad_token
        )

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        max_length: int = 512,
        padding_side: str = "right",
        pad_token: str | None = None,
    ) -> TextTokenizer:
        """Load a `tokenizer.json`.

        Raises:
            ModelFormatError: the file is missing or not a tokenizer file.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFormatError(f"tokenizer file {path} is missing")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # boundary: tokenizers raises a bare Exception on bad json
            raise ModelFormatError(f"tokenizer file {path} cannot be loaded: {exc}") from None
        return cls(tok, max_length=max_length, padding_side=padding_side, pad_token=pad_token)

    @classmethod
    def from_json(
        cls,
        text: str,
        *,
        max_length: int = 512,
        padding_side: str = "right",
        pad_token: str | None = None,
    ) -> TextTokenizer:
        """Build from the text of a `tokenizer.json` (e.g. one read from a model folder).

        Raises:
            ModelFormatError: not a tokenizer definition.
        """
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # boundary: tokenizers raises a bare Exception on bad json
            raise ModelFormatError(f"tokenizer definition cannot be loaded: {exc}") from None
        return cls(tok, max_length=max_length, padding_side=padding_side, pad_token=pad_token)

    def to_json(self) -> str:
        """The tokenizer definition as `tokenizer.json` text (padding/truncation included)."""
        return str(self._tok.to_str())

    def _find_pad(self, pad_token: str | None) -> tuple[str, int]:
        if pad_token is not None:
            pid = self._tok.token_to_id(pad_token)
            if pid is None:
                raise ModelFormatError(f"tokenizer has no pad token {pad_token!r}")
            return pad_token, pid
        configured = self._tok.padding
        if configured is not None:
            return str(configured["pad_token"]), int(configured["pad_id"])
        for name in _PAD_CANDIDATES:
            pid = self._tok.token_to_id(name)
            if pid is not None:
                return name, pid
        # Pads are masked out everywhere, so any id works; 0 exists in every vocabulary.
        return str(self._tok.id_to_token(0)), 0

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, truncated at `max_length`, not padded."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a generation prompt: the special tokens the tokenizer puts before a
        text (BERT's [CLS], Llama's <s>) but none after it, since a prompt is continued,
        not ended (BERT's template would close it with [SEP], its end of sequence)."""
        full = self.encode(text)
        plain = self.encode(text, add_special_tokens=False)
        if not plain:
            return full
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[: start + len(plain)]
        return full  # truncated at max_length: nothing follows the text

    def encode_untruncated(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without special tokens, padding or truncation (training
        data: a long paragraph keeps all its tokens)."""
        plain = Tokenizer.from_str(self._tok.to_str())  # a copy: this one stays as it is
        plain.no_truncation()
        plain.no_padding()
        return [list(e.ids) for e in plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> TokenBatch:
        """Encode texts into one padded batch (padded to the longest text).

        Raises:
            TypeError: an item is not a str.
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return TokenBatch(empty, empty.clone(), empty.clone())
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return TokenBatch(
            ids=torch.tensor([e.ids for e in encs], dtype=torch.long),
            attention_mask=torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
            type_ids=torch.tensor([e.type_ids for e in encs], dtype=torch.long),
        )

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D id sequence."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D id sequence, got shape {tuple(ids.shape)}")
            ids = [int(i) for i in ids]
        text = str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return tidy_wordpiece(text) if self._wordpiece else text

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab={self.vocab_size}, max_length={self.max_length}, "
            f"pad={self.pad_token!r}:{self.pad_id}, side={self.padding_side})"
        )


# A WordPiece decoder (BERT) joins tokens with spaces and its own clean-up sees one token at
# a time, so punctuation split off a word comes back spaced: "father ' s", "isn ' t",
# "well - known", "( a )", "word ;". These rules rejoin what the pre-tokeniser split
# (contractions and possessives only before their known suffixes, so quoted ' words ' stay
# apart). Applied to the whole text, so a streamed generation's pieces stay a prefix of it
# except where a later token completes a rule (the stream then holds, see atoms.generation).
_WORDPIECE_TIDY = (
    (re.compile(r"(\w) ' (s|t|ll|re|ve|m|d)\b"), r"\1'\2"),
    (re.compile(r"(\w) - (?=\w)"), r"\1-"),
    (re.compile(r"- -"), "--"),
    (re.compile(r" ([;:%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
)


def tidy_wordpiece(text: str) -> str:
    """Spacing of a WordPiece decode made readable (see `_WORDPIECE_TIDY`)."""
    for pattern, repl in _WORDPIECE_TIDY:
        text = pattern.sub(repl, text)
    return text
