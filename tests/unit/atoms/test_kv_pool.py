"""The paged KV pool (atoms.kv_pool) and batched decode steps (atoms.batched)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms import bert, nexus
from atoms.atom import ForwardContext, IOKind
from atoms.batched import BATCH_RTOL, BatchItem, batchable, run_batched
from atoms.cache import KVLayout, SessionCache
from atoms.errors import CacheExhausted, CacheNotReady
from atoms.kv_alloc import HELD, PageAllocator
from atoms.kv_pool import (
    PAD_PAGE,
    KVPool,
    PagedCache,
    PageFormat,
    gather_rows,
    page_table,
    pool_shape,
)
from atoms.span import Span
from tests.unit.exec_fixtures import tiny_llama

VOCAB, WIDTH = 97, 32


def tiny_bert() -> Span:
    cfg = bert.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return Span(bert.random_bert(cfg, model_id="b", seed=0, pooling=False).atoms)


def tiny_nexus() -> Span:
    cfg = nexus.NexusConfig(blocks=2, heads=4, intermediate=64, max_positions=64, tie_head=False)
    gen = torch.Generator().manual_seed(0)
    specs = nexus.nexus_specs(cfg, hidden=WIDTH, vocab=VOCAB, first_index=0, model_id="n")
    return Span(
        [nexus.init_random(nexus.nexus_atom_from_spec(s), gen, residual_layers=2) for s in specs]
    )


SPANS: dict[str, Callable[[], Span]] = {"bert": tiny_bert, "nexus": tiny_nexus, "llama": tiny_llama}


def inputs(span: Span, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if span.in_kind is IOKind.IDS:
        return torch.randint(1, VOCAB, (batch, length), generator=gen)
    return torch.randn((batch, length, WIDTH), generator=gen)


def pool_for(
    span: Span, tokens: int = 4, pages: int = 256, *, layer_major: bool = True
) -> tuple[KVPool, PageFormat]:
    fmt = PageFormat.of(span.kv_layouts(), tokens)
    page_bytes, stripe = pool_shape([fmt])
    return KVPool(page_bytes=page_bytes, pages=pages, stripe=stripe if layer_major else None), fmt


def decode(span: Span, cache: object, x: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Prefill `prefill` tokens, then one step per remaining token."""
    b = x.shape[0]
    ctx = ForwardContext.for_tokens(b, prefill, causal=True, cache=cache)  # type: ignore[arg-type]
    outs = [span(x[:, :prefill], ctx)]
    for t in range(prefill, x.shape[1]):
        ctx = ForwardContext.for_tokens(b, 1, start=t, causal=True, cache=cache)  # type: ignore[arg-type]
        outs.append(span(x[:, t : t + 1], ctx))
    return outs


def prefix(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, :n]


@pytest.mark.parametrize("layout", ["runs", "fragmented", "page-major"])
@pytest.mark.parametrize("family", sorted(SPANS))
def test_paged_cache_is_bit_identical_to_the_contiguous_cache(family: str, layout: str) -> None:
    """Read in place (rows that are runs of a layer-major pool) or gathered (rows whose
    pages another session interleaves, or a page-major pool): the same outputs."""
    span = SPANS[family]()
    x = inputs(span, 2, 13, seed=1)
    flat = SessionCache.allocate(span.kv_layouts(), batch=2, max_len=32, budget_bytes=1 << 30)
    pool, fmt = pool_for(span, pages=16, layer_major=layout != "page-major")
    paged = PagedCache(pool, fmt, batch=2, max_len=32)
    other = PagedCache(pool, fmt, batch=1, max_len=4 * 16)  # holds every page first
    if layout == "fragmented":
        other.reserve(4)  # its hold covers the pool: paged's rows take pages one by one
    with torch.inference_mode():
        want = decode(span, flat, x, prefill=5)
        got = decode(span, paged, x, prefill=5)
        other.reserve(8)  # interleaved with paged's pages
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert paged.pages == 2 * 4  # 13 tokens in pages of 4, per row
    assert paged.used_bytes == 2 * 13 * fmt.token_bytes
    assert (paged.run(4) is not None) == (layout != "fragmented")


