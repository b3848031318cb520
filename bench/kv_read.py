"""Micro-benchmark: what one attention layer pays per decode step to store and read a
session's keys and values, by cache kind (issue #15: the paged pool's per-step gather).

Rule 1: prints exactly one JSON object; one torch thread, like the daemons; figures are the
minimum over `--repeat` timed steps (noise on a shared machine only adds time).
Rule 2: no daemon, no network: the caches of `atoms.cache` and `atoms.kv_pool` alone, with
one session of one row holding `--lengths` cached tokens, and a decode step of one token.

Kinds, per layer and step: `contiguous` (the per-session cache: append returns a view),
`gather` (a page-major pool, every step an index copy of the row's pages: the pool before
issue #15 item 1), `in_place` (a layer-major pool whose row is a run of pages: a strided
view, the common case now) and `fragmented` (a layer-major pool whose row's pages are not
consecutive: the gather again). `append_us` is the cache's append (store + read back),
`attention_us` adds the scaled-dot-product attention of the one new query over the result
(strided keys may make attention itself slower: this says whether they do).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from atoms.atom import ForwardContext
from atoms.cache import KVLayout, LayerCache, SessionCache
from atoms.kv_pool import KVPool, PagedCache, PageFormat, pool_shape

from .common import emit_json, rounded

HEADS, HEAD_DIM, LAYERS = 12, 32, 8  # Nexus 1.1's attention layers (12 x 32, fp32)
PAGE_TOKENS = 8  # [atoms] kv_page_tokens default
KINDS = ("contiguous", "gather", "in_place", "fragmented")

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _paged(kind: str, length: int, steps: int) -> tuple[Step, Callable[[], None]]:
    """A paged session of `length` cached tokens, as `kind` lays it out; its layer 0's
    append and a reset to `length` tokens."""
    layout = KVLayout(HEADS, HEAD_DIM, torch.float32)
    fmt = PageFormat.of({i: (f"m/{i:03d}", layout) for i in range(LAYERS)}, PAGE_TOKENS)
    page_bytes, stripe = pool_shape([fmt])
    pages = 4 * (-(-(length + steps) // PAGE_TOKENS) + 1)
    pool = KVPool(page_bytes=page_bytes, pages=pages, stripe=None if kind == "gather" else stripe)
    max_len = length + steps
    cache = PagedCache(pool, fmt, batch=1, max_len=max_len)
    other = PagedCache(pool, fmt, batch=1, max_len=pages * PAGE_TOKENS)
    for t in range(0, max_len, PAGE_TOKENS):  # interleaved growth when fragmented
        if kind == "fragmented":
            other.reserve(t + 1)
        cache.reserve(t + 1)
    kv = torch.randn((1, HEADS, length, HEAD_DIM))
    for slot in fmt.layers:
        cache.layer(slot.index).append(kv, kv)
    assert (cache.run(cache.pages) is None) == (kind == "fragmented")

    def reset() -> None:
        cache.lengths = dict.fromkeys(cache.lengths, length)

    return cache.layer(fmt.layers[0].index).append, reset


def _contiguous(length: int, steps: int) -> tuple[Step, Callable[[], None]]:
    layer = LayerCache("m/000", KVLayout(HEADS, HEAD_DIM, torch.float32), 1, length + steps)
    layer.append(*(torch.randn((1, HEADS, length, HEAD_DIM)),) * 2)

    def reset() -> None:
        layer.length = length

    return layer.append, reset


def measure(kind: str, length: int, repeat: int) -> dict[str, float]:
    """Minimum microseconds of one append, and of one append + attention."""
    append, reset = _contiguous(length, 1) if kind == "contiguous" else _paged(kind, length, 1)
    q = torch.randn((1, HEADS, 1, HEAD_DIM))
    k_new, v_new = torch.randn((1, HEADS, 1, HEAD_DIM)), torch.randn((1, HEADS, 1, HEAD_DIM))
    best = {"append_us": float("inf"), "attention_us": float("inf")}
    with torch.inference_mode():
        for _ in range(repeat):
            reset()
            t0 = time.perf_counter()
            append(k_new, v_new)
            best["append_us"] = min(best["append_us"], time.perf_counter() - t0)
            reset()
            t0 = time.perf_counter()
            k, v = append(k_new, v_new)
            F.scaled_dot_product_attention(q, k, v)
            best["attention_us"] = min(best["attention_us"], time.perf_counter() - t0)
    return {key: rounded(s * 1e6, 1) for key, s in best.items()}


def model_steps(length: int, repeat: int) -> dict[str, float]:
    """Milliseconds of one whole-model decode step of Nexus 1.1 (untrained blocks, one row,
    `length` cached tokens) per cache kind, rounds interleaved, minimum over `repeat`."""
    from nexusd.harness.demo import default_models_dir
    from nexusd.model_registry import ModelRegistry

    from .generate import BENCH_MODEL

    registry = ModelRegistry(default_models_dir())
    span = registry.load_span(BENCH_MODEL, 0, registry.info(BENCH_MODEL).n_atoms)
    fmt = PageFormat.of(span.kv_layouts(), PAGE_TOKENS)
    page_bytes, stripe = pool_shape([fmt])
    caches: dict[str, object] = {
        "contiguous": SessionCache.allocate(
            span.kv_layouts(), batch=1, max_len=length + 1, budget_bytes=1 << 40
        )
    }
    for kind, cut in (("gather", None), ("in_place", stripe)):
        pool = KVPool(page_bytes=page_bytes, pages=length // PAGE_TOKENS + 2, stripe=cut)
        caches[kind] = PagedCache(pool, fmt, batch=1, max_len=length + 1)
    best = dict.fromkeys(caches, float("inf"))
    with torch.inference_mode():
        for cache in caches.values():
            ids = torch.ones((1, length), dtype=torch.long)
            span(ids, ForwardContext.for_tokens(1, length, causal=True, cache=cache))  # type: ignore[arg-type]
        for _ in range(repeat):
            for kind, cache in caches.items():
                for layer in range(len(fmt.layers)):  # back to `length` tokens
                    _truncate(cache, fmt.layers[layer].index, length)
                ctx = ForwardContext.for_tokens(1, 1, start=length, causal=True, cache=cache)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                span(torch.ones((1, 1), dtype=torch.long), ctx)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    return {kind: rounded(s * 1e3, 3) for kind, s in best.items()}


def _truncate(cache: object, index: int, length: int) -> None:
    if isinstance(cache, PagedCache):
        cache.lengths[index] = length
    elif isinstance(cache, SessionCache):
        cache.layer(index).length = length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 200, 500])
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--model-repeat", type=int, default=30, help="0: skip the model steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for length in args.lengths:
        row: dict[str, object] = {"cached_tokens": length}
        for kind in KINDS:
            row[kind] = measure(kind, length, args.repeat)
        rows.append(row)
    emit_json(
        {
            "bench": "kv_read",
            "layer": f"{HEADS} heads x {HEAD_DIM} dims fp32, pages of {PAGE_TOKENS} tokens",
            "repeat": args.repeat,
            "per_layer_step": rows,
            "nexus_1_1_decode_step_ms": {
                str(n): model_steps(n, args.model_repeat) for n in args.lengths
            }
            if args.model_repeat
            else {},
        }
    )


if __name__ == "__main__":
    main()
