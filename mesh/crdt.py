"""Generic state-based CRDTs (Shapiro et al., "Conflict-free Replicated Data Types", 2011).

Owns `Stamp`, `LWWRegister`, `LWWMap`, `AddWinsSet` and `GrowOnlySet`. `mesh/state.py`
builds the replicated mesh state from them.

Rule 1: every type is an immutable value. Operations and `merge` return a new value and
never change their inputs (copy-on-write), so a state can be shared and snapshotted freely.
Rule 2: `merge` is a join: commutative, associative and idempotent. Every ordering used by
a merge is total and deterministic (no dict order, no hash order, no ties left open).
Rule 3: no clock reads and no randomness: timestamps and dots come in as arguments.
Rule 4: a stamp identifies one write. Callers derive `Stamp.tiebreak` from the written
value (e.g. its digest), so two different values never share a stamp; the merge laws
rely on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
E = TypeVar("E")

Dot = tuple[bytes, int]  # (author id, packed HLC): a unique tag for one add (OR-set dot)


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """Total order of LWW writes: HLC first, then author id, then a value-derived tiebreak.

    Attributes:
        hlc: packed hybrid logical clock of the write (`Timestamp.pack()`).
        author: id of the writer; breaks HLC ties deterministically.
        tiebreak: bytes derived from the written value (Rule 4); breaks the tie left when
            one author writes two values with the same HLC.
    """

    hlc: int
    author: bytes
    tiebreak: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.hlc, bool) or not isinstance(self.hlc, int) or self.hlc < 0:
            raise ValueError(f"stamp hlc: expected an int >= 0, got {self.hlc!r:.30}")
        if not isinstance(self.author, bytes) or not isinstance(self.tiebreak, bytes):
            raise TypeError("stamp author and tiebreak: expected bytes")


@dataclass(frozen=True, slots=True)
class LWWRegister(Generic[V]):
    """Last-writer-wins register; `value is None` is a tombstone (value pruned, stamp kept).

    A tombstone keeps the stamp of what it replaced so an older write can never come back,
    and it outranks a live value with the same stamp (pruning is monotone).
    """

    stamp: Stamp
    value: V | None

    @property
    def is_tombstone(self) -> bool:
        """True when the value was pruned and only the stamp remains."""
        return self.value is None

    def merge(self, other: LWWRegister[V]) -> LWWRegister[V]:
        """Return the register with the greater (stamp, is_tombstone)."""
        mine = (self.stamp, self.value is None)
        theirs = (other.stamp, other.value is None)
        return self if mine >= theirs else other

    def tombstone(self) -> LWWRegister[V]:
        """Return the tombstone of this register (same stamp, no value)."""
        return self if self.value is None else LWWRegister(self.stamp, None)


class LWWMap(Generic[K, V]):
    """Map of keys to LWW registers; merge is the per-key register merge.

    Keys must be hashable. Deleting a key outright (`without`) is not a CRDT operation: it is
    for callers whose own rules make the deletion deterministic (e.g. dropping every entry of
    a revoked author, which any replica does the same way).
    """

    __slots__ = ("_regs",)

    def __init__(self, regs: Mapping[K, LWWRegister[V]] | None = None) -> None:
        self._regs: dict[K, LWWRegister[V]] = dict(regs) if regs else {}

    def register(self, key: K) -> LWWRegister[V] | None:
        """The register of `key` (live or tombstone), or None if never written."""
        return self._regs.get(key)

    def get(self, key: K) -> V | None:
        """The live value of `key`, or None if absent or pruned."""
        reg = self._regs.get(key)
        return None if reg is None else reg.value

    def set(self, key: K, value: V, stamp: Stamp) -> LWWMap[K, V]:
        """Return a map with the write merged in (a no-op if an equal-or-newer stamp exists)."""
        return self.put(key, LWWRegister(stamp, value))

    def put(self, key: K, reg: LWWRegister[V]) -> LWWMap[K, V]:
        """Return a map with `reg` merged into the register of `key`."""
        old = self._regs.get(key)
        new = reg if old is None else old.merge(reg)
        if new is old:
            return self
        regs = dict(self._regs)
        regs[key] = new
        return LWWMap(regs)

    def merge(self, other: LWWMap[K, V]) -> LWWMap[K, V]:
        """Join two maps key by key."""
        regs = dict(self._regs)
        for key, reg in other._regs.items():
            old = regs.get(key)
            regs[key] = reg if old is None else old.merge(reg)
        return LWWMap(regs)

    def prune(self, expired: Callable[[K, V], bool]) -> LWWMap[K, V]:
        """Return a map where every live value with `expired(key, value)` is a tombstone."""
        dead = [k for k, r in self._regs.items() if r.value is not None and expired(k, r.value)]
        if not dead:
            return self
        regs = dict(self._regs)
        for key in dead:
            regs[key] = regs[key].tombstone()
        return LWWMap(regs)

    def without(self, drop: Callable[[K], bool]) -> LWWMap[K, V]:
        """Return a map without the keys for which `drop(key)` is true (see class docstring)."""
        if not any(drop(k) for k in self._regs):
            return self
        return LWWMap({k: r for k, r in self._regs.items() if not drop(k)})

    def items(self) -> Iterator[tuple[K, V]]:
        """Live (key, value) pairs, tombstones skipped."""
        return ((k, r.value) for k, r in self._regs.items() if r.value is not None)

    def registers(self) -> Iterator[tuple[K, LWWRegister[V]]]:
        """Every (key, register) pair, tombstones included."""
        return iter(self._regs.items())

    def __len__(self) -> int:
        return len(self._regs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LWWMap) and self._regs == other._regs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        live = sum(1 for r in self._regs.values() if r.value is not None)
        return f"LWWMap(live={live}, tombstones={len(self._regs) - live})"


class AddWinsSet(Generic[E]):
    """Observed-remove set with add-wins semantics (OR-set, Shapiro et al. 2011, §3.3.5).

    Each add carries a unique dot (author, hlc). A remove records the dots it observed for
    the element; an add concurrent with the remove has a dot the remover never saw, so it
    survives (add wins). State: the set of (element, dot) adds and the set of removed dots,
    both grow-only, so merge is a union. Removed dots may arrive before their adds.
    """

    __slots__ = ("_adds", "_removed")

    def __init__(
        self,
        adds: Iterable[tuple[E, Dot]] = (),
        removed: Iterable[Dot] = (),
    ) -> None:
        self._adds: frozenset[tuple[E, Dot]] = frozenset(adds)
        self._removed: frozenset[Dot] = frozenset(removed)

    def add(self, element: E, dot: Dot) -> AddWinsSet[E]:
        """Return a set with `element` added under the fresh tag `dot`."""
        return AddWinsSet(self._adds | {(element, dot)}, self._removed)

    def remove(self, element: E) -> AddWinsSet[E]:
        """Return a set where every dot currently observed for `element` is removed."""
        return self.remove_dots(self.dots_of(element))

    def remove_dots(self, dots: Iterable[Dot]) -> AddWinsSet[E]:
        """Return a set with these dots removed (they may belong to adds not seen yet)."""
        return AddWinsSet(self._adds, self._removed | frozenset(dots))

    def dots_of(self, element: E) -> frozenset[Dot]:
        """Live dots of `element` (what a remove issued now would cover)."""
        return frozenset(d for e, d in self._adds if e == element and d not in self._removed)

    def elements(self) -> frozenset[E]:
        """Elements with at least one live dot."""
        return frozenset(e for e, d in self._adds if d not in self._removed)

    def live(self) -> Iterator[tuple[E, Dot]]:
        """Every live (element, dot) pair."""
        return ((e, d) for e, d in self._adds if d not in self._removed)

    def merge(self, other: AddWinsSet[E]) -> AddWinsSet[E]:
        """Join: union of adds and union of removed dots."""
        return AddWinsSet(self._adds | other._adds, self._removed | other._removed)

    def __contains__(self, element: object) -> bool:
        return any(e == element and d not in self._removed for e, d in self._adds)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AddWinsSet)
            and self._adds == other._adds
            and self._removed == other._removed
        )

    def __hash__(self) -> int:
        return hash((self._adds, self._removed))

    def __repr__(self) -> str:
        return f"AddWinsSet(adds={len(self._adds)}, removed_dots={len(self._removed)})"


class GrowOnlySet(Generic[E]):
    """Grow-only set (G-Set): add and union, never remove."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[E] = ()) -> None:
        self._items: frozenset[E] = frozenset(items)

    def add(self, element: E) -> GrowOnlySet[E]:
        """Return a set with `element` added."""
        return self if element in self._items else GrowOnlySet(self._items | {element})

    def merge(self, other: GrowOnlySet[E]) -> GrowOnlySet[E]:
        """Join: set union."""
        return GrowOnlySet(self._items | other._items)

    def __contains__(self, element: object) -> bool:
        return element in self._items

    def __iter__(self) -> Iterator[E]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GrowOnlySet) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"GrowOnlySet(size={len(self._items)})"