def test_a_session_whose_rows_are_runs_reads_the_pool_in_place() -> None:
    span = tiny_nexus()
    pool, fmt = pool_for(span, pages=64)
    assert pool.stripe < pool.page_bytes  # layer-major
    cache = PagedCache(pool, fmt, batch=2, max_len=20)  # 5 pages a row
    k = torch.randn((2, 4, 6, 8))
    slot = fmt.layers[0]
    got_k, got_v = cache.layer(slot.index).append(k, -k)
    base = pool.token_view(fmt, slot)
    assert base is not None
    assert got_k.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # no copy
    assert cache.tables == [[1, 2], [6, 7]] and cache.run(2) == (1, 5)  # rows 5 pages apart
    assert torch.equal(got_k, k) and torch.equal(got_v, -k)
    gathered = gather_rows(pool.layer_view(fmt, slot), page_table(cache.tables, 2), 6)
    assert torch.equal(gathered[0], k) and torch.equal(gathered[1], -k)


@pytest.mark.parametrize("family", sorted(SPANS))
def test_eight_sessions_batched_equal_their_sequential_steps(family: str) -> None:
    """8 sessions of mixed lengths (one of batch 2, left-padded), 6 decode steps each."""
    span = SPANS[family]()
    pool, fmt = pool_for(span, pages=512)
    lengths = [3, 7, 1, 12, 5, 9, 2, 16]
    rows = [1, 1, 1, 2, 1, 1, 1, 1]
    xs = [
        inputs(span, r, n + 6, seed=i) for i, (r, n) in enumerate(zip(rows, lengths, strict=True))
    ]
    padded = torch.ones((2, lengths[3] + 6), dtype=torch.bool)
    padded[1, :4] = False  # row 1 is left-padded by 4 tokens
    pads: list[torch.Tensor | None] = [None, None, None, padded, None, None, None, None]
    results = {}
    for mode in ("alone", "batched"):
        caches = [PagedCache(pool, fmt, batch=r, max_len=40) for r in rows]
        outs: list[list[torch.Tensor]] = [[] for _ in lengths]
        with torch.inference_mode():
            for i, n in enumerate(lengths):
                pad = prefix(pads[i], n)
                ctx = ForwardContext.for_tokens(
                    rows[i], n, causal=True, pad_mask=pad, cache=caches[i]
                )
                outs[i].append(span(xs[i][:, :n], ctx))
            for s in range(6):
                items = [
                    BatchItem(
                        x=xs[i][:, n + s : n + s + 1],
                        position=n + s,
                        causal=True,
                        pad_mask=prefix(pads[i], n + s + 1),
                        cache=caches[i],
                    )
                    for i, n in enumerate(lengths)
                ]
                assert all(batchable(it) for it in items)
                if mode == "batched":
                    for i, out in enumerate(run_batched(span, items)):
                        outs[i].append(out)
                    continue
                for i, it in enumerate(items):
                    ctx = ForwardContext.for_tokens(
                        rows[i],
                        1,
                        start=it.position,
                        causal=True,
                        pad_mask=it.pad_mask,
                        cache=it.cache,
                    )
                    outs[i].append(span(it.x, ctx))
        results[mode] = outs
        for c in caches:
            c.release()
    assert pool.used_pages == 0
    for alone, batched in zip(results["alone"], results["batched"], strict=True):
        for a, b in zip(alone, batched, strict=True):
            assert a.shape == b.shape
            assert float((a - b).abs().max() / a.abs().max()) <= BATCH_RTOL


