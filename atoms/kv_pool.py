"""The paged KV pool of a host: fixed-size pages shared by every session on it.

The idea is vLLM's PagedAttention (Kwon et al., SOSP 2023, §4.2-4.3): a session's keys and
values live in fixed-size blocks found through a block table, so a session holds memory
in proportion to its length and a freed block serves anyone.

Rule 1: the pool is one tensor allocated once and never moved (worker threads write into it
while the event loop takes and frees pages); every page has the same size, so memory cannot
fragment: any free page serves any session. It is made with `torch.empty`: the OS maps
memory only where a session writes, so the resident memory is the high-water mark of use.
Rule 2: a page holds `tokens` consecutive tokens of ONE sequence row for EVERY attention
layer of a span (`PageFormat` says where each layer lives inside it); a session keeps one
page table per row and takes a page only when its length crosses into it.
Rule 3: the pool is stored LAYER-major when every hosted layer's region has one size (the
`stripe`, `pool_shape`): (page_bytes / stripe, pages + 1, stripe) bytes, so one layer's
regions of consecutive pages are consecutive memory. With mixed layouts it is page-major
(stripe = page_bytes) and always gathers.
Rule 4: page 0 is the pad page: always zero, never handed out. A batched gather pads shorter
rows with it, so the keys and values a mask hides are finite.
Rule 5: a page is zeroed when taken; `release` gives every page back; asking for more pages
than are free raises `CacheExhausted` and takes none. Which page a row gets is
`kv_alloc.PageAllocator`'s: the next one after its last when it can (a run).
Rule 6: attention reads one session's rows IN PLACE when every row's pages form a run (and
the rows one spacing): a strided view of the layer's stripe, no copy, like the contiguous
cache. Otherwise (a fragmented row, a batch of sessions) it reads a gather of the pages
(`gather_rows`, one index copy per layer and step). Both measured in README "Benchmarks".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVLayout
from .errors import CacheExhausted, CacheNotReady
from .kv_alloc import PageAllocator, run_length

PAD_PAGE = 0
ALIGN = 16  # byte alignment of each layer's region inside a page (any dtype view fits)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class LayerSlot:
    """Where one attention atom's keys and values sit inside a page of its span."""

    index: int
    uid: str
    layout: KVLayout
    offset: int  # bytes from the start of the page


