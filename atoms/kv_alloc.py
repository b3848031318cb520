"""Which pages of the KV pool each row of a session holds, kept in runs where it can.

Attention reads a row's keys and values as one slice of the pool when the row's pages are
consecutive (`kv_pool` Rule 5); this module keeps them consecutive in the common case
without reserving memory up front.

Rule 1: a page is FREE, TAKEN, or HELD. HELD is free memory a row has a claim on: when a row
takes its first page it holds the run of FREE pages after it, up to what its `max_len` could
need, and grows into that run one page at a time. A hold is a preference, not a
reservation: it counts as free, any row takes a held page when no FREE page is left, and
`release` gives the unused tail back. So the pool refuses exactly when fewer pages are
free than asked for, as before (`CacheExhausted`, nothing taken).
Rule 2: new rows are placed first-fit: the lowest FREE run that holds all of a session's
rows at their full length, else the longest run, split evenly between the rows (a session
of B rows then has its rows at one spacing, one strided view for all of them).
Rule 3: a row that cannot take the page after its last one takes the lowest FREE page
(then the lowest HELD one): it stops being a run and attention gathers its pages.
Page 0 (the pad page) is never handed out.
"""

from __future__ import annotations

import re

from .errors import CacheExhausted

FREE, TAKEN, HELD = 0, 1, 2
_FREE_RUN = re.compile(b"\x00+")


class PageAllocator:
    """Page ids 1..`pages` (of `page_bytes` each, for messages), their states (sans torch).

    A row is its page table (a list the allocator appends to) and its hold, the
    (first, end) page range it may grow into; (0, 0) when it holds none.
    """

    def __init__(self, pages: int, page_bytes: int) -> None:
        if pages < 0:
            raise ValueError(f"pages must be >= 0, got {pages}")
        self.capacity = pages
        self._page_bytes = page_bytes
        self._state = bytearray(pages + 1)
        self._state[0] = TAKEN  # the pad page
        self._taken = 0

    @property
    def free(self) -> int:
        """Pages not taken (held ones included: any row may take them)."""
        return self.capacity - self._taken

    @property
    def taken(self) -> int:
        return self._taken

    def state(self, page: int) -> int:
        return self._state[page]

    def _refuse(self, n: int) -> CacheExhausted:
        return CacheExhausted(
            f"KV pool: {n} pages requested, {self.free} of {self.capacity} free "
            f"({self._page_bytes} bytes each)"
        )

    def take_lowest(self, n: int) -> list[int]:
        """`n` pages, lowest FREE ids first, then the lowest held ones.

        Raises:
            CacheExhausted: fewer than `n` pages are free (none are taken).
        """
        if n > self.free:
            raise self._refuse(n)
        return [self._take_any() for _ in range(n)]

    def grow(
        self, tables: list[list[int]], holds: list[tuple[int, int]], pages: int, most: int
    ) -> list[int]:
        """Give every row at least `pages` pages; returns the pages taken, in order.

        Args:
            tables: each row's page table (appended to).
            holds: each row's hold (updated when a row gets its first page).
            pages: pages each row needs now.
            most: pages a row may ever need (its max_len): the run a new row holds.

        Raises:
            CacheExhausted: fewer pages are free than the rows need (none are taken).
        """
        missing = sum(max(0, pages - len(t)) for t in tables)
        if missing > self.free:
            raise self._refuse(missing)
        new_rows = [r for r, t in enumerate(tables) if not t and pages > 0]
        if new_rows:
            self._place(holds, new_rows, most)
        out = []
        for t, hold in zip(tables, holds, strict=True):
            while len(t) < pages:
                p = self._next(t, hold)
                t.append(p)
                out.append(p)
        return out

    def _place(self, holds: list[tuple[int, int]], rows: list[int], most: int) -> None:
        """Hold a run for each new row: one stretch of FREE pages split evenly (Rule 2)."""
        want = len(rows) * most
        best = (0, 0)
        for m in _FREE_RUN.finditer(self._state):
            start, end = m.span()
            if end - start >= want:
                best = (start, end)
                break
            if end - start > best[1] - best[0]:
                best = (start, end)
        start, end = best
        each = min(most, (end - start) // len(rows))
        for i, r in enumerate(rows):
            if each == 0:
                holds[r] = (0, 0)
                continue
            first = start + i * each
            holds[r] = (first, first + each)
            self._state[first : first + each] = bytes([HELD]) * each

    def _next(self, table: list[int], hold: tuple[int, int]) -> int:
        """The page after the row's last (or its hold's first), else any (Rule 3)."""
        want = table[-1] + 1 if table else hold[0]
        if 0 < want <= self.capacity:
            st = self._state[want]
            if st == FREE or (st == HELD and hold[0] <= want < hold[1]):
                self._state[want] = TAKEN
                self._taken += 1
                return want
        return self._take_any()

    def _take_any(self) -> int:
        p = self._state.find(FREE, 1)
        if p < 0:
            p = self._state.find(HELD, 1)
        if p < 0:  # callers check `free` first
            raise self._refuse(1)
        self._state[p] = TAKEN
        self._taken += 1
        return p

    def give_back(self, pages: list[int]) -> None:
        """Pages back to FREE.

        Raises:
            ValueError: a page that is not taken (a double release is a bug); none is freed.
        """
        stray = [p for p in pages if not 0 < p <= self.capacity or self._state[p] != TAKEN]
        if stray:
            raise ValueError(f"KV pool: pages {stray[:4]} are not in use")
        for p in pages:
            self._state[p] = FREE
        self._taken -= len(pages)

    def drop_hold(self, hold: tuple[int, int]) -> None:
        """The unused tail of a hold back to FREE (pages taken meanwhile stay taken)."""
        first, end = hold
        if end > first:
            self._state[first:end] = self._state[first:end].replace(bytes([HELD]), bytes([FREE]))


def run_length(table: list[int], known: int) -> int:
    """How many leading pages of `table` are consecutive ids, given the first `known` are."""
    n = max(1, known) if table else 0
    while n < len(table) and table[n] == table[n - 1] + 1:
        n += 1
    return n
