"""The daemon's side of automatic placement: `Hoster` over its registry and `SpanHost`.

Rule: an auto span is hosted exactly like a manual one (`Daemon.host_span`: weights
verified, warmed up, profiled, advertised), only remembered as `auto` so that the
advert says it may move and the placement service may drop it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from ..api.records import BottleneckRow
from ..errors import NEXUS_ERRORS

if TYPE_CHECKING:
    from mesh.node import MeshNode

    from .daemon import Daemon
    from .placement_service import PlacementService

log = structlog.get_logger(__name__)


class DaemonHoster:
    """`placement_service.Hoster` for a running daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def __repr__(self) -> str:
        return f"DaemonHoster(auto={sorted(self._d.mesh.auto_spans)})"

    def layout(self, model_id: str) -> list[int] | None:
        try:
            manifest = self._d.registry.manifest(model_id)
        except NEXUS_ERRORS:
            return None
        return [e.nbytes for e in manifest.atoms]

    def auto_spans(self, model_id: str) -> list[tuple[int, int]]:
        return sorted((a, b) for m, a, b in self._d.mesh.auto_spans if m == model_id)

    def manual_spans(self, model_id: str) -> list[tuple[int, int]]:
        auto = self._d.mesh.auto_spans
        return [
            (h.start, h.end)
            for h in self._d.host.hosted()
            if h.model_id == model_id and (model_id, h.start, h.end) not in auto
        ]

    def compute_s_per_atom(self, model_id: str) -> float | None:
        profile = self._d.host.profile  # placement goes by the figure measured at load
        return profile.capacity(model_id) or profile.get(model_id)

    async def host(self, model_id: str, start: int, end: int) -> None:
        key = (model_id, start, end)
        self._d.mesh.auto_spans.add(key)  # before it is advertised: the advert says auto
        try:
            await self._d.host_span(f"{model_id}:{start}-{end}")
        except BaseException:  # cleanup, then re-raise: not a boundary
            self._d.mesh.auto_spans.discard(key)
            raise

    async def drop(self, model_id: str, start: int, end: int) -> None:
        self._d.host.remove_span(model_id, start, end)
        self._d.mesh.auto_spans.discard((model_id, start, end))
        self._d.mesh.refresh_advert()
        log.info("span_dropped", model=model_id, start=start, end=end)


def bottleneck_rows(
    placement: PlacementService, node: MeshNode | None
) -> tuple[BottleneckRow, ...]:
    """The swarm's bottleneck of each model this node knows and the mesh serves (or this
    node places), for `peers` and `doctor`."""
    if node is None:
        return ()
    served = {s.model_id for adv in node.live_adverts().values() for s in adv.spans}
    rows = []
    for r in placement.reports(sorted(served | set(placement.models))):
        b = r.bottleneck
        rows.append(
            BottleneckRow(
                model_id=r.model_id,
                n_atoms=r.n_atoms,
                start=b.start,
                end=b.end,
                tokens_per_s=round(b.tokens_per_s, 3),
                hosts=r.hosts,
                fix=f"{r.fix} (nexusd host {r.model_id} --atoms {b.start}-{b.end})",
            )
        )
    return tuple(rows)
