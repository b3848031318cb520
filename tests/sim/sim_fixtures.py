"""Harness for running MeshNodes over the in-memory network under trio's virtual clock.

Rule 1: all randomness from seeded `random.Random`s, all time from trio's clock (wall time
is a fixed epoch plus `trio.current_time()`), so a seed fixes the run.
Rule 2: waiting is always on a condition re-checked after node changes, never a sleep.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mesh.hlc import HybridClock, wall_ms_of
from mesh.identity import MeshSecret, NodeKey
from mesh.node import MeshIdentity, MeshNode, MeshNodeConfig
from mesh.state import MemberCert, MeshState, Slot, SlotKind
from mesh.store import StateStore
from mesh.transport.base import TransportConfig
from mesh.transport.memory import MemoryNetwork, MemoryTransport, open_memory_transport

WALL_EPOCH = 1_800_000_000.0

FAST_CFG = MeshNodeConfig(
    advert_refresh_s=10.0,
    advert_lease_s=30.0,
    anti_entropy_interval_s=5.0,
    ping_interval_s=2.0,
    read_timeout_s=3.0,
    max_clock_drift_s=5.0,
    max_peers=8,
    redial_base_s=0.5,
    redial_max_s=8.0,
    ban_score_threshold=100.0,
)
TRANSPORT_CFG = TransportConfig(read_timeout_s=5.0, write_timeout_s=5.0, connect_timeout_s=2.0)


def sim_wall() -> float:
    """Wall clock of every simulated node: a fixed epoch plus trio's (virtual) time."""
    return WALL_EPOCH + trio.current_time()


def key_from(rng: random.Random) -> NodeKey:
    """A node key drawn from a seeded rng."""
    return NodeKey.from_seed(rng.randbytes(32))


def new_mesh(founder: NodeKey, rng: random.Random, cfg: MeshNodeConfig = FAST_CFG) -> MeshIdentity:
    """A fresh mesh founded by `founder` (16-byte id, random secret)."""
    secret = MeshSecret.from_bytes(rng.randbytes(32))
    return MeshIdentity(rng.randbytes(16), founder.node_id, secret)


def new_state(identity: MeshIdentity, cfg: MeshNodeConfig = FAST_CFG) -> MeshState:
    """An empty state for `identity`'s mesh with the node config's drift and lease bounds."""
    return MeshState(
        mesh_id=identity.mesh_id,
        founder=identity.founder,
        max_drift_ms=round(cfg.max_clock_drift_s * 1000),
        max_lease_ms=round(cfg.max_lease_s * 1000),
    )


def seeded_certs(
    founder: NodeKey, identity: MeshIdentity, members: Sequence[NodeKey], now: float
) -> MeshState:
    """The founder's state with a certificate for each member (membership set up offline)."""
    state = new_state(identity)
    clock = HybridClock(max_drift_s=5.0)
    now_ms = wall_ms_of(now)
    for i, key in enumerate(members):
        cert = MemberCert(
            identity.mesh_id,
            key.node_id,
            f"n{i}",
            ("member",),
            now_ms,
            now_ms + 10**9,
            founder.node_id,
        )
        state.local_write(founder, Slot(SlotKind.MEMBER, key.node_id), cert, clock, now)
    return state


@dataclass
class SimNode:
    """One simulated node: its key and its MeshNode while running (`start`, `kill`)."""

    key: NodeKey
    network: MemoryNetwork
    identity: MeshIdentity | None
    state: MeshState | None
    cfg: MeshNodeConfig = FAST_CFG
    seed: int = 0
    store_path: Path | None = None
    invites_path: Path | None = None
    bootstrap: list[tuple[bytes, list[str]]] = field(default_factory=list)
    node: MeshNode | None = None
    transport: MemoryTransport | None = None
    _scope: trio.CancelScope | None = None
    _done: trio.Event = field(default_factory=trio.Event)

    @property
    def node_id(self) -> bytes:
        return self.key.node_id

    @property
    def addrs(self) -> list[str]:
        assert self.transport is not None
        return self.transport.listen_addrs()

    async def start(self, nursery: trio.Nursery) -> MeshNode:
        """Attach to the network and run the node in `nursery` until `kill`."""
        node: MeshNode = await nursery.start(self._host)
        return node

    def kill(self) -> None:
        """Stop the node abruptly (its transport detaches; peers see it vanish)."""
        assert self._scope is not None
        self._scope.cancel()

    async def stop(self) -> None:
        """`kill`, then wait until the node has detached from the network."""
        self.kill()
        await self._done.wait()

    async def _host(self, *, task_status: trio.TaskStatus[MeshNode]) -> None:
        self._done = trio.Event()
        with trio.CancelScope() as scope:
            self._scope = scope
            store = StateStore(self.store_path) if self.store_path is not None else None
            try:
                async with open_memory_transport(
                    self.network, self.key.node_id, TRANSPORT_CFG
                ) as transport:
                    self.transport = transport
                    node = MeshNode(
                        key=self.key,
                        transport=transport,
                        identity=self.identity,
                        state=self.state,
                        store=store,
                        cfg=self.cfg,
                        wall=sim_wall,
                        rng=random.Random(self.seed),
                        perf=trio.current_time,
                        invites_path=self.invites_path,
                    )
                    for peer, addrs in self.bootstrap:
                        node.add_peer_addrs(peer, addrs)
                    self.node = node
                    async with trio.open_nursery() as inner:
                        await inner.start(node.run)
                        task_status.started(node)
            finally:
                if store is not None:
                    store.close()
        self.node = None
        self._done.set()


async def wait_any_changed(nodes: Sequence[MeshNode]) -> None:
    """Return after the next state or peer change on any of `nodes`."""
    async with trio.open_nursery() as nursery:

        async def one(node: MeshNode) -> None:
            await node.wait_changed()
            nursery.cancel_scope.cancel()

        for node in nodes:
            nursery.start_soon(one, node)


async def wait_until(nodes: Sequence[MeshNode], predicate: Callable[[], bool]) -> None:
    """Return once `predicate()` holds, re-checking after each change on any node."""
    while not predicate():
        await wait_any_changed(nodes)


def fingerprints(nodes: Sequence[MeshNode]) -> set[bytes]:
    """Distinct state fingerprints among `nodes`."""
    return {n.fingerprint() for n in nodes}


async def wait_converged(nodes: Sequence[MeshNode]) -> None:
    """Return once every node has the same state fingerprint.

    Waits on the first node and the first node that differs from it, so each round costs
    two waiters however many nodes there are (the predicate can only become true through
    a change of one of those two).
    """
    while True:
        first = nodes[0].fingerprint()
        odd = next((n for n in nodes[1:] if n.fingerprint() != first), None)
        if odd is None:
            return
        await wait_any_changed([nodes[0], odd])
