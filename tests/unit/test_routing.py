"""Route planner: hand-built meshes, a brute-force reference, Hypothesis invariants."""

from __future__ import annotations

import collections
import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import MeshError, NoRoute
from mesh.routing import (
    HostSpan,
    JobShape,
    Link,
    Route,
    RouteConfig,
    RouteHop,
    plan_route,
    reroute_span,
)

ORIGIN = b"o" * 32  # the origin
A, B, C, D = (bytes([i]) * 32 for i in (1, 2, 3, 4))
CFG = RouteConfig()
LAT = JobShape("m", 4, bytes_per_hop=1000)


def span(host: bytes, start: int, end: int, c: float = 0.01, **kw: float) -> HostSpan:
    return HostSpan(host, "m", start, end, compute_s_per_atom=c, **kw)  # type: ignore[arg-type]


def hosts_of(route: Route) -> list[tuple[bytes, int, int]]:
    return [(h.host, h.start, h.end) for h in route.hops]


# --- hand-built meshes -------------------------------------------------------------------


def test_long_queue_makes_a_host_avoided() -> None:
    spans = [span(A, 0, 4, queue_depth=5), span(B, 0, 4)]
    assert hosts_of(plan_route(spans, [], ORIGIN, LAT, CFG)) == [(B, 0, 4)]


def test_high_utilisation_makes_a_host_avoided() -> None:
    spans = [span(A, 0, 4, utilisation=1.0), span(B, 0, 4, utilisation=0.1)]
    assert hosts_of(plan_route(spans, [], ORIGIN, LAT, CFG)) == [(B, 0, 4)]


@pytest.mark.parametrize(
    "bad", [Link(ORIGIN, A, 0.8, 1e8), Link(ORIGIN, A, 0.001, 1e4)], ids=["rtt", "bandwidth"]
)
def test_slow_link_makes_a_host_avoided(bad: Link) -> None:
    spans = [span(A, 0, 4), span(B, 0, 4)]
    links = [bad, Link(ORIGIN, B, 0.01, 1e8)]
    assert hosts_of(plan_route(spans, links, ORIGIN, LAT, CFG)) == [(B, 0, 4)]


def test_slow_link_between_hosts_picks_the_other_replica() -> None:
    spans = [span(A, 0, 2), span(B, 2, 4), span(C, 2, 4)]
    links = [Link(A, B, 2.0, 1e8)]  # measured, dearer than an unmeasured pair
    assert hosts_of(plan_route(spans, links, ORIGIN, LAT, CFG)) == [(A, 0, 2), (C, 2, 4)]


def test_kv_shortage_is_a_penalty_not_a_removal() -> None:
    shape = JobShape("m", 4, bytes_per_hop=1000, kv_tokens_needed=100)
    short, roomy = span(A, 0, 4, free_kv_tokens=10), span(B, 0, 4, c=0.05, free_kv_tokens=500)
    assert hosts_of(plan_route([short, roomy], [], ORIGIN, shape, CFG)) == [(B, 0, 4)]
    only = plan_route([short], [], ORIGIN, shape, CFG)
    assert hosts_of(only) == [(A, 0, 4)]
    assert only.hops[0].est_penalty_s == CFG.kv_shortage_penalty_s


def test_recent_failure_penalty_steers_away() -> None:
    spans = [span(A, 0, 4, penalty_s=15.0), span(B, 0, 4, c=0.2)]
    assert hosts_of(plan_route(spans, [], ORIGIN, LAT, CFG)) == [(B, 0, 4)]


def test_excluded_hosts_never_appear() -> None:
    spans = [span(A, 0, 4, c=0.0), span(B, 0, 4, c=1.0)]
    route = plan_route(spans, [], ORIGIN, LAT, CFG, excluded=frozenset({A}))
    assert hosts_of(route) == [(B, 0, 4)]


def test_no_route_names_the_first_missing_atom() -> None:
    spans = [span(A, 0, 2), span(B, 3, 4), span(C, 2, 3)]
    with pytest.raises(NoRoute, match=r"no usable host covers atom 2 of \[0, 4\)") as info:
        plan_route(spans, [], ORIGIN, LAT, CFG, excluded=frozenset({C}))
    assert info.value.atom == 2
    assert isinstance(info.value, MeshError)


