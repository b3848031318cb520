"""Automatic placement: `nexusd host MODEL --auto` and `atoms.host = ["MODEL:auto"]`.

The daemon picks its span of a model where the swarm's throughput is lowest and that fits
its weight memory (`mesh.placement.choose_span`), re-checks every
`atoms.placement_interval_s`, and moves when `mesh.placement.rebalance` says so.

Rule 1: every decision comes from the replicated adverts (spans, measured speeds,
memory) through the pure functions of `mesh.placement`, so all nodes agree on who moves.
Rule 2: a move hosts the new span and waits until our advert carries it before it drops
the old one: the swarm never loses a span to a move.
Rule 3: this module knows the mesh through `SwarmView` and the hosting through `Hoster`,
so the simulator drives the same service with in-memory nodes and no torch.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import structlog
import trio

from mesh.placement import Bottleneck, Move, Placed, bottleneck, choose_span, rebalance
from mesh.state import Advert, NodeState, SpanProfile

from ..config import AtomsConfig
from ..errors import NEXUS_ERRORS
from ..exec.planner import DEFAULT_COMPUTE_S_PER_ATOM, advertised_compute_s

log = structlog.get_logger(__name__)
DRIFT = 0.25  # re-advertise when a measured speed moved by more than this fraction
VISIBLE_TIMEOUT_S = 30.0  # a move waits at most this long for our advert to carry its span


def weight_memory_budget(cfg: AtomsConfig) -> int:
    """Bytes of weights this node gives hosting: `atoms.memory_budget_bytes`, or half the
    machine's RAM when that is 0."""
    if cfg.memory_budget_bytes:
        return cfg.memory_budget_bytes
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):  # no sysconf here: say nothing rather than guess
        return 0


def span_throughputs(profiles: Sequence[SpanProfile]) -> tuple[tuple[str, int, float], ...]:
    """The load report's (model, first atom, tokens/s) of each measured span."""
    return tuple(
        (p.model_id, p.start, 1.0 / (p.compute_s_per_atom * (p.end - p.start))) for p in profiles
    )


def profile_drifted(advertised: Mapping[str, float], profiles: Sequence[SpanProfile]) -> bool:
    """Whether a measured speed moved more than `DRIFT` from the advertised one (or a
    model got its first measure)."""
    for p in profiles:
        old = advertised.get(p.model_id)
        if old is None or abs(p.compute_s_per_atom - old) > DRIFT * old:
            return True
    return False


def capacity_s(profiles: Sequence[SpanProfile], model_id: str, start: int) -> float:
    """What placement counts a host's span at: its seconds per atom measured at load
    (`SpanProfile.capacity_s_per_atom`), else its live figure, else the default."""
    for p in profiles:
        if p.model_id == model_id and p.start == start and p.capacity_s_per_atom > 0:
            return p.capacity_s_per_atom
    return advertised_compute_s(profiles, model_id, start)


class SwarmView(Protocol):
    """What placement needs of the mesh (a `MeshNode`)."""

    @property
    def node_id(self) -> bytes: ...

    def live_adverts(self) -> dict[bytes, Advert]: ...
    async def wait_for(self, predicate: Callable[[], bool]) -> None: ...


