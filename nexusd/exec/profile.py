"""A host's measured compute profile: seconds per atom of a one-token step, per model.

Rule 1: measured, never assumed: a span is timed when it is loaded (`measure_step`, after
the warm-up pass, so torch's first-call costs are not counted) and every real step that
is decode-shaped (at most `DECODE_TOKENS` batch x tokens) updates a smoothed figure.
Rule 2: the figure is per atom: a step's compute seconds over the atoms it ran, so spans
of different lengths of the same model share one figure.
Rule 3: the figure measured at load is kept apart (`capacity`): placement goes by it (what
the device can do), routing by the smoothed live figure (what it does now, busy or not).
"""

from __future__ import annotations

import time

import torch

from atoms.atom import ForwardContext, IOKind
from atoms.span import Span

DECODE_TOKENS = 8  # batch x tokens of a step that counts as decode-shaped
SMOOTHING = 0.2  # weight of a new step in the moving average
MEASURE_PASSES = 3  # timed passes at load: the median is kept


class ComputeProfile:
    """Smoothed seconds per atom of a decode-shaped step, per model."""

    def __init__(self) -> None:
        self._s_per_atom: dict[str, float] = {}
        self._at_load: dict[str, float] = {}
        self.samples: dict[str, int] = {}

    def __repr__(self) -> str:
        figures = ", ".join(f"{m}={s * 1e3:.3f}ms" for m, s in sorted(self._s_per_atom.items()))
        return f"ComputeProfile({figures})"

    def seed(self, model_id: str, s_per_atom: float) -> None:
        """A figure measured at load: the capacity; also the live figure until real steps
        have been timed."""
        if s_per_atom <= 0:
            return
        self._at_load[model_id] = s_per_atom
        if self.samples.get(model_id, 0) == 0:
            self._s_per_atom[model_id] = s_per_atom

    def observe(self, model_id: str, n_atoms: int, tokens: int, compute_s: float) -> None:
        """One real step of `tokens` (batch x tokens) through `n_atoms` atoms."""
        if n_atoms < 1 or tokens > DECODE_TOKENS or not compute_s > 0:
            return
        x = compute_s / n_atoms
        old = self._s_per_atom.get(model_id)
        self._s_per_atom[model_id] = x if old is None else old + SMOOTHING * (x - old)
        self.samples[model_id] = self.samples.get(model_id, 0) + 1

    def get(self, model_id: str) -> float | None:
        """Seconds per atom for `model_id`, None before any measure."""
        return self._s_per_atom.get(model_id)

    def capacity(self, model_id: str) -> float | None:
        """Seconds per atom measured when `model_id`'s span was last loaded."""
        return self._at_load.get(model_id)


def measure_step(span: Span) -> float:
    """Seconds per atom of a one-token step through `span` (median of a few passes; run
    it after `hosting.warm_up`). 0.0 for spans whose input is not ids, hidden states or
    pooled vectors (image spans are not timed)."""
    first = span.atom_list()[0]
    width = first.input_width() or 1
    dtype = first.spec.torch_dtype
    kind = span.in_kind
    if kind is IOKind.IDS:
        x = torch.zeros((1, 1), dtype=torch.long)
    elif kind is IOKind.HIDDEN:
        x = torch.zeros((1, 1, width), dtype=dtype)
    elif kind is IOKind.POOLED:
        x = torch.zeros((1, width), dtype=dtype)
    else:
        return 0.0
    times = []
    with torch.inference_mode():
        for _ in range(MEASURE_PASSES):
            t0 = time.perf_counter()
            span(x, ForwardContext.for_tokens(1, 1))
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / len(span.atom_list())