def test_other_models_are_ignored() -> None:
    other = HostSpan(A, "other", 0, 4, compute_s_per_atom=0.0)
    with pytest.raises(NoRoute, match="atom 0"):
        plan_route([other], [], ORIGIN, LAT, CFG)


def test_local_route_wins_when_the_origin_hosts_everything() -> None:
    spans = [span(ORIGIN, 0, 4, c=0.01), span(A, 0, 2, c=0.001), span(B, 2, 4, c=0.001)]
    route = plan_route(
        spans, [Link(ORIGIN, A, 0.001, 1e9), Link(A, B, 0.001, 1e9)], ORIGIN, LAT, CFG
    )
    assert hosts_of(route) == [(ORIGIN, 0, 4)]
    assert route.hops[0].est_transfer_s == 0.0
    assert route.est_return_s == 0.0
    assert math.isclose(route.est_total_s, 0.04)


def test_remote_route_only_when_cheaper_than_local() -> None:
    spans = [span(ORIGIN, 0, 4, c=1.0), span(A, 0, 4, c=0.001)]
    assert hosts_of(plan_route(spans, [], ORIGIN, LAT, CFG)) == [(A, 0, 4)]


def test_mid_span_entry_and_the_last_atom_exit() -> None:
    spans = [span(A, 0, 2), span(B, 1, 4, c=0.001), span(C, 1, 6)]
    shape = JobShape("m", 4, bytes_per_hop=1000)
    assert hosts_of(plan_route(spans, [], ORIGIN, shape, CFG)) == [(A, 0, 2), (B, 2, 4)]


def test_adjacent_spans_of_one_host_need_no_transfer() -> None:
    spans = [span(A, 0, 2), span(A, 2, 4), span(B, 2, 4, c=0.0)]
    route = plan_route(spans, [], ORIGIN, LAT, CFG)
    assert [h.host for h in route.hops] == [A, A]
    assert route.hops[1].est_transfer_s == 0.0


def test_overlapping_spans_of_one_host_are_rejected() -> None:
    with pytest.raises(ValueError, match="overlapping spans of model m at atom 1"):
        plan_route([span(A, 0, 2), span(A, 1, 4)], [], ORIGIN, LAT, CFG)


def test_relay_via_origin_charges_both_legs() -> None:
    cfg = RouteConfig(relay_via_origin=True)
    spans = [span(A, 0, 2), span(B, 2, 4)]
    links = [Link(ORIGIN, A, 0.02, 1e9), Link(ORIGIN, B, 0.04, 1e9), Link(A, B, 0.001, 1e9)]
    route = plan_route(spans, links, ORIGIN, LAT, cfg)
    leg = 1000 / 1e9 + cfg.per_message_overhead_s
    assert math.isclose(route.hops[1].est_transfer_s, 0.01 + 0.02 + 2 * leg)


def test_batch_jobs_need_an_rng() -> None:
    with pytest.raises(ValueError, match="injected rng"):
        plan_route([span(A, 0, 4)], [], ORIGIN, JobShape("m", 4, 1, kind="batch"), CFG)


def test_batch_spreads_over_replicas_deterministically() -> None:
    spans = [span(h, 0, 4) for h in (A, B, C)] + [span(D, 0, 4, c=1.0)]
    shape = JobShape("m", 4, bytes_per_hop=1000, kind="batch")

    def counts(seed: int) -> collections.Counter[bytes]:
        rng = random.Random(seed)
        return collections.Counter(
            plan_route(spans, [], ORIGIN, shape, CFG, rng=rng).hops[0].host for _ in range(300)
        )

    got = counts(7)
    assert got == counts(7)  # same seed, same routes
    assert set(got) == {A, B, C}  # the far slower replica D is outside the slack
    assert min(got.values()) > 60  # ~100 each