def test_pool_takes_zeroed_pages_and_refuses_without_taking_any() -> None:
    pool = KVPool(page_bytes=64, pages=3)
    first = pool.take(2)
    assert first == [1, 2] and PAD_PAGE not in first
    with pytest.raises(CacheExhausted, match="2 pages requested, 1 of 3 free"):
        pool.take(2)
    assert (pool.free_pages, pool.used_pages) == (1, 2)
    pool.give_back(first)
    with pytest.raises(ValueError, match="not in use"):
        pool.give_back(first)
    assert pool.take(3) == [1, 2, 3]
    assert KVPool.for_budget(10, 64).capacity == 0


def test_session_grows_page_by_page_and_gives_pages_back() -> None:
    layout = KVLayout(kv_heads=2, head_dim=4, dtype=torch.float32)
    fmt = PageFormat.of({1: ("m/001", layout), 2: ("m/002", layout)}, tokens=4)
    assert fmt.token_bytes == 2 * 2 * 2 * 4 * 4 and fmt.nbytes == 4 * fmt.token_bytes
    pool = KVPool(page_bytes=fmt.nbytes, pages=5)
    cache = PagedCache(pool, fmt, batch=2, max_len=10)
    cache.reserve(1)
    assert (cache.pages, pool.free_pages) == (2, 3)
    cache.reserve(4)
    assert cache.pages == 2  # still inside the first page of each row
    with pytest.raises(CacheExhausted, match="requested"):
        cache.reserve(9)  # 3 pages a row: 4 more needed, 3 free
    assert (cache.pages, pool.free_pages) == (2, 3)  # nothing taken
    with pytest.raises(CacheExhausted, match="holds 10 tokens"):
        cache.reserve(11)
    with pytest.raises(CacheNotReady, match="m/007"):
        cache.layer(7, "m/007")
    cache.release()
    assert (cache.pages, pool.free_pages, cache.length) == (0, 5, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 3), st.integers(0, 12)),
        min_size=1,
        max_size=40,
    )
)
def test_pool_never_fragments(ops: list[tuple[int, int, int]]) -> None:
    """Any mix of sessions growing and releasing: a request succeeds exactly when enough
    pages are free, sessions never share a page, and each holds only what its length needs."""
    layout = KVLayout(kv_heads=1, head_dim=4, dtype=torch.float32)
    fmt = PageFormat.of({0: ("m/000", layout)}, tokens=3)
    pool = KVPool(page_bytes=fmt.nbytes, pages=12)
    sessions: dict[int, PagedCache] = {}
    lengths: dict[int, int] = {}
    for slot, batch, grow in ops:
        cache = sessions.get(slot)
        if cache is None:
            cache = sessions[slot] = PagedCache(pool, fmt, batch=batch, max_len=64)
            lengths[slot] = 0
        if grow == 0:
            cache.release()
            lengths[slot] = 0
        else:
            target = lengths[slot] + grow
            need = cache.pages_for(target) - cache.pages
            if need <= pool.free_pages:
                cache.reserve(target)
                lengths[slot] = target
            else:
                with pytest.raises(CacheExhausted):
                    cache.reserve(target)
        held = [p for c in sessions.values() for t in c.tables for p in t]
        assert len(held) == len(set(held)) == pool.used_pages
        assert pool.used_pages + pool.free_pages == pool.capacity
        for k, c in sessions.items():
            assert c.pages == c.pages_for(lengths[k])


def test_pages_keep_their_tokens_and_the_lowest_free_page_comes_first() -> None:
    layout = KVLayout(kv_heads=1, head_dim=4, dtype=torch.float32)
    fmt = PageFormat.of({0: ("m/000", layout)}, tokens=2)
    pool = KVPool(page_bytes=fmt.nbytes, pages=1000)
    assert pool.allocated_bytes == 1001 * fmt.nbytes  # once, the pad page included
    cache = PagedCache(pool, fmt, batch=1, max_len=100)
    k = torch.arange(2 * 4, dtype=torch.float32).view(1, 1, 2, 4)
    cache.layer(0).append(k, -k)
    cache.reserve(60)  # 30 pages
    got_k, got_v = cache.layer(0).append(k, -k)
    assert torch.equal(got_k[:, :, :2], k) and torch.equal(got_v[:, :, 2:], -k)
    cache.release()
    assert pool.take(1) == [1]  # the lowest free page first


