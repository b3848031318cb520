"""Local embedding jobs: texts -> L2-normalised sentence embeddings, in batches.

Rule 1: the model must end in a POOLING atom; anything else is `UnsupportedOperation`.
Rule 2: texts are grouped by length (longest first, like sentence-transformers) so batches
carry little padding; results come back in the caller's order, as float32 (N, C).
Rule 3: `embedding_context` builds the `ForwardContext` every span of an embedding job
needs (positions, pad mask, token types), so a distributed run uses the same one per hop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .atom import ForwardContext, IOKind
from .errors import UnsupportedOperation

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .model import Model
    from .span import Span
    from .tokenizer import TokenBatch


def embedding_context(batch: TokenBatch) -> ForwardContext:
    """The context for one batch: positions 0..T-1, its pad mask, its token type ids."""
    b, t = batch.ids.shape
    ctx = ForwardContext.for_tokens(b, t, pad_mask=batch.pad_mask)
    ctx.extras["token_type_ids"] = batch.type_ids
    return ctx


def embed_batch(span: Span, batch: TokenBatch) -> torch.Tensor:
    """Run a whole ids -> pooled span on one token batch, without autograd.

    Returns:
        (B, C) float32 embeddings.
    """
    with torch.inference_mode():
        out: torch.Tensor = span(batch.ids, embedding_context(batch))
    return out.float()


def embed_texts(model: Model, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Embed texts with the whole model in this process.

    Args:
        model: a text model whose atoms go ids -> ... -> pooled (e.g. `load_minilm()`).
        texts: the sentences.
        batch_size: texts per forward.

    Returns:
        (len(texts), C) float32, row i for texts[i].

    Raises:
        UnsupportedOperation: the model has no tokenizer or does not end in pooling.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    span = model.span()
    if (
        model.tokenizer is None
        or span.in_kind is not IOKind.IDS
        or span.out_kind is not IOKind.POOLED
    ):
        raise UnsupportedOperation(
            f"model {model.model_id} cannot embed text: needs a tokenizer and ids -> pooled atoms, "
            f"has {span.in_kind.value} -> {span.out_kind.value}"
        )
    width = model.atoms[-1].spec.dim("hidden")
    out = torch.empty((len(texts), width), dtype=torch.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        batch = model.tokenizer.encode_batch([texts[i] for i in rows])
        out[rows] = embed_batch(span, batch)
    return out