def test_reroute_span_keeps_other_hops() -> None:
    spans = [span(A, 0, 1), span(B, 1, 3), span(C, 1, 3, c=0.02), span(D, 3, 4)]
    route = plan_route(spans, [], ORIGIN, LAT, CFG)
    assert hosts_of(route) == [(A, 0, 1), (B, 1, 3), (D, 3, 4)]
    fixed = reroute_span(route, B, spans, [], ORIGIN, LAT, CFG)
    assert hosts_of(fixed) == [(A, 0, 1), (C, 1, 3), (D, 3, 4)]
    assert fixed.hops[0] == route.hops[0]
    assert fixed.hops[2].est_compute_s == route.hops[2].est_compute_s
    with pytest.raises(NoRoute, match="atom 0"):
        reroute_span(route, A, spans, [], ORIGIN, LAT, CFG)


def test_records_validate() -> None:
    with pytest.raises(ValueError, match="start < end"):
        span(A, 2, 2)
    with pytest.raises(ValueError, match="compute_s_per_atom"):
        span(A, 0, 1, c=math.nan)
    with pytest.raises(ValueError, match="bandwidth"):
        Link(A, B, 0.1, 0.0)
    with pytest.raises(ValueError, match="kind"):
        JobShape("m", 1, 1, kind="bulk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contiguous"):
        Route((RouteHop(A, 0, 1, 0, 0), RouteHop(B, 2, 3, 0, 0)))


# --- brute force reference and invariants ------------------------------------------------


def reference_cost(
    spans: list[HostSpan], links: list[Link], shape: JobShape, cfg: RouteConfig
) -> float:
    """Petals' full pairwise graph, solved by a DP over span exits (no hubs)."""
    pair: dict[tuple[bytes, bytes], float] = {}
    for k in links:  # a pair measured twice: the cheaper measure
        cost = min(k.rtt_s, cfg.max_rtt_s) / 2 + shape.bytes_per_hop / k.bandwidth_bytes_per_s
        pair[(k.src, k.dst)] = min(cost, pair.get((k.src, k.dst), math.inf))
    for (a, b), v in list(pair.items()):
        pair.setdefault((b, a), v)
    unknown = (
        min(cfg.unknown_rtt_s, cfg.max_rtt_s) / 2
        + shape.bytes_per_hop / cfg.default_bandwidth_bytes_per_s
    )

    def t(a: bytes, b: bytes) -> float:
        return 0.0 if a == b else pair.get((a, b), unknown) + cfg.per_message_overhead_s

    def hop(a: bytes, b: bytes) -> float:
        return t(a, ORIGIN) + t(ORIGIN, b) if cfg.relay_via_origin and a != b else t(a, b)

    n = shape.n_atoms
    best: dict[int, float] = {}
    order = sorted(range(len(spans)), key=lambda j: min(spans[j].end, n))
    for j in order:
        h = spans[j]
        rate = h.compute_s_per_atom * (
            1 + h.queue_depth * cfg.queue_factor_per_item + h.utilisation * cfg.utilisation_factor
        )
        pen = h.penalty_s + (
            cfg.kv_shortage_penalty_s if h.free_kv_tokens < shape.kv_tokens_needed else 0.0
        )
        stop = min(h.end, n)
        cands = [t(ORIGIN, h.host) + pen + rate * stop] if h.start == 0 else []
        for i in best:
            e = spans[i].end
            if h.start <= e < stop:
                cands.append(best[i] + hop(spans[i].host, h.host) + pen + rate * (stop - e))
        if cands:
            best[j] = min(cands)
    return min(best[j] + t(spans[j].host, ORIGIN) for j in best if spans[j].end >= n)


HOST_IDS = [bytes([i]) * 32 for i in range(1, 9)] + [ORIGIN]


