"""From what the mesh knows to a route: the seam between the job engine and the mesh.

Rule 1: the engine sees the mesh only through `MeshView`: hosted spans with their load,
measured links, a way to open an exec stream, and a way to report a misbehaving host
(`nexusd.node.mesh_service.NodeView`; outside any mesh its only host is the node itself).
Rule 2: plans are origin-driven (`relay_via_origin`): every hop's input goes out from the
origin and its output comes back to it, so a hop costs the origin<->host link both ways.
Rule 3: a sub-range [start, end) is planned by clipping every hosted span to it, so a
failed span is re-planned with exactly the same cost model as a whole route.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, Protocol

from mesh.errors import NoRoute
from mesh.routing import HostSpan, JobShape, Link, RouteConfig, plan_route
from mesh.state import SpanProfile

from ..errors import ApiError
from .session import HopPlan, Planner

DEFAULT_COMPUTE_S_PER_ATOM = 0.002  # for a host that has not reported a measured figure


def advertised_compute_s(profiles: Sequence[SpanProfile], model_id: str, start: int) -> float:
    """A host's measured seconds per atom for its span of `model_id` starting at `start`
    (any span of the model if that one is not profiled), else the default."""
    mine = [p for p in profiles if p.model_id == model_id]
    exact = [p for p in mine if p.start == start]
    chosen = exact or mine
    return chosen[0].compute_s_per_atom if chosen else DEFAULT_COMPUTE_S_PER_ATOM


class ExecStream(Protocol):
    remote_id: bytes

    async def send(self, payload: bytes) -> None: ...
    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes: ...
    async def aclose(self) -> None: ...


class MeshView(Protocol):
    """What the job engine needs from the mesh."""

    node_id: bytes

    def host_spans(self, model_id: str) -> list[HostSpan]: ...
    def links(self) -> list[Link]: ...
    def name_of(self, node_id: bytes) -> str: ...
    def is_member(self, node_id: bytes) -> bool: ...
    async def open_exec_stream(self, node_id: bytes) -> ExecStream: ...
    def report(self, node_id: bytes, penalty: str) -> None: ...


def make_planner(
    view: MeshView,
    *,
    model_id: str,
    bytes_per_hop: int,
    kv_tokens: int,
    kind: Literal["latency", "batch"],
    rng: random.Random,
    cfg: RouteConfig | None = None,
) -> Planner:
    """A `Planner` for `RoutedSession` over the current state of the mesh."""
    route_cfg = cfg or RouteConfig(relay_via_origin=True)

    def plan(start: int, end: int, excluded: frozenset[bytes]) -> list[HopPlan]:
        spans = clip(view.host_spans(model_id), start, end)
        shape = JobShape(model_id, end - start, bytes_per_hop, kv_tokens, kind)
        try:
            route = plan_route(
                spans, view.links(), view.node_id, shape, route_cfg, excluded=excluded, rng=rng
            )
        except NoRoute as exc:
            raise ApiError(
                "unavailable",
                f"no route for {model_id} atoms [{start},{end}): {exc}"
                + (f" (excluded after failures: {len(excluded)} hosts)" if excluded else ""),
            ) from None
        return [HopPlan(h.host, h.start + start, h.end + start) for h in route.hops]

    return plan


def clip(spans: Sequence[HostSpan], start: int, end: int) -> list[HostSpan]:
    """Spans cut to [start, end) and shifted so that `start` becomes atom 0."""
    out = []
    for s in spans:
        lo, hi = max(s.start, start), min(s.end, end)
        if lo < hi:
            out.append(replace(s, start=lo - start, end=hi - start))
    return out
