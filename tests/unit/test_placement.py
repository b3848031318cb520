"""Automatic placement (`mesh.placement`): the chosen span fits, turns cover the model,
rebalancing has hysteresis and takes turns; measured speeds steer routing."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.placement import (
    Placed,
    atom_throughput,
    bottleneck,
    choose_span,
    rebalance,
)
from mesh.routing import HostSpan, JobShape, RouteConfig, plan_route
from mesh.state import Advert, HostedSpan, NodeState, SpanProfile
from nexusd.exec.planner import DEFAULT_COMPUTE_S_PER_ATOM, advertised_compute_s

A, B, C, D = (bytes([i]) * 32 for i in (1, 2, 3, 4))


def _layouts() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 100), min_size=1, max_size=24)


@settings(max_examples=200, deadline=None)
@given(
    sizes=_layouts(),
    budget=st.integers(0, 3000),
    speed=st.floats(1e-4, 1.0),
    others=st.lists(st.tuples(st.integers(0, 23), st.integers(1, 8), st.floats(1e-4, 1.0))),
)
def test_chosen_span_fits_memory(
    sizes: list[int], budget: int, speed: float, others: list[tuple[int, int, float]]
) -> None:
    n = len(sizes)
    placed = [
        Placed(bytes([i + 10]) * 32, s % n, min(n, s % n + k), c)
        for i, (s, k, c) in enumerate(others)
    ]
    span = choose_span(n, sizes, placed, speed, budget)
    if span is None:
        assert min(sizes) > budget  # only refused when not one atom fits
        return
    start, end = span
    assert 0 <= start < end <= n
    assert sum(sizes[start:end]) <= budget
    # the longest window from that start: one more atom would not fit
    assert end == n or sum(sizes[start : end + 1]) > budget


@settings(max_examples=200, deadline=None)
@given(
    sizes=_layouts(),
    speeds=st.tuples(*(st.floats(1e-4, 1.0) for _ in range(3))),
    slack=st.tuples(*(st.integers(0, 200) for _ in range(3))),
)
def test_three_hosts_in_turn_cover_the_model(
    sizes: list[int], speeds: tuple[float, ...], slack: tuple[int, ...]
) -> None:
    """Each host fits a third of the model plus its largest atom: three in turn leave no gap."""
    n = len(sizes)
    need = -(-sum(sizes) // 3) + max(sizes)
    placed: list[Placed] = []
    for host, speed, extra in zip((A, B, C), speeds, slack, strict=True):
        span = choose_span(n, sizes, placed, speed, need + extra)
        assert span is not None
        assert sum(sizes[span[0] : span[1]]) <= need + extra
        placed.append(Placed(host, span[0], span[1], speed, auto=True))
    assert min(atom_throughput(n, placed)) > 0


def test_choose_span_takes_the_gap_then_the_bottleneck() -> None:
    sizes = [10] * 12
    first = choose_span(12, sizes, [], 0.01, 80)
    assert first == (0, 8)
    placed = [Placed(A, 0, 8, 0.01)]
    # covers the gap 8-12; from 5 rather than 4: a shorter span serves each atom faster
    assert choose_span(12, sizes, placed, 0.01, 80) == (5, 12)
    # a fast host over 0-6 and a slow one over 6-12: the next host goes to the slow side
    placed = [Placed(A, 0, 6, 0.001), Placed(B, 6, 12, 0.01)]
    assert choose_span(12, sizes, placed, 0.01, 60) == (6, 12)


def test_bottleneck_names_the_least_served_run() -> None:
    placed = [Placed(A, 0, 6, 0.001), Placed(B, 6, 12, 0.01), Placed(C, 8, 12, 0.01)]
    b = bottleneck(12, placed)
    assert (b.start, b.end) == (6, 8)
    assert abs(b.tokens_per_s - 1 / (0.01 * 6)) < 1e-9
    gap = bottleneck(12, [Placed(A, 0, 4, 0.01)])
    assert (gap.start, gap.end, gap.tokens_per_s) == (4, 12, 0.0)


def test_rebalance_covers_a_gap_and_the_smallest_id_moves_first() -> None:
    sizes = [10] * 12
    # B and C both serve 0-8 (they placed at the same moment); 8-12 has nobody
    placed = [Placed(C, 0, 8, 0.01, True), Placed(B, 0, 8, 0.01, True)]
    memory = {B: 80, C: 80}
    move = rebalance(12, sizes, placed, memory, threshold=0.2)
    assert move is not None and move.host == B  # the smaller id of the two movers
    assert (move.start, move.end) == (5, 12) and move.covered_after == 12
    after = [Placed(C, 0, 8, 0.01, True), Placed(B, 5, 12, 0.01, True)]
    assert rebalance(12, sizes, after, memory, threshold=0.2) is None  # settled


def test_rebalance_has_hysteresis_and_manual_spans_never_move() -> None:
    sizes = [10] * 12
    memory = {A: 120, B: 120, C: 120}
    # covered, but atom 11 has B only: A moving to 0-12 doubles the swarm's throughput
    placed = [Placed(A, 0, 11, 0.01, True), Placed(B, 0, 12, 0.01, True)]
    move = rebalance(12, sizes, placed, memory, threshold=0.5)
    assert move is not None and move.host == A and (move.start, move.end) == (0, 12)
    assert abs(move.after / move.before - 2.0) < 1e-9
    assert rebalance(12, sizes, placed, memory, threshold=1.5) is None  # below the threshold
    manual = [Placed(A, 0, 11, 0.01, False), Placed(B, 0, 12, 0.01, False)]
    assert rebalance(12, sizes, manual, memory, threshold=0.0) is None


def test_a_manual_span_beside_an_auto_one_is_no_move_under_way() -> None:
    sizes = [10] * 12
    # B serves 0-8 by hand and 0-4 by itself; 8-12 has nobody: B's auto span moves there
    placed = [Placed(B, 0, 8, 0.01, False), Placed(B, 0, 4, 0.01, True)]
    move = rebalance(12, sizes, placed, {B: 40}, threshold=0.2)
    assert move is not None and move.host == B and move.old == ((0, 4),)
    assert (move.start, move.end) == (8, 12)


def test_nobody_moves_while_a_move_is_under_way() -> None:
    sizes = [10] * 12
    memory = {A: 80, B: 80, C: 80}
    # A is mid-move (old and new span both served); C would otherwise want to move
    placed = [
        Placed(A, 0, 8, 0.01, True),
        Placed(A, 4, 12, 0.01, True),
        Placed(C, 0, 8, 0.01, True),
    ]
    assert rebalance(12, sizes, placed, memory, threshold=0.2) is None


def test_routing_avoids_a_host_measured_slower() -> None:
    """Two hosts of the whole model, one advertising a measured 20x slower step: routes go
    to the fast one; without profiles both cost the default."""
    fast = SpanProfile("m", 0, 4, 0.001, 512)
    slow = SpanProfile("m", 0, 4, 0.02, 512)
    span = HostedSpan("m", 0, 4, "float32")
    adverts = {
        B: Advert((span,), 1 << 30, 4096, (), (), NodeState.ONLINE, 0, "", (slow,), 1 << 30),
        C: Advert((span,), 1 << 30, 4096, (), (), NodeState.ONLINE, 0, "", (fast,), 1 << 30),
    }
    hosts = [
        HostSpan(h, "m", 0, 4, advertised_compute_s(a.profiles, "m", 0), 0, 0.0, 4096)
        for h, a in sorted(adverts.items())
    ]
    assert [h.compute_s_per_atom for h in hosts] == [0.02, 0.001]
    shape = JobShape("m", 4, 1024, 16)
    cfg = RouteConfig(relay_via_origin=True)
    for seed in range(5):
        route = plan_route(hosts, [], A, shape, cfg, rng=random.Random(seed))
        assert [h.host for h in route.hops] == [C]
    assert advertised_compute_s((), "m", 0) == DEFAULT_COMPUTE_S_PER_ATOM


def test_bench_all_reports_the_placement_ratio() -> None:
    from bench import all as bench_all

    doc = {
        "ratio": 0.95,
        "auto_tokens_per_s": 19.0,
        "best_manual_tokens_per_s": 20.0,
        "best_manual": "cut5+second",
    }
    rows = [r for r in bench_all.table({"placement": doc}).splitlines() if "bench.placement" in r]
    assert len(rows) == 1
    assert "0.95x (19.0 vs 20.0 tok/s, best manual: cut5+second)" in rows[0]
    assert "1.06x of target ✓" in rows[0]
