"""The Kneser-Ney 3-gram baseline (bench/lm_baseline.py): hand-checked values, normalisation
over the whole vocabulary, and the tokenisation the neural model is evaluated with."""

from __future__ import annotations

import math
import random

import pytest

from bench.lm_baseline import (
    AddOneUnigram,
    KneserNey3,
    load_tokenizer,
    scored_tokens,
    tokenize_paragraphs,
)

TEXT = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the surrounding families.

Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in
my purse, and nothing particular to interest me on shore, I thought I would sail about a little.

It is a truth that a single man must be in want of a wife, and that the sea is wide."""

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def seqs() -> list[list[int]]:
    return tokenize_paragraphs(TEXT, load_tokenizer())


def test_one_sequence_per_paragraph_from_cls_to_sep(seqs: list[list[int]]) -> None:
    assert len(seqs) == 4
    for seq in seqs:
        assert seq[0] == CLS
        assert seq[-1] == SEP
        assert CLS not in seq[1:] and SEP not in seq[:-1]
    assert scored_tokens(seqs) == sum(len(s) for s in seqs) - 4


def test_plain_kn_matches_the_hand_computed_values() -> None:
    # one sequence 1 2 3 over 5 ids, D = 0.75; scored trigrams (1,1,2) and (1,2,3)
    kn = KneserNey3(5, discount=0.75).fit([[1, 2, 3]])
    p1_3 = (0.25 + 1.5 / 5) / 2  # continuation counts: 2 -> 1, 3 -> 1
    p2_3 = 0.25 + 0.75 * p1_3  # context (2): one continuation type
    assert kn.prob(1, 2, 3) == pytest.approx(0.25 + 0.75 * p2_3)
    assert kn.prob(4, 4, 3) == pytest.approx(p1_3)  # unseen context: the unigram level
    assert kn.prob(4, 4, 0) == pytest.approx(1.5 / 5 / 2)  # unseen token: the uniform floor
    assert sum(kn.prob(1, 2, w) for w in range(5)) == pytest.approx(1.0)


@pytest.mark.parametrize("discount", [None, 0.75])
def test_every_context_is_a_distribution_over_the_vocabulary(
    seqs: list[list[int]], discount: float | None
) -> None:
    kn = KneserNey3(30522, discount=discount).fit(seqs)
    first = seqs[0]
    contexts = [
        (CLS, CLS),  # sequence start
        (first[1], first[2]),  # a seen trigram context
        (7592, first[5]),  # a seen last token after an unseen one
        (3, 7),  # never seen
    ]
    for u, v in contexts:
        probs = [kn.prob(u, v, w) for w in range(30522)]
        assert min(probs) > 0
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-9)


def test_training_text_is_likelier_than_the_same_tokens_shuffled(seqs: list[list[int]]) -> None:
    rng = random.Random(0)
    shuffled = []
    for seq in seqs:
        middle = seq[1:-1]
        rng.shuffle(middle)
        shuffled.append([CLS, *middle, SEP])
    kn = KneserNey3().fit(seqs)
    assert kn.perplexity(seqs) < kn.perplexity(shuffled) / 2
    unigram = AddOneUnigram().fit(seqs)
    assert unigram.perplexity(seqs) == pytest.approx(unigram.perplexity(shuffled))
    assert kn.perplexity(seqs) < unigram.perplexity(seqs)


def test_add_one_unigram_by_hand() -> None:
    uni = AddOneUnigram(5).fit([[1, 2, 3]])
    assert uni.prob(2) == pytest.approx(2 / 7)
    assert uni.prob(0) == pytest.approx(1 / 7)
    assert uni.perplexity([[1, 2, 3]]) == pytest.approx(3.5)


@pytest.mark.parametrize(
    ("bad", "match"),
    [([[1]], "at least one scored token"), ([[1, 9]], "outside the vocabulary")],
)
def test_bad_sequences_are_refused(bad: list[list[int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KneserNey3(5).fit(bad)
    with pytest.raises(ValueError, match=match):
        AddOneUnigram(5).perplexity(bad)