@dataclass(frozen=True, slots=True)
class PageFormat:
    """How one span lays out a page: `tokens` tokens x every KV layer, (T, 2, H_kv, D) each.

    Build with `PageFormat.of`; `nbytes` is what one page of this span needs.
    """

    tokens: int
    layers: tuple[LayerSlot, ...]
    nbytes: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"a page holds at least one token, got {self.tokens}")

    @classmethod
    def of(cls, layouts: dict[int, tuple[str, KVLayout]], tokens: int) -> PageFormat:
        """The format of a span whose KV layers are `layouts` (`Span.kv_layouts()`)."""
        slots, offset = [], 0
        for index, (uid, layout) in sorted(layouts.items()):
            slots.append(LayerSlot(index, uid, layout, offset))
            offset += _aligned(tokens * layout.bytes_per_token(1))
        return cls(tokens, tuple(slots), offset)

    @property
    def token_bytes(self) -> int:
        """Bytes one token of one row really uses, over all layers (no page rounding)."""
        return sum(s.layout.bytes_per_token(1) for s in self.layers)

    def pages(self, tokens: int) -> int:
        """Pages one row needs to hold `tokens` tokens."""
        return -(-tokens // self.tokens)


def pool_shape(formats: list[PageFormat]) -> tuple[int, int]:
    """(page_bytes, stripe) of a pool serving spans of these formats (Rule 3): pages that fit
    the largest, layer-major when every layer region of every format has one size."""
    page_bytes = max([ALIGN, *(f.nbytes for f in formats)])
    sizes = {_aligned(f.tokens * s.layout.bytes_per_token(1)) for f in formats for s in f.layers}
    if len(sizes) == 1 and page_bytes % (stripe := sizes.pop()) == 0:
        return page_bytes, stripe
    return page_bytes, page_bytes


class KVPool:
    """`pages` usable pages of `page_bytes` each, plus the pad page.

    Args:
        page_bytes: size of every page (a multiple of 16; at least the largest span format).
        pages: usable pages (0 is allowed: every request is then refused).
        stripe: bytes of a page stored together over all pages (Rule 3); a multiple of 16
            dividing page_bytes; None: page_bytes (page-major).
    """

    def __init__(self, *, page_bytes: int, pages: int, stripe: int | None = None) -> None:
        stripe = page_bytes if stripe is None else stripe
        if page_bytes < ALIGN or page_bytes % ALIGN or pages < 0:
            raise ValueError(f"pool needs page_bytes a multiple of {ALIGN} and pages >= 0")
        if stripe < ALIGN or stripe % ALIGN or page_bytes % stripe:
            raise ValueError(f"stripe {stripe} must be a multiple of {ALIGN} dividing page_bytes")
        self.page_bytes = page_bytes
        self.stripe = stripe
        self.capacity = pages
        self.pages = PageAllocator(pages, page_bytes)
        self._storage = torch.empty((page_bytes // stripe, pages + 1, stripe), dtype=torch.uint8)
        self._storage[:, PAD_PAGE].zero_()
        self._views: dict[tuple[int, LayerSlot], torch.Tensor] = {}

    @classmethod
    def for_budget(cls, budget_bytes: int, page_bytes: int, stripe: int | None = None) -> KVPool:
        """As many pages as `budget_bytes` holds (the pad page comes on top)."""
        return cls(page_bytes=page_bytes, pages=max(0, budget_bytes) // page_bytes, stripe=stripe)

    @property
    def free_pages(self) -> int:
        return self.pages.free

    @property
    def used_pages(self) -> int:
        return self.pages.taken

    def take(self, n: int) -> list[int]:
        """`n` zeroed pages, lowest free ids first.

        Raises:
            CacheExhausted: fewer than `n` pages are free (none are taken).
        """
        return self.zeroed(self.pages.take_lowest(n))

    def zeroed(self, pages: list[int]) -> list[int]:
        """Zero freshly taken `pages` (Rule 5); returns them."""
        if pages:
            self._storage[:, torch.tensor(pages)] = 0
        return pages

    def give_back(self, pages: list[int]) -> None:
        """Return pages to the pool.

        Raises:
            ValueError: a page that is not in use (a double release is a bug).
        """
        self.pages.give_back(pages)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the pool's tensor (address space; resident only where written)."""
        return self._storage.numel()

    def _region(self, fmt: PageFormat, slot: LayerSlot) -> torch.Tensor:
        """One layer's region of every page, as bytes: (pages + 1, region bytes).

        Raises:
            CacheExhausted: the span's pages need more bytes than this pool's pages have.
        """
        if fmt.nbytes > self.page_bytes:
            raise CacheExhausted(
                f"KV pool: a page of {fmt.nbytes} bytes is needed, the pool's are "
                f"{self.page_bytes} (the pool is resized when it is idle)"
            )
        nbytes = fmt.tokens * slot.layout.bytes_per_token(1)
        stripe, at = divmod(slot.offset, self.stripe)
        if at + nbytes > self.stripe:  # pool_shape makes stripes that hold whole regions
            raise ValueError(f"KV pool: layer {slot.uid} crosses a stripe of {self.stripe} bytes")
        return self._storage[stripe, :, at : at + nbytes]

    def layer_view(self, fmt: PageFormat, slot: LayerSlot) -> torch.Tensor:
        """Every page's region of one layer, typed: (pages + 1, tokens, 2, H_kv, D).

        Raises:
            CacheExhausted: the span's pages need more bytes than this pool's pages have.
        """
        key = (fmt.tokens, slot)
        view = self._views.get(key)
        if view is None:
            lay = slot.layout
            shape = (self.capacity + 1, fmt.tokens, 2, lay.kv_heads, lay.head_dim)
            view = self._region(fmt, slot).view(lay.dtype).view(shape)
            self._views[key] = view
        return view

    def token_view(self, fmt: PageFormat, slot: LayerSlot) -> torch.Tensor | None:
        """One layer's tokens of all pages end to end, (pages + 1) x tokens rows of
        (2, H_kv, D), when its regions are one stripe (Rule 3); else None."""
        view = self.layer_view(fmt, slot)
        if not view.is_contiguous():
            return None
        return view.view(-1, *view.shape[2:])

    def __repr__(self) -> str:
        return (
            f"KVPool({self.used_pages}/{self.capacity} pages of {self.page_bytes} bytes, "
            f"stripe {self.stripe})"
        )


def write_rows(
    view: torch.Tensor,
    table: torch.Tensor,
    starts: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """Store new keys/values (R, H_kv, T, D) of R rows at token `starts[r]` onwards.

    Args:
        view: a `KVPool.layer_view`, (pages, P, 2, H_kv, D).
        table: (R, n) page ids per row, covering at least starts + T tokens.
        starts: (R,) int64 first token of each row's new keys.
    """
    per_page = view.shape[1]
    pos = starts[:, None] + torch.arange(k_new.shape[2])  # (R, T)
    pages = table.gather(1, pos // per_page)  # (R, T)
    kv = torch.stack((k_new, v_new), dim=1).permute(0, 3, 1, 2, 4)  # (R, T, 2, H, D)
    view[pages, pos % per_page] = kv


def gather_rows(
    view: torch.Tensor, table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens [0, length) of every row: (R, H_kv, length, D) each.

    One index copy of the rows' pages; tokens past a row's own length are its page's zeros
    or the pad page's (a mask must hide them).
    """
    r, n = table.shape
    per_page = view.shape[1]
    # index_select, not view[table]: 5x faster on CPU for this copy (18 vs 95 us, 26 pages)
    sel = torch.index_select(view, 0, table.reshape(-1))  # (R x n, P, 2, H, D), contiguous
    flat = sel.view(r, n * per_page, *sel.shape[2:])[:, :length]  # (R, L, 2, H, D)
    return flat[:, :, 0].transpose(1, 2), flat[:, :, 1].transpose(1, 2)


def page_table(tables: list[list[int]], pages: int) -> torch.Tensor:
    """(R, pages) int64 table, each row padded with the pad page."""
    return torch.tensor([t[:pages] + [PAD_PAGE] * (pages - len(t[:pages])) for t in tables])


class PagedCache:
    """One session's KV cache in the pool: a page table per row, pages taken as it grows.

    Implements `atoms.cache.KVCache`, so attention atoms use it as a `SessionCache`.

    Args:
        pool: the host's pool.
        fmt: the session's span's `PageFormat`.
        batch: rows (sequences) of the session.
        max_len: the most tokens the session may hold (as `OpenSession.max_len`).
    """

    def __init__(self, pool: KVPool, fmt: PageFormat, *, batch: int, max_len: int) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.pool = pool
        self.format = fmt
        self.batch = batch
        self.max_len = max_len
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths: dict[int, int] = {s.index: 0 for s in fmt.layers}
        self._slots = {s.index: s for s in fmt.layers}
        self._holds: list[tuple[int, int]] = [(0, 0)] * batch  # kv_alloc Rule 1
        self._runs = [0] * batch  # leading pages of each row that are consecutive ids
        self._tokens: dict[int, torch.Tensor | None] = {}  # token_view per layer index

    @property
    def length(self) -> int:
        """Tokens cached so far (the same in every layer after a complete step)."""
        return max(self.lengths.values(), default=0)

    @property
    def pages(self) -> int:
        return sum(len(t) for t in self.tables)

    @property
    def nbytes(self) -> int:
        """Pool bytes this session holds (whole pages)."""
        return self.pages * self.pool.page_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes its cached tokens really fill (no page rounding)."""
        return self.batch * self.length * self.format.token_bytes

    def pages_for(self, tokens: int) -> int:
        """Pages every row needs in all to hold `tokens` tokens."""
        return self.batch * self.format.pages(tokens)

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` in all (cached + new) in every row, before any write.

        Raises:
            CacheExhausted: past `max_len`, or the pool lacks pages (nothing is taken).
        """
        if tokens > self.max_len:
            raise CacheExhausted(
                f"KV cache holds {self.max_len} tokens, {self.length} used, "
                f"{tokens - self.length} more requested"
            )
        per_row = self.format.pages(tokens)
        if any(len(t) < per_row for t in self.tables):
            most = self.format.pages(self.max_len)
            self.pool.zeroed(self.pool.pages.grow(self.tables, self._holds, per_row, most))
            self._runs = [run_length(t, n) for t, n in zip(self.tables, self._runs, strict=True)]

    def release(self) -> None:
        """Give every page back; the session's cache is empty afterwards."""
        self.pool.give_back([p for t in self.tables for p in t])
        for hold in self._holds:
            self.pool.pages.drop_hold(hold)
        self.tables = [[] for _ in range(self.batch)]
        self._holds = [(0, 0)] * self.batch
        self._runs = [0] * self.batch
        self.lengths = dict.fromkeys(self.lengths, 0)

    def token_view(self, slot: LayerSlot) -> torch.Tensor | None:
        """`KVPool.token_view` of one of this session's layers (looked up once)."""
        if slot.index not in self._tokens:
            self._tokens[slot.index] = self.pool.token_view(self.format, slot)
        return self._tokens[slot.index]

    def run(self, pages: int) -> tuple[int, int] | None:
        """(first page, row spacing in pages) when the first `pages` pages of every row are
        consecutive and the rows start at one spacing (Rule 6); else None."""
        if any(n < pages for n in self._runs):
            return None
        first = self.tables[0][0]
        step = self.tables[1][0] - first if self.batch > 1 else pages
        if step <= 0 or any(t[0] != first + r * step for r, t in enumerate(self.tables)):
            return None
        return first, step

    def slot(self, index: int, uid: str = "?") -> LayerSlot:
        try:
            return self._slots[index]
        except KeyError:
            raise CacheNotReady(
                f"atom {uid}: no KV cache allocated for atom index {index} in this session"
            ) from None

    def layer(self, index: int, uid: str = "?") -> PagedLayer:
        """The paged view of atom `index` (`atoms.cache.KVLayer`).

        Raises:
            CacheNotReady: the span has no KV layer at that index.
        """
        return PagedLayer([self], self.slot(index, uid))

    def __repr__(self) -> str:
        return (
            f"PagedCache(batch={self.batch}, length={self.length}/{self.max_len}, "
            f"pages={self.pages})"
        )


class PagedLayer:
    """One layer of one or more sessions' paged caches (`atoms.cache.KVLayer`).

    With several sessions (a batch, `PagedBatch`) rows are the sessions' rows in order;
    each writes at its own length and the result is padded to the longest row.
    """

    def __init__(self, caches: list[PagedCache], slot: LayerSlot) -> None:
        self._caches = caches
        self._slot = slot

    @property
    def dtype(self) -> torch.dtype:
        return self._slot.layout.dtype

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (R, H_kv, T, D) new keys/values; return all cached so far, (R, H_kv, L, D).

        Raises:
            CacheExhausted: past a session's max_len, or no free page.
        """
        if len(self._caches) == 1:
            done = self._append_in_place(self._caches[0], k_new, v_new)
            if done is not None:
                return done
        idx, t = self._slot.index, k_new.shape[2]
        starts: list[int] = []
        tables: list[list[int]] = []
        for cache in self._caches:
            start = cache.lengths[idx]
            cache.reserve(start + t)  # a no-op when the host reserved the step beforehand
            starts += [start] * cache.batch
            tables += cache.tables
        length = max(starts) + t
        pool, fmt = self._caches[0].pool, self._caches[0].format
        view = pool.layer_view(fmt, self._slot)
        table = page_table(tables, fmt.pages(length))
        write_rows(view, table, torch.tensor(starts), k_new, v_new)
        for cache in self._caches:
            cache.lengths[idx] += t
        return gather_rows(view, table, length)

    def _append_in_place(
        self, cache: PagedCache, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`append` for one session whose rows are runs (Rule 6): write into and return
        strided views of the pool, no copy; None when the rows are not runs."""
        idx, t = self._slot.index, k_new.shape[2]
        start = cache.lengths[idx]
        length = start + t
        cache.reserve(length)  # a no-op when the host reserved the step beforehand
        per_page = cache.format.tokens
        run = cache.run(cache.format.pages(length))
        flat = cache.token_view(self._slot) if run else None
        if run is None or flat is None:
            return None
        first, step = run
        tok, heads, dim = flat.stride(0), flat.shape[2], flat.shape[3]  # tok = 2 x H_kv x D
        size = (cache.batch, heads, length, dim)  # (R, H_kv, L, D)
        stride = (step * per_page * tok, dim, tok, 1)
        at = flat.storage_offset() + first * per_page * tok
        k = flat.as_strided(size, stride, at)
        v = flat.as_strided(size, stride, at + heads * dim)
        k[:, :, start:] = k_new
        v[:, :, start:] = v_new
        cache.lengths[idx] = length
        return k, v


class PagedBatch:
    """Several sessions' `PagedCache`s (same pool and span format) as one batch of rows.

    Raises:
        ValueError: no caches, or caches of different pools or formats.
    """

    def __init__(self, caches: list[PagedCache]) -> None:
        if not caches or any(
            c.pool is not caches[0].pool or c.format != caches[0].format for c in caches
        ):
            raise ValueError("a paged batch needs caches of one pool and one page format")
        self.caches = caches

    def layer(self, index: int, uid: str = "?") -> PagedLayer:
        return PagedLayer(self.caches, self.caches[0].slot(index, uid))

    def __repr__(self) -> str:
        return f"PagedBatch({len(self.caches)} sessions)"
