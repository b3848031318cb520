"""Baseline: an interpolated Kneser-Ney 3-gram language model over MiniLM WordPiece tokens.

    python -m bench.lm_baseline        # ~5 s; prints one JSON object

The figure any neural generator trained on the shipped corpus has to beat: per-token
perplexity on the validation split (`atoms.corpus`), with the same tokens and the same
sequences the neural model is evaluated on.

Rule 1 (sequences): one sequence per paragraph, tokenised by the bundled MiniLM tokenizer
(uncased WordPiece, 30522 ids, no truncation): `[CLS] t1 ... tn [SEP]`. `[CLS]` is the
given start (BOS) and is never scored; every later id is, `[SEP]` (EOS) included, so a
paragraph of n WordPieces scores n + 1 tokens. Perplexity = exp(mean negative natural log
probability over all scored tokens of all sequences).
Rule 2 (model): interpolated Kneser-Ney (Chen & Goodman 1998), trigram counts at the top,
continuation counts below, then a uniform distribution over the whole vocabulary, so no
token ever has probability 0 and any context, seen or not, gets a distribution summing to
1. The first scored token's context is (BOS, BOS): the start id is repeated as left padding.
Discounts: "modified" KN by default (D1, D2, D3+ per order from counts of counts), or one
fixed discount (e.g. 0.75) for every order when `discount` is given.
Rule 3 (unigram): the add-one unigram over the scored training tokens and the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from atoms.corpus import corpus_text, paragraphs
from atoms.minilm import minilm_dir
from atoms.tokenizer import TextTokenizer

MAX_PARAGRAPH_TOKENS = 1 << 16  # far above the corpus's longest paragraph (~3.5k)
FALLBACK_DISCOUNT = 0.75


def load_tokenizer() -> TextTokenizer:
    """The bundled MiniLM WordPiece tokenizer, truncating nothing a paragraph can hold."""
    return TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=MAX_PARAGRAPH_TOKENS)


def tokenize_paragraphs(text: str, tokenizer: TextTokenizer | None = None) -> list[list[int]]:
    """One `[CLS] ... [SEP]` id sequence per paragraph of `text` (module Rule 1).

    Raises:
        ValueError: a paragraph long enough to be truncated.
    """
    tok = tokenizer or load_tokenizer()
    seqs = []
    for i, para in enumerate(paragraphs(text)):
        ids = tok.encode(para)
        if len(ids) >= tok.max_length:
            raise ValueError(f"paragraph {i}: {len(ids)} tokens reach the {tok.max_length} limit")
        seqs.append(ids)
    return seqs


def _check(seqs: Sequence[Sequence[int]], vocab_size: int) -> None:
    for i, seq in enumerate(seqs):
        if len(seq) < 2:
            raise ValueError(
                f"sequence {i}: expected BOS and at least one scored token, got {list(seq)}"
            )
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sequence {i}: ids {bad[:3]} outside the vocabulary of {vocab_size}")


def _scored(seqs: Iterable[Sequence[int]]) -> Iterable[tuple[int, int, int]]:
    """(u, v, w) for every scored token w with its two-token context (module Rule 2)."""
    for seq in seqs:
        u, v = seq[0], seq[0]
        for w in seq[1:]:
            yield u, v, w
            u, v = v, w


def _discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """Modified-KN discounts (D1, D2, D3+) from counts of counts; 0.75 each when degenerate."""
    n = Counter(c for c in counts if c <= 4)
    n1, n2, n3, n4 = n[1], n[2], n[3], n[4]
    if min(n1, n2, n3, n4) == 0:
        return (FALLBACK_DISCOUNT,) * 3
    y = n1 / (n1 + 2 * n2)
    ds = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if not all(0 < d <= k for d, k in zip(ds, (1, 2, 3), strict=True)):
        return (FALLBACK_DISCOUNT,) * 3
    return ds


class _Level:
    """One order's counts by (context, token) and, per context, (total, discounted mass)."""

    def __init__(self, counts: Mapping[tuple[int, ...], int], discount: float | None) -> None:
        self.counts = counts
        d = (discount,) * 3 if discount is not None else _discounts(counts.values())
        self.d = d
        self.context: dict[tuple[int, ...], list[float]] = {}
        for key, c in counts.items():
            entry = self.context.setdefault(key[:-1], [0.0, 0.0])
            entry[0] += c
            entry[1] += d[min(c, 3) - 1]

    def interpolate(self, key: tuple[int, ...], lower: float) -> float:
        """P(w | context) = (max(c - D(c), 0) + gamma * lower) / total, or `lower` if unseen."""
        entry = self.context.get(key[:-1])
        if entry is None:
            return lower
        total, mass = entry
        c = self.counts.get(key, 0)
        own = max(c - self.d[min(c, 3) - 1], 0.0) if c else 0.0
        return (own + mass * lower) / total


