"""Merge laws and semantics of the generic CRDTs in mesh/crdt.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.crdt import AddWinsSet, GrowOnlySet, LWWMap, LWWRegister, Stamp

T = TypeVar("T")
LAWS = settings(max_examples=80, deadline=None)
AUTHORS = (b"a", b"b", b"c")


def check_laws(a: T, b: T, c: T, merge: Callable[[T, T], T]) -> None:
    assert merge(a, b) == merge(b, a), "not commutative"
    assert merge(merge(a, b), c) == merge(a, merge(b, c)), "not associative"
    assert merge(a, a) == a, "not idempotent"


# -- LWW ---------------------------------------------------------------------------------


def stamp_for(hlc: int, author: bytes, value: int | None) -> Stamp:
    # Rule 4 of crdt.py: the tiebreak derives from the value written
    return Stamp(hlc, author, b"" if value is None else value.to_bytes(2, "big"))


def make_register(hlc: int, author: bytes, value: int, dead: bool) -> LWWRegister[int]:
    return LWWRegister(stamp_for(hlc, author, value), None if dead else value)


registers = st.builds(
    make_register, st.integers(0, 3), st.sampled_from(AUTHORS), st.integers(0, 3), st.booleans()
)


@LAWS
@given(registers, registers, registers)
def test_lww_register_merge_laws(
    a: LWWRegister[int], b: LWWRegister[int], c: LWWRegister[int]
) -> None:
    check_laws(a, b, c, lambda x, y: x.merge(y))


def test_lww_register_newest_wins_then_author_breaks_ties() -> None:
    old, new = LWWRegister(Stamp(1, b"z"), "old"), LWWRegister(Stamp(2, b"a"), "new")
    assert old.merge(new) is new and new.merge(old) is new
    low, high = LWWRegister(Stamp(5, b"a"), "low"), LWWRegister(Stamp(5, b"b"), "high")
    assert low.merge(high).value == "high" and high.merge(low).value == "high"


def test_lww_tombstone_outranks_same_stamp_and_loses_to_newer() -> None:
    live = LWWRegister(Stamp(3, b"a", b"v"), "v")
    dead = live.tombstone()
    assert dead.is_tombstone and dead.stamp == live.stamp
    assert live.merge(dead) is dead and dead.merge(live) is dead
    newer = LWWRegister(Stamp(4, b"a", b"w"), "w")
    assert dead.merge(newer) is newer


Op = tuple[str, int, int, bytes, int]
map_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "prune"]),
        st.integers(0, 3),
        st.integers(0, 4),
        st.sampled_from(AUTHORS),
        st.integers(0, 3),
    ),
    max_size=10,
)


def build_map(ops: list[Op]) -> LWWMap[int, int]:
    m: LWWMap[int, int] = LWWMap()
    for op, key, hlc, author, value in ops:
        if op == "set":
            m = m.set(key, value, stamp_for(hlc, author, value))
        else:  # prune everything whose value is below the threshold

            def below(_key: int, v: int, limit: int = value) -> bool:
                return v < limit

            m = m.prune(below)
    return m


@LAWS
@given(map_ops, map_ops, map_ops)
def test_lww_map_merge_laws(a: list[Op], b: list[Op], c: list[Op]) -> None:
    check_laws(build_map(a), build_map(b), build_map(c), lambda x, y: x.merge(y))


def test_lww_map_set_get_prune_and_no_resurrection() -> None:
    m: LWWMap[str, int] = LWWMap()
    m1 = m.set("k", 1, Stamp(1, b"a", b"1"))
    assert m.get("k") is None and m1.get("k") == 1  # copy-on-write: m unchanged
    m2 = m1.prune(lambda k, v: v == 1)
    assert m2.get("k") is None and m2.register("k") == LWWRegister(Stamp(1, b"a", b"1"), None)
    assert m2.merge(m1).get("k") is None, "a pruned value came back through merge"
    m3 = m2.set("k", 2, Stamp(2, b"a", b"2"))
    assert m3.get("k") == 2 and dict(m3.items()) == {"k": 2}
    assert m3.set("k", 0, Stamp(0, b"a", b"0")) is m3, "an older write changed the map"


def test_lww_map_without_drops_keys_and_repr() -> None:
    m = LWWMap[str, int]().set("a", 1, Stamp(1, b"x")).set("b", 2, Stamp(1, b"y"))
    assert dict(m.without(lambda k: k == "a").items()) == {"b": 2}
    assert m.without(lambda k: False) is m
    assert repr(m.prune(lambda k, v: v == 1)) == "LWWMap(live=1, tombstones=1)"


# -- AddWinsSet --------------------------------------------------------------------------

set_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove"]),
        st.integers(0, 3),
        st.sampled_from(AUTHORS),
        st.integers(0, 5),
    ),
    max_size=10,
)


def build_set(ops: list[tuple[str, int, bytes, int]]) -> AddWinsSet[int]:
    s: AddWinsSet[int] = AddWinsSet()
    for op, element, author, hlc in ops:
        s = s.add(element, (author, hlc)) if op == "add" else s.remove(element)
    return s


@LAWS
@given(set_ops, set_ops, set_ops)
def test_add_wins_set_merge_laws(
    a: list[tuple[str, int, bytes, int]],
    b: list[tuple[str, int, bytes, int]],
    c: list[tuple[str, int, bytes, int]],
) -> None:
    check_laws(build_set(a), build_set(b), build_set(c), lambda x, y: x.merge(y))


def test_add_wins_over_concurrent_remove() -> None:
    base = AddWinsSet[str]().add("x", (b"a", 1))
    removed = base.remove("x")  # replica 1 removes what it observed
    re_added = base.add("x", (b"b", 2))  # replica 2 concurrently adds again
    assert "x" not in removed
    assert "x" in removed.merge(re_added) and "x" in re_added.merge(removed)
    assert removed.merge(re_added).dots_of("x") == frozenset({(b"b", 2)})


def test_add_wins_set_remove_before_add_arrives() -> None:
    early_remove = AddWinsSet[str]().remove_dots([(b"a", 1)])
    late_add = AddWinsSet[str]().add("x", (b"a", 1))
    assert "x" not in early_remove.merge(late_add)
    assert early_remove.merge(late_add).elements() == frozenset()


# -- GrowOnlySet -------------------------------------------------------------------------

gsets = st.frozensets(st.integers(0, 6), max_size=5).map(GrowOnlySet)


@LAWS
@given(gsets, gsets, gsets)
def test_grow_only_set_merge_laws(
    a: GrowOnlySet[int], b: GrowOnlySet[int], c: GrowOnlySet[int]
) -> None:
    check_laws(a, b, c, lambda x, y: x.merge(y))


def test_grow_only_set_add_is_copy_on_write() -> None:
    s = GrowOnlySet([1])
    t = s.add(2)
    assert 2 not in s and set(t) == {1, 2} and len(t) == 2
    assert t.add(2) is t


def test_stamp_rejects_negative_hlc() -> None:
    with pytest.raises(ValueError, match=r"stamp hlc: expected an int >= 0, got -1"):
        Stamp(-1, b"a")
