"""Hybrid logical clock: packing, monotonicity, drift refusal without state change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import FutureMessage
from mesh.hlc import COUNTER_MAX, HybridClock, Timestamp
from mesh.wire import decode, encode

# Hypothesis: few examples and no per-example deadline (2 shared cores, keep fast, not flaky)
FAST = settings(max_examples=40, deadline=None)

timestamps = st.builds(Timestamp, st.integers(0, 2**47 - 1), st.integers(0, COUNTER_MAX))


@FAST
@given(timestamps, timestamps)
def test_pack_round_trip_and_order(a: Timestamp, b: Timestamp) -> None:
    assert Timestamp.unpack(a.pack()) == a
    assert (a < b) == (a.pack() < b.pack())


@FAST
@given(timestamps)
def test_timestamp_record_round_trip(ts: Timestamp) -> None:
    assert decode(encode(ts), Timestamp) == ts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 0), "wall_ms: expected 0..2\\*\\*47-1, got -1"),
        ((0, 65536), "counter: expected 0..65535"),
    ],
)
def test_timestamp_validation(args: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Timestamp(*args)


def test_unpack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"expected an int in 0\.\.2\*\*63-1, got -5"):
        Timestamp.unpack(-5)


events = st.lists(
    st.tuples(
        st.floats(0, 5),  # wall clock step (it may also go backwards, below)
        st.booleans(),  # backwards?
        st.none() | st.tuples(st.integers(-3000, 3000), st.integers(0, COUNTER_MAX)),
    ),
    max_size=40,
)


@FAST
@given(events)
def test_now_and_observe_are_strictly_monotonic(
    steps: list[tuple[float, bool, tuple[int, int] | None]],
) -> None:
    clock = HybridClock(max_drift_s=2.0)
    wall = 1000.0
    prev = clock.now(wall)
    for step, backwards, remote in steps:
        wall = max(0.0, wall - step if backwards else wall + step)
        if remote is None:
            ts = clock.now(wall)
        else:
            offset_ms, counter = remote
            incoming = Timestamp(max(0, int(wall * 1000) + offset_ms), counter)
            try:
                ts = clock.observe(incoming, wall)
            except FutureMessage:
                assert clock.last == prev
                continue
            assert ts > incoming
        assert ts > prev
        assert clock.last == ts
        prev = ts


def test_now_follows_physical_time() -> None:
    clock = HybridClock(max_drift_s=1.0)
    assert clock.now(1.0) == Timestamp(1000, 0)
    assert clock.now(1.0) == Timestamp(1000, 1)
    assert clock.now(0.5) == Timestamp(1000, 2)  # wall went back: logical part orders it
    assert clock.now(2.0) == Timestamp(2000, 0)


def test_observe_takes_the_larger_counter() -> None:
    clock = HybridClock(max_drift_s=1.0)
    clock.now(1.0)
    assert clock.observe(Timestamp(1000, 7), 1.0) == Timestamp(1000, 8)
    assert clock.observe(Timestamp(1500, 3), 1.0) == Timestamp(1500, 4)


def test_counter_overflow_bumps_wall() -> None:
    clock = HybridClock(max_drift_s=1.0)
    clock.observe(Timestamp(1000, COUNTER_MAX - 1), 1.0)
    assert clock.now(1.0) == Timestamp(1001, 0)
    assert clock.observe(Timestamp(1001, COUNTER_MAX), 1.0) == Timestamp(1002, 0)


def test_future_timestamp_refused_and_clock_unchanged() -> None:
    clock = HybridClock(max_drift_s=1.0)
    clock.now(10.0)
    assert clock.observe(Timestamp(11_000, 0), 10.0) == Timestamp(11_000, 1)  # exactly at drift
    before = clock.last
    with pytest.raises(
        FutureMessage, match="1001 ms ahead of local time, over the allowed drift of 1000"
    ):
        clock.observe(Timestamp(11_001, 0), 10.0)
    assert clock.last == before


def test_invalid_wall_time() -> None:
    with pytest.raises(ValueError, match="expected finite seconds >= 0"):
        HybridClock(max_drift_s=1.0).now(float("nan"))