class KneserNey3:
    """Interpolated Kneser-Ney trigram model over token ids `0 .. vocab_size - 1`.

    Args:
        vocab_size: the id range; the uniform floor spreads over all of it.
        discount: one discount for every order (plain interpolated KN), or None for
            modified KN's per-order D1, D2, D3+ (module Rule 2).
    """

    def __init__(self, vocab_size: int = 30522, *, discount: float | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if discount is not None and not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.vocab_size = vocab_size
        self.discount = discount
        self._levels: tuple[_Level, _Level, _Level] | None = None

    def fit(self, seqs: Sequence[Sequence[int]]) -> KneserNey3:
        """Count trigrams, bigram and unigram continuations of the scored tokens."""
        _check(seqs, self.vocab_size)
        tri: Counter[tuple[int, ...]] = Counter(_scored(seqs))
        bi: Counter[tuple[int, ...]] = Counter(k[1:] for k in tri)  # distinct u before (v, w)
        uni: Counter[tuple[int, ...]] = Counter(k[1:] for k in bi)  # distinct v before w
        self._levels = (
            _Level(uni, self.discount),
            _Level(bi, self.discount),
            _Level(tri, self.discount),
        )
        return self

    def prob(self, u: int, v: int, w: int) -> float:
        """P(w | u v); never 0 for an id in the vocabulary."""
        if self._levels is None:
            raise RuntimeError("KneserNey3.prob before fit")
        uni, bi, tri = self._levels
        p = uni.interpolate((w,), 1.0 / self.vocab_size)
        p = bi.interpolate((v, w), p)
        return tri.interpolate((u, v, w), p)

    def perplexity(self, seqs: Sequence[Sequence[int]]) -> float:
        """Per-token perplexity over every scored token of `seqs` (module Rule 1)."""
        _check(seqs, self.vocab_size)
        nll, n = 0.0, 0
        for u, v, w in _scored(seqs):
            nll -= math.log(self.prob(u, v, w))
            n += 1
        return math.exp(nll / n)

    @property
    def discounts(self) -> dict[str, tuple[float, float, float]]:
        if self._levels is None:
            raise RuntimeError("KneserNey3.discounts before fit")
        return {name: lvl.d for name, lvl in zip(("1", "2", "3"), self._levels, strict=True)}


class AddOneUnigram:
    """P(w) = (count(w) + 1) / (N + vocab_size) over the scored training tokens."""

    def __init__(self, vocab_size: int = 30522) -> None:
        self.vocab_size = vocab_size
        self.counts: Counter[int] = Counter()
        self.total = 0

    def fit(self, seqs: Sequence[Sequence[int]]) -> AddOneUnigram:
        _check(seqs, self.vocab_size)
        self.counts = Counter(w for seq in seqs for w in seq[1:])
        self.total = sum(self.counts.values())
        return self

    def prob(self, w: int) -> float:
        return (self.counts.get(w, 0) + 1) / (self.total + self.vocab_size)

    def perplexity(self, seqs: Sequence[Sequence[int]]) -> float:
        _check(seqs, self.vocab_size)
        scored = [w for seq in seqs for w in seq[1:]]
        return math.exp(-sum(math.log(self.prob(w)) for w in scored) / len(scored))


def scored_tokens(seqs: Sequence[Sequence[int]]) -> int:
    return sum(len(s) - 1 for s in seqs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--discount",
        type=float,
        default=None,
        help="one KN discount for every order (default: modified KN)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tok = load_tokenizer()
    train = tokenize_paragraphs(corpus_text("train"), tok)
    val = tokenize_paragraphs(corpus_text("validation"), tok)
    kn = KneserNey3(tok.vocab_size, discount=args.discount).fit(train)
    unigram = AddOneUnigram(tok.vocab_size).fit(train)
    doc = {
        "kn3_val_ppl": round(kn.perplexity(val), 3),
        "unigram_val_ppl": round(unigram.perplexity(val), 3),
        "train_tokens": scored_tokens(train),
        "val_tokens": scored_tokens(val),
        "train_paragraphs": len(train),
        "val_paragraphs": len(val),
        "vocab_size": tok.vocab_size,
        "kn3_discounts": {k: [round(d, 4) for d in v] for k, v in kn.discounts.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    sys.stdout.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