@st.composite
def meshes(
    draw: st.DrawFn,
) -> tuple[list[HostSpan], list[Link], JobShape, RouteConfig, frozenset[bytes]]:
    n = draw(st.integers(1, 6))
    spans: list[HostSpan] = []
    chosen = draw(st.lists(st.sampled_from(HOST_IDS), min_size=1, max_size=9, unique=True))
    for host in chosen:
        start = draw(st.integers(0, n - 1))
        spans.append(
            HostSpan(
                host,
                "m",
                start,
                start + draw(st.sampled_from([1, 1, 2, 3, n])),
                compute_s_per_atom=draw(st.sampled_from([0.0, 0.001, 0.01, 0.1])),
                queue_depth=draw(st.integers(0, 3)),
                utilisation=draw(st.sampled_from([0.0, 0.5, 1.0])),
                free_kv_tokens=draw(st.sampled_from([0, 100])),
                penalty_s=draw(st.sampled_from([0.0, 0.0, 15.0])),
            )
        )
    ends = [*chosen, ORIGIN]
    pairs = st.tuples(st.sampled_from(ends), st.sampled_from(ends)).filter(lambda p: p[0] != p[1])
    links = [
        Link(
            a,
            b,
            draw(st.sampled_from([0.001, 0.1, 0.4, 9.0])),
            draw(st.sampled_from([1e4, 1e6, 1e9])),
        )
        for a, b in draw(st.lists(pairs, max_size=30))
    ]
    shape = JobShape(
        "m",
        n,
        bytes_per_hop=draw(st.sampled_from([0, 1000])),
        kv_tokens_needed=draw(st.sampled_from([0, 50])),
    )
    cfg = RouteConfig(relay_via_origin=draw(st.booleans()))
    excluded = frozenset(draw(st.lists(st.sampled_from(HOST_IDS), max_size=2)))
    return spans, links, shape, cfg, excluded


def check_shape(route: Route, spans: list[HostSpan], n: int, excluded: frozenset[bytes]) -> None:
    assert route.hops[0].start == 0
    assert route.hops[-1].end == n
    for prev, nxt in zip(route.hops, route.hops[1:], strict=False):
        assert prev.end == nxt.start
    for hop in route.hops:
        assert hop.host not in excluded
        assert any(s.host == hop.host and s.start <= hop.start and hop.end <= s.end for s in spans)


@settings(max_examples=50, deadline=None)
@given(meshes())
def test_route_invariants_and_optimality(
    mesh: tuple[list[HostSpan], list[Link], JobShape, RouteConfig, frozenset[bytes]],
) -> None:
    check_invariants_and_optimality(mesh)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(meshes())
def test_route_invariants_and_optimality_long(
    mesh: tuple[list[HostSpan], list[Link], JobShape, RouteConfig, frozenset[bytes]],
) -> None:
    check_invariants_and_optimality(mesh)


def check_invariants_and_optimality(
    mesh: tuple[list[HostSpan], list[Link], JobShape, RouteConfig, frozenset[bytes]],
) -> None:
    spans, links, shape, cfg, excluded = mesh
    usable = [s for s in spans if s.host not in excluded]
    covered = {a for s in usable for a in range(s.start, s.end)}
    missing = [a for a in range(shape.n_atoms) if a not in covered]
    if missing:  # then, and only then, NoRoute names the first missing atom
        with pytest.raises(NoRoute, match=f"covers atom {missing[0]} ") as info:
            plan_route(spans, links, ORIGIN, shape, cfg, excluded=excluded)
        assert info.value.atom == missing[0]
        return
    route = plan_route(spans, links, ORIGIN, shape, cfg, excluded=excluded)
    check_shape(route, spans, shape.n_atoms, excluded)
    assert math.isclose(
        route.est_total_s, reference_cost(usable, links, shape, cfg), rel_tol=1e-9, abs_tol=1e-12
    )
    batch = JobShape(
        shape.model_id, shape.n_atoms, shape.bytes_per_hop, shape.kv_tokens_needed, "batch"
    )
    spread = plan_route(spans, links, ORIGIN, batch, cfg, excluded=excluded, rng=random.Random(1))
    check_shape(spread, spans, shape.n_atoms, excluded)
    assert spread.est_total_s <= route.est_total_s * (1 + cfg.spread_slack) + 1e-9


