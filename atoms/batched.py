"""One forward for the decode steps of several sessions (a host's step batch).

Rule 1: only steps of ONE new token per row are batched (decoding, the common concurrent
case): their rows are concatenated, so every Linear, norm and feed-forward of the span runs
once over all sessions' rows (one read of the weights instead of one per session).
Rule 2: attention stays per session: each row attends to its own session's pages only
(`kv_pool.PagedBatch`), padded to the longest row with the pad page and masked, so a row
sees exactly the keys it would see alone.
Rule 3: the result equals the unbatched steps up to fp32 rounding (a matrix product over R
rows may sum in another order than over one; masked keys add exact zeros):
tests/unit/atoms/test_kv_pool.py bounds the difference, README "Benchmarks" states it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .atom import ForwardContext
from .kv_pool import PagedBatch, PagedCache

if TYPE_CHECKING:
    from .span import Span

# max |batched - alone| / max |alone| over a step's output, float32 (measured: 3e-7 on the
# tiny BERT, Nexus and Llama spans of the tests; fp32 epsilon is 1.2e-7)
BATCH_RTOL = 1e-5


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One session's step as the batch sees it.

    Args:
        x: (B_i, 1, ...) the span's input for one new token per row (already checked).
        position: the new token's position (= tokens already cached; 0 without a cache).
        causal: the step's causal flag (a batch has one value).
        pad_mask: (B_i, position + 1) bool, True where a token is real; None: all real.
        cache: the session's paged cache, or None for a span without KV layers.
    """

    x: torch.Tensor
    position: int
    causal: bool
    pad_mask: torch.Tensor | None
    cache: PagedCache | None


def batchable(item: BatchItem) -> bool:
    """Whether a step can join a batch: one token per row, and a cache length that matches
    (a span without KV layers, e.g. an output head, batches at any position unpadded)."""
    if item.x.dim() < 2 or item.x.shape[1] != 1:
        return False
    if item.cache is None:
        return item.pad_mask is None
    return item.cache.length == item.position and item.cache.batch == item.x.shape[0]


def batch_key(item: BatchItem) -> tuple[object, ...]:
    """Steps with equal keys may run together (same input shape and dtype, causal flag, and
    cache kind); the span is the caller's part of the key."""
    return (tuple(item.x.shape[1:]), item.x.dtype, item.causal, item.cache is None)


def _pad_rows(items: list[BatchItem], length: int) -> torch.Tensor | None:
    """(R, length) key mask: each item's own mask, then False up to `length`."""
    if all(it.pad_mask is None and it.position + 1 == length for it in items):
        return None
    parts = []
    for it in items:
        rows, own = it.x.shape[0], it.position + 1
        part = torch.zeros((rows, length), dtype=torch.bool)
        part[:, :own] = True if it.pad_mask is None else it.pad_mask.bool()
        parts.append(part)
    return torch.cat(parts)


def run_batched(span: Span, items: list[BatchItem]) -> list[torch.Tensor]:
    """Run one decode step of every item through `span` as one batch.

    Args:
        span: the span all items' sessions run on.
        items: `batchable` steps with one `batch_key`; caches all of one pool and format.

    Returns:
        Each item's output, in order, as its own step would give it (up to fp32 rounding).

    Raises:
        AtomError: invalid input or a full pool (the caller retries items one by one).
    """
    caches = [it.cache for it in items if it.cache is not None]
    if caches and len(caches) != len(items):
        raise ValueError("a batch mixes steps with and without a KV cache")
    rows = [it.x.shape[0] for it in items]
    positions = torch.cat(
        [torch.full((r, 1), it.position) for r, it in zip(rows, items, strict=True)]
    )
    length = max(it.position for it in items) + 1
    ctx = ForwardContext(
        positions=positions,  # (R, 1)
        pad_mask=_pad_rows(items, length) if caches else None,  # (R, L) or None
        causal=items[0].causal,
        cache=PagedBatch(caches) if caches else None,
    )
    out = span(torch.cat([it.x for it in items]), ctx, check=False)  # (R, 1, ...)
    return list(out.split(rows))
