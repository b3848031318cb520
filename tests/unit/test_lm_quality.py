"""bench/lm_quality's sliding windows score every target once, with its true context."""

from __future__ import annotations

from atoms.training import IGNORE
from bench.lm_quality import strided_examples


def test_every_target_is_scored_once_after_its_own_context() -> None:
    seqs = [list(range(10, 10 + n)) for n in (3, 9, 20, 25)]
    ex = strided_examples(seqs, 6, bos=1, eos=2)
    scored = []
    for x, y in zip(ex.inputs.tolist(), ex.targets.tolist(), strict=True):
        for i, t in enumerate(y):
            if t == IGNORE:
                continue
            scored.append(t)
            ctx = x[1 : i + 1]  # what the model saw before predicting t (after [BOS])
            assert any(
                [*s, 2][j : j + len(ctx) + 1] == [*ctx, t] for s in seqs for j in range(len(s) + 1)
            ), (ctx, t)
            assert len(x[: i + 1]) <= 6
    assert sorted(scored) == sorted(t for s in seqs for t in [*s, 2])
