"""Training data as tensors: causal-LM windows, labelled texts, and a deterministic order.

Rule 1: every example a run sees is a pure function of (data, seed, step): `Order` maps a
global micro-batch index to example indexes through per-epoch permutations seeded by
(seed, epoch), so a run resumed at step s sees exactly what an uninterrupted run sees.
Rule 2: bad data is refused before a run starts, naming the file and the line: empty,
not UTF-8 (see `corpus.read_text`), a label outside the label set, too few examples.
Rule 3: language-model text is split into paragraphs; training packs them into one stream
(each followed by the end-of-sequence id) cut into windows that start from the
beginning-of-sequence id; validation scores each paragraph alone, "[BOS] p [EOS]",
exactly as the n-gram baseline (bench/lm_baseline.py) does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import is_validation, paragraphs, read_text
from .errors import DataError
from .tokenizer import TextTokenizer
from .training import IGNORE, lm_examples

MAX_LABELS = 1000
MAX_TEXT_CHARS = 20_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Examples:
    """Inputs (N, T) int64, targets (N, T) or (N,) int64 (IGNORE = no loss), and for
    padded encoder inputs the (N, T) bool mask of real tokens."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError("inputs and targets must hold the same number of examples")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def take(self, rows: Sequence[int]) -> Examples:
        index = torch.tensor(list(rows), dtype=torch.long)
        mask = None if self.mask is None else self.mask[index]
        return Examples(inputs=self.inputs[index], targets=self.targets[index], mask=mask)

    def target_count(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class Dataset:
    """A training set, its validation set, what they were made from, and (classification)
    the label names in class-id order."""

    train: Examples
    validation: Examples
    digest: str  # BLAKE2b-128 of the source bytes: recorded in the trained model's manifest
    labels: tuple[str, ...] = ()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def special_ids(tok: TextTokenizer) -> tuple[int, int]:
    """(bos, eos) ids of a BERT-style vocabulary: [CLS] and [SEP].

    Raises:
        DataError: the tokenizer has neither.
    """
    bos, eos = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if bos is None or eos is None:
        raise DataError("the model's tokenizer has no [CLS]/[SEP] tokens to mark sequences")
    return bos, eos


def lm_dataset(
    text: str,
    tok: TextTokenizer,
    *,
    length: int,
    digest: str,
    validation_text: str | None = None,
    max_validation: int = 2000,
) -> Dataset:
    """Causal-LM examples of `length` tokens from `text` (module Rule 3).

    Args:
        validation_text: held-out text; None splits `text` by `corpus.is_validation`.
        max_validation: at most this many validation paragraphs (the first ones).

    Raises:
        DataError: too little text for one training window or one validation paragraph.
    """
    bos, eos = special_ids(tok)
    paras = paragraphs(text)
    if validation_text is None:
        train_p = [p for p in paras if not is_validation(p)]
        val_p = [p for p in paras if is_validation(p)]
    else:
        train_p, val_p = paras, paragraphs(validation_text)
    stream: list[int] = []
    for ids in tok.encode_untruncated(train_p):
        stream.extend(ids)
        stream.append(eos)
    pairs = list(lm_examples(stream, length, bos))
    if not pairs:
        raise DataError(
            f"training text has {len(stream)} tokens: fewer than one window of "
            f"{length}; give more text or a smaller --seq-len"
        )
    train = Examples(
        inputs=torch.tensor([p[0] for p in pairs], dtype=torch.long),
        targets=torch.tensor([p[1] for p in pairs], dtype=torch.long),
    )
    val_ids = tok.encode_untruncated(val_p[:max_validation])
    if not val_ids:
        raise DataError("no validation paragraphs: give a longer text or --validation FILE")
    return Dataset(
        train=train, validation=paragraph_examples(val_ids, length, bos, eos), digest=digest
    )


def paragraph_examples(paras: Sequence[Sequence[int]], length: int, bos: int, eos: int) -> Examples:
    """One example per paragraph: input "[BOS] p", target "p [EOS]", truncated to `length`
    and right-padded (targets IGNORE there; causal attention never looks right)."""
    inputs = torch.zeros((len(paras), length), dtype=torch.long)
    targets = torch.full((len(paras), length), IGNORE, dtype=torch.long)
    for i, p in enumerate(paras):
        seq = [bos, *p, eos][: length + 1]
        n = len(seq) - 1
        inputs[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
    return Examples(inputs=inputs, targets=targets)


def read_labelled(path: Path) -> list[tuple[str, str, str | None]]:
    """(text, label, split or None) rows of a .jsonl/.csv (optionally .xz) file.

    JSON lines hold {"text": str, "label": str, "split"?: "train"|"validation"}; a CSV has a
    header with `text` and `label` columns (and optionally `split`).

    Raises:
        DataError: unreadable, empty, not UTF-8, a row without text or label (the line
            is named).
    """
    raw = read_text(path)
    kind = path.name.removesuffix(".xz").rsplit(".", 1)[-1]
    rows = _rows_jsonl(raw, path) if kind == "jsonl" else _rows_csv(raw, path)
    if not rows:
        raise DataError(f"{path}: no labelled rows")
    return rows


def _row(text: object, label: object, split: object, where: str) -> tuple[str, str, str | None]:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
        raise DataError(
            f"{where}: `text` must be a non-empty string of at most {MAX_TEXT_CHARS} characters"
        )
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{where}: `label` must be a non-empty string")
    if split in (None, ""):
        return text, label.strip(), None
    if split not in ("train", "validation"):
        raise DataError(f"{where}: `split` must be train or validation, got {split!r}")
    return text, label.strip(), str(split)


def _rows_jsonl(raw: str, path: Path) -> list[tuple[str, str, str | None]]:
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected an object with text and label")
        rows.append(_row(obj.get("text"), obj.get("label"), obj.get("split"), f"{path}:{n}"))
    return rows


def _rows_csv(raw: str, path: Path) -> list[tuple[str, str, str | None]]:
    reader = csv.DictReader(io.StringIO(raw))
    if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
        raise DataError(f"{path}: a CSV needs a header with `text` and `label` columns")
    return [
        _row(r.get("text"), r.get("label"), r.get("split"), f"{path}:{n + 2}")
        for n, r in enumerate(reader)
    ]


def classify_dataset(
    rows: Sequence[tuple[str, str, str | None]],
    tok: TextTokenizer,
    *,
    digest: str,
    labels: Sequence[str] | None = None,
) -> Dataset:
    """Encoded, padded examples with class ids; the split is each row's own, else
    `corpus.is_validation` of its text.

    Raises:
        DataError: fewer than 2 labels, more than MAX_LABELS, a validation label not among
            the training labels (or `labels` given and a row outside it), an empty split.
    """
    train = [(t, lab) for t, lab, s in rows if (s or _split_of(t)) == "train"]
    val = [(t, lab) for t, lab, s in rows if (s or _split_of(t)) == "validation"]
    names = tuple(labels) if labels is not None else tuple(sorted({lab for _, lab in train}))
    if not 2 <= len(names) <= MAX_LABELS:
        raise DataError(f"expected 2..{MAX_LABELS} labels, got {len(names)}")
    known = set(names)
    for part, where in ((train, "train"), (val, "validation")):
        stray = sorted({lab for _, lab in part} - known)
        if stray:
            raise DataError(
                f"{where} rows have labels not in the label set {list(names)}: {stray[:5]}"
            )
        if not part:
            raise DataError(f"the {where} split is empty")
    ids = {name: i for i, name in enumerate(names)}
    return Dataset(
        train=_encode_labelled(train, tok, ids),
        validation=_encode_labelled(val, tok, ids),
        digest=digest,
        labels=names,
    )


def _split_of(text: str) -> str:
    return "validation" if is_validation(text.strip()) else "train"


def _encode_labelled(
    rows: Sequence[tuple[str, str]], tok: TextTokenizer, ids: dict[str, int]
) -> Examples:
    batch = tok.encode_batch([t for t, _ in rows])
    return Examples(
        inputs=batch.ids,
        targets=torch.tensor([ids[lab] for _, lab in rows]),
        mask=batch.attention_mask.bool(),
    )


class Order:
    """Which examples micro-batch j of a run holds (module Rule 1)."""

    def __init__(self, n_examples: int, micro_batch: int, seed: int) -> None:
        if n_examples < 1 or micro_batch < 1:
            raise ValueError(
                f"need >= 1 example and micro-batch size, got {n_examples}, {micro_batch}"
            )
        self.n, self.b, self.seed = n_examples, micro_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def rows(self, j: int) -> list[int]:
        """Example indexes of global micro-batch j (epochs follow each other seamlessly)."""
        out = []
        for pos in range(j * self.b, (j + 1) * self.b):
            epoch, i = divmod(pos, self.n)
            out.append(self._perm(epoch)[i])
        return out

    def epoch_of(self, j: int) -> float:
        return j * self.b / self.n
