"""Automatic placement in the simulator, under trio's virtual clock.

Three nodes run `PlacementService` for a 12-atom model; each fits 8 atoms. They cover
the model with no gap, keep it covered while they rebalance (one move at a time), and
after one of them dies the two others rebalance to cover it again.
"""

from __future__ import annotations

import dataclasses
import random

import trio
import trio.testing

from mesh.node import MeshNode
from mesh.placement import Placed, atom_throughput
from mesh.state import HostedSpan, SpanProfile
from mesh.transport.memory import MemoryNetwork
from nexusd.node.placement_service import PlacementService

from .sim_fixtures import (
    FAST_CFG,
    SimNode,
    key_from,
    new_mesh,
    new_state,
    seeded_certs,
    sim_wall,
    wait_until,
)

MODEL = "sim-model"
SIZES = [10] * 12
BUDGET = 80  # 8 atoms: two hosts can cover the model, one cannot
INTERVAL_S = 10.0
CFG = dataclasses.replace(FAST_CFG, advert_refresh_s=5.0, advert_lease_s=15.0)


class SimHoster:
    """`Hoster` over a simulated node: hosting a span is advertising it."""

    def __init__(self, sim: SimNode, compute_s_per_atom: float) -> None:
        self.sim = sim
        self.c = compute_s_per_atom
        self.spans: set[tuple[int, int]] = set()

    def layout(self, model_id: str) -> list[int] | None:
        return list(SIZES) if model_id == MODEL else None

    def auto_spans(self, model_id: str) -> list[tuple[int, int]]:
        return sorted(self.spans)

    def manual_spans(self, model_id: str) -> list[tuple[int, int]]:
        return []

    def compute_s_per_atom(self, model_id: str) -> float | None:
        return self.c

    async def host(self, model_id: str, start: int, end: int) -> None:
        self.spans.add((start, end))
        self._advertise()

    async def drop(self, model_id: str, start: int, end: int) -> None:
        self.spans.discard((start, end))
        self._advertise()

    def _advertise(self) -> None:
        assert self.sim.node is not None
        spans = sorted(self.spans)
        self.sim.node.set_local_advert(
            tuple(HostedSpan(MODEL, a, b, "float32") for a, b in spans),
            0,
            0,
            (),
            profiles=tuple(SpanProfile(MODEL, a, b, self.c, 0, True) for a, b in spans),
            memory_bytes=BUDGET,
        )


def covered(node: MeshNode, dead: frozenset[bytes] = frozenset()) -> bool:
    """Whether `node` sees every atom served by a live, non-dead host."""
    placed = [
        Placed(host, s.start, s.end, 0.01)
        for host, adv in node.live_adverts().items()
        if host not in dead
        for s in adv.spans
        if s.model_id == MODEL
    ]
    return min(atom_throughput(len(SIZES), placed)) > 0


async def test_three_auto_hosts_cover_and_recover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(5)
    network = MemoryNetwork(rng=random.Random(6))
    keys = [key_from(rng) for _ in range(3)]
    identity = new_mesh(keys[0], rng)
    seeded = seeded_certs(keys[0], identity, keys[1:], sim_wall())
    async with trio.open_nursery() as nursery:
        sims: list[SimNode] = []
        nodes: list[MeshNode] = []
        services: list[PlacementService] = []
        for i, key in enumerate(keys):
            sim = SimNode(
                key, network, identity, new_state(identity, CFG).merge(seeded), CFG, seed=i
            )
            sim.bootstrap = [(s.node_id, s.addrs) for s in sims]
            nodes.append(await sim.start(nursery))
            sims.append(sim)
        with trio.fail_after(60):
            await wait_until(nodes, lambda: all(len(n.live_adverts()) == 3 for n in nodes))
        for sim, speed in zip(sims, (0.01, 0.012, 0.015), strict=True):
            svc = PlacementService(
                SimHoster(sim, speed),
                lambda sim=sim: sim.node,  # type: ignore[misc]
                memory_bytes=BUDGET,
                interval_s=INTERVAL_S,
                threshold=0.2,
            )
            svc.add(MODEL)
            services.append(svc)
            await nursery.start(svc.run)

        with trio.fail_after(10 * INTERVAL_S):
            await wait_until(nodes, lambda: all(covered(n) for n in nodes))
        # once covered, it stays covered while the hosts keep re-checking and moving
        settle_until = trio.current_time() + 6 * INTERVAL_S
        while trio.current_time() < settle_until:
            assert all(covered(n) for n in nodes)
            with trio.move_on_after(1.0):
                await nodes[0].wait_changed()

        # kill a host the others cannot do without: they must move to cover its atoms
        hosters: list[SimHoster] = [s._hoster for s in services]  # type: ignore[attr-defined]
        print("placed:", [sorted(h.spans) for h in hosters], [s.moves for s in services])
        victim = next(
            i for i in range(3) if not covered(nodes[(i + 1) % 3], frozenset({sims[i].node_id}))
        )
        dead = frozenset({sims[victim].node_id})
        moves_before = sum(s.moves for s in services)
        sims[victim].kill()
        survivors = [n for i, n in enumerate(nodes) if i != victim]
        with trio.fail_after(CFG.advert_lease_s * 3):  # its advert lapses
            await wait_until(
                survivors,
                lambda: all(sims[victim].node_id not in n.live_adverts() for n in survivors),
            )
        with trio.fail_after(10 * INTERVAL_S):
            await wait_until(survivors, lambda: all(covered(n, dead) for n in survivors))
        print("after:", [sorted(h.spans) for h in hosters], [s.moves for s in services])
        assert sum(s.moves for s in services) > moves_before  # somebody moved to cover it
        nursery.cancel_scope.cancel()