def test_a_span_without_kv_layers_batches_at_any_position() -> None:
    head = Span(tiny_llama().atom_list()[-1:])  # the output head alone: no KV cache
    xs = [torch.randn((1, 1, WIDTH), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    items = [
        BatchItem(x=x, position=5 + 7 * i, causal=True, pad_mask=None, cache=None)
        for i, x in enumerate(xs)
    ]
    assert all(batchable(it) for it in items)
    with torch.inference_mode():
        got = run_batched(head, items)
        for it, out in zip(items, got, strict=True):
            ctx = ForwardContext.for_tokens(1, 1, start=it.position, causal=True)
            want = head(it.x, ctx)
            assert float((want - out).abs().max() / want.abs().max()) <= BATCH_RTOL


def test_sessions_growing_in_turn_keep_their_pages_in_runs() -> None:
    """Each new row holds the run its max_len may need; rows growing in turn stay runs, a
    hold never blocks another session, and release gives the unused tail back."""
    alloc = PageAllocator(pages=20, page_bytes=64)
    a: list[list[int]] = [[]]
    b: list[list[int]] = [[], []]
    holds_a, holds_b = [(0, 0)], [(0, 0), (0, 0)]
    for n in range(1, 5):  # interleaved growth, a: up to 6 pages, b: 2 rows of up to 3
        alloc.grow(a, holds_a, n, most=6)
        alloc.grow(b, holds_b, min(n, 3), most=3)
    assert a == [[1, 2, 3, 4]] and b == [[7, 8, 9], [10, 11, 12]]
    assert (alloc.taken, alloc.free) == (10, 10)  # held pages stay free
    assert alloc.state(5) == alloc.state(6) == HELD
    c: list[list[int]] = [[]]
    holds_c = [(0, 0)]
    alloc.grow(c, holds_c, 9, most=9)  # no FREE run of 9: the longest (13-20), then any
    assert c == [[13, 14, 15, 16, 17, 18, 19, 20, 5]]
    alloc.drop_hold(holds_a[0])
    alloc.give_back(a[0])
    assert alloc.state(6) != HELD and alloc.take_lowest(2) == [1, 2]
    with pytest.raises(CacheExhausted, match="7 pages requested, 3 of 20 free"):
        alloc.grow(c, holds_c, 16, most=16)
    assert len(c[0]) == 9  # nothing taken


def test_a_host_pool_is_layer_major_for_one_layout_and_page_major_for_mixed() -> None:
    small = KVLayout(kv_heads=2, head_dim=4, dtype=torch.float32)
    big = KVLayout(kv_heads=4, head_dim=4, dtype=torch.float32)
    one = PageFormat.of({0: ("m/000", small), 1: ("m/001", small)}, tokens=4)
    two = PageFormat.of({3: ("n/003", small)}, tokens=4)
    assert pool_shape([one, two]) == (one.nbytes, one.nbytes // 2)
    mixed = PageFormat.of({0: ("m/000", small), 1: ("m/001", big)}, tokens=4)
    assert pool_shape([mixed]) == (mixed.nbytes, mixed.nbytes)
    pool = KVPool(page_bytes=one.nbytes, pages=3, stripe=one.nbytes // 2)
    assert pool.token_view(one, one.layers[1]) is not None
    pool = KVPool(page_bytes=one.nbytes, pages=3)
    assert pool.token_view(one, one.layers[1]) is None  # page-major: pages gathered
    with pytest.raises(ValueError, match="stripe"):
        KVPool(page_bytes=64, pages=1, stripe=48)