def random_mesh(seed: int, relay: bool) -> tuple[list[HostSpan], list[Link], JobShape, RouteConfig]:
    """Medium meshes full of measured links dearer than unknown (the hub's hard case)."""
    rng = random.Random(seed)
    n, ids = 8, [bytes([i]) * 32 for i in range(1, 41)]
    spans = []
    for host in ids:
        start = rng.randrange(n)
        spans.append(
            span(host, start, min(n, start + rng.randint(1, 4)), c=rng.choice([0.001, 0.01, 0.05]))
        )
    links = [
        Link(a, b, rng.choice([0.001, 0.05, 0.5, 3.0]), rng.choice([1e5, 1e8]))
        for a, b in (rng.sample([*ids, ORIGIN], 2) for _ in range(400))
    ]
    return spans, links, JobShape("m", n, bytes_per_hop=10_000), RouteConfig(relay_via_origin=relay)


@pytest.mark.parametrize("relay", [False, True])
def test_matches_the_full_pairwise_graph_on_dense_links(relay: bool) -> None:
    for seed in range(25):
        spans, links, shape, cfg = random_mesh(seed, relay)
        try:
            route = plan_route(spans, links, ORIGIN, shape, cfg)
        except NoRoute:
            continue
        check_shape(route, spans, shape.n_atoms, frozenset())
        assert math.isclose(
            route.est_total_s, reference_cost(spans, links, shape, cfg), rel_tol=1e-9
        )


def test_dear_links_are_not_bypassed_through_the_hub() -> None:
    # A1..A3 end at 2; B and C continue. A2 -> B is measured dear; the rest unmeasured.
    a1, a2, a3 = (bytes([i]) * 32 for i in (11, 12, 13))
    spans = [
        span(a1, 0, 2, c=0.5),
        span(a2, 0, 2, c=0.0),
        span(a3, 0, 2, c=0.5),
        span(B, 2, 4, c=0.0),
        span(C, 2, 4, c=0.02),
    ]
    links = [Link(a2, B, 4.0, 1e8)]
    route = plan_route(spans, links, ORIGIN, LAT, CFG)
    assert hosts_of(route) == [(a2, 0, 2), (C, 2, 4)]
    assert math.isclose(route.est_total_s, reference_cost(spans, links, LAT, CFG))


def test_est_total_is_the_sum_of_graph_edge_weights() -> None:
    from mesh.routing import _Builder  # the graph itself: white-box check

    for seed in range(5):
        spans, links, shape, cfg = random_mesh(seed, relay=seed % 2 == 1)
        try:
            plan = _Builder(spans, links, shape, cfg, frozenset()).build(
                ORIGIN, ORIGIN, 0, shape.n_atoms, origin=ORIGIN
            )
        except NoRoute:
            continue
        path = plan.shortest()
        weight = math.fsum(plan.graph.edges[u, v]["weight"] for u, v in itertools.pairwise(path))
        assert math.isclose(plan.to_route(path).est_total_s, weight, rel_tol=1e-12)


def test_reroute_span_with_relay_goes_through_the_origin() -> None:
    cfg = RouteConfig(relay_via_origin=True)
    spans = [span(A, 0, 2), span(B, 2, 4), span(C, 2, 4, c=0.1)]
    links = [Link(ORIGIN, A, 0.02, 1e9), Link(ORIGIN, C, 0.04, 1e9), Link(A, C, 0.001, 1e9)]
    route = plan_route(spans, links, ORIGIN, LAT, cfg)
    assert [h.host for h in route.hops] == [A, B]
    fixed = reroute_span(route, B, spans, links, ORIGIN, LAT, cfg)
    leg = 1000 / 1e9 + cfg.per_message_overhead_s
    assert hosts_of(fixed) == [(A, 0, 2), (C, 2, 4)]
    assert math.isclose(fixed.hops[1].est_transfer_s, 0.01 + 0.02 + 2 * leg)
    assert math.isclose(fixed.est_return_s, 0.02 + leg)
    assert math.isclose(
        fixed.est_total_s,
        plan_route(spans, links, ORIGIN, LAT, cfg, excluded=frozenset({B})).est_total_s,
    )


def test_input_order_does_not_change_the_route() -> None:
    spans, links, shape, cfg = random_mesh(3, relay=False)
    want = plan_route(spans, links, ORIGIN, shape, cfg)
    rng = random.Random(0)
    for _ in range(3):
        rng.shuffle(spans)
        rng.shuffle(links)
        assert plan_route(spans, links, ORIGIN, shape, cfg) == want