class Hoster(Protocol):
    """What placement needs of the node's hosting."""

    def layout(self, model_id: str) -> list[int] | None:
        """Weight bytes of each atom of the model (its length is the atom count); None
        for a model this node does not know."""
        ...

    def auto_spans(self, model_id: str) -> list[tuple[int, int]]: ...
    def manual_spans(self, model_id: str) -> list[tuple[int, int]]: ...
    def compute_s_per_atom(self, model_id: str) -> float | None: ...
    async def host(self, model_id: str, start: int, end: int) -> None: ...
    async def drop(self, model_id: str, start: int, end: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SwarmReport:
    """A model's bottleneck in the swarm and what would fix it."""

    model_id: str
    n_atoms: int
    bottleneck: Bottleneck
    hosts: int

    @property
    def fix(self) -> str:
        b = self.bottleneck
        return f"host atoms {b.start}-{b.end} of {self.model_id}"


class PlacementService:
    """Places this node's `auto` spans and moves them when the swarm needs it."""

    def __init__(
        self,
        hoster: Hoster,
        view: Callable[[], SwarmView | None],
        *,
        memory_bytes: int,
        interval_s: float,
        threshold: float,
    ) -> None:
        self._hoster = hoster
        self._view = view
        self.memory_bytes = memory_bytes
        self.interval_s = interval_s
        self.threshold = threshold
        self.models: list[str] = []
        self._wake = trio.Event()
        self.moves = 0

    def __repr__(self) -> str:
        return f"PlacementService(models={self.models}, moves={self.moves})"

    def add(self, model_id: str) -> None:
        """Place `model_id` automatically from now on (at once, then every interval).

        Raises:
            ValueError: the hoster does not know the model.
        """
        if self._hoster.layout(model_id) is None:
            raise ValueError(f"model {model_id!r} is not known here")
        if model_id not in self.models:
            self.models.append(model_id)
        self._wake.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        while True:
            self._wake = trio.Event()
            for model_id in list(self.models):
                try:
                    await self.step(model_id)
                except NEXUS_ERRORS as exc:  # e.g. weights missing here: try again later
                    log.error("placement_failed", model=model_id, reason=str(exc))
            with trio.move_on_after(self.interval_s):  # periodic re-check, or a new model
                await self._wake.wait()

    def placed(self, model_id: str) -> tuple[list[Placed], dict[bytes, int]]:
        """Every host's spans of `model_id` (ours from the hoster, the others' from their
        live adverts), and each host's advertised weight memory."""
        view = self._view()
        me = view.node_id if view is not None else b"self"
        out: list[Placed] = []
        memory = {me: self.memory_bytes}
        adverts = view.live_adverts() if view is not None else {}
        for host, adv in sorted(adverts.items()):
            if host == me or adv.state is not NodeState.ONLINE:
                continue
            memory[host] = adv.memory_bytes
            auto = {(p.start, p.end) for p in adv.profiles if p.model_id == model_id and p.auto}
            for s in adv.spans:
                if s.model_id == model_id:
                    c = capacity_s(adv.profiles, model_id, s.start)
                    out.append(Placed(host, s.start, s.end, c, (s.start, s.end) in auto))
        c = self._own_compute(model_id, out)
        h = self._hoster
        out += [Placed(me, a, b, c, True) for a, b in h.auto_spans(model_id)]
        out += [Placed(me, a, b, c, False) for a, b in h.manual_spans(model_id)]
        return out, memory

    def _own_compute(self, model_id: str, others: Sequence[Placed]) -> float:
        """Our measured speed; before any measure, the others' median (else the default)."""
        mine = self._hoster.compute_s_per_atom(model_id)
        if mine:
            return mine
        seen = [p.compute_s_per_atom for p in others]
        return statistics.median(seen) if seen else DEFAULT_COMPUTE_S_PER_ATOM

    async def step(self, model_id: str) -> Move | None:
        """Place or move once for `model_id`; returns the move made, if any."""
        view = self._view()
        if view is None:
            return None
        sizes = self._hoster.layout(model_id)
        if not sizes:
            return None
        placed, memory = self.placed(model_id)
        me = view.node_id
        if not self._hoster.auto_spans(model_id):  # first placement: all served count
            c = self._own_compute(model_id, [p for p in placed if p.host != me])
            span = choose_span(len(sizes), sizes, placed, c, self.memory_bytes)
            if span is None:
                log.warning(
                    "placement_refused",
                    model=model_id,
                    reason=f"no atom fits the weight memory budget of {self.memory_bytes} bytes",
                )
                return None
            log.info("placement_chosen", model=model_id, start=span[0], end=span[1])
            await self._hoster.host(model_id, *span)
            return Move(me, (), span[0], span[1], 0.0, 0.0, 0, 0)
        move = rebalance(len(sizes), sizes, placed, memory, self.threshold)
        if move is None or move.host != me:
            return None
        await self._move(model_id, move, view)
        return move

    async def _move(self, model_id: str, move: Move, view: SwarmView) -> None:
        log.info(
            "placement_moving",
            model=model_id,
            old=[f"{a}-{b}" for a, b in move.old],
            new=f"{move.start}-{move.end}",
            tokens_per_s_before=round(move.before, 2),
            tokens_per_s_after=round(move.after, 2),
            covered_before=move.covered_before,
            covered_after=move.covered_after,
        )
        await self._hoster.host(model_id, move.start, move.end)
        me = view.node_id

        def visible() -> bool:
            adv = view.live_adverts().get(me)
            return adv is not None and any(
                (s.model_id, s.start, s.end) == (model_id, move.start, move.end) for s in adv.spans
            )

        with trio.move_on_after(VISIBLE_TIMEOUT_S):
            await view.wait_for(visible)
        for a, b in move.old:
            await self._hoster.drop(model_id, a, b)
        self.moves += 1

    def reports(self, models: Sequence[str]) -> list[SwarmReport]:
        """The bottleneck of each of `models` the hoster knows (others are skipped)."""
        out = []
        for model_id in models:
            sizes = self._hoster.layout(model_id)
            if not sizes:
                continue
            placed, _ = self.placed(model_id)
            hosts = len({p.host for p in placed})
            out.append(SwarmReport(model_id, len(sizes), bottleneck(len(sizes), placed), hosts))
        return out
