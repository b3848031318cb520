"""`nexusd host MODEL --auto` on 3 real daemons: they cover the model with no gap, and after
one dies the others rebalance to cover it again; jobs run on the result."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexusd.api.records import (
    GenerateReply,
    GenerateRequest,
    PeersReply,
    PeersRequest,
    StatusReply,
    StatusRequest,
)
from nexusd.harness.cluster import LocalCluster, local_cluster

from .test_distributed import FAST

pytestmark = pytest.mark.e2e

MODEL = "nexus-1.1-random"
N_ATOMS = 11
# 80 MB of weights: a host fits the embedding and 4 blocks, or the last 6 atoms (the
# model is 150 MB): two hosts can cover it, one cannot.
AUTO = {
    **FAST,
    "NEXUSD_ATOMS__MEMORY_BUDGET_BYTES": str(80_000_000),
    "NEXUSD_ATOMS__PLACEMENT_INTERVAL_S": "1",
}


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path, 3, models_dir=models_dir, env=AUTO) as c:
        yield c


def spans(
    reply: PeersReply, dead: frozenset[str] = frozenset()
) -> dict[str, list[tuple[int, int]]]:
    """node id -> its hosted spans of MODEL, as the replying node sees them."""
    out: dict[str, list[tuple[int, int]]] = {}
    for p in reply.peers:
        if p.node_id in dead or p.state != "online":
            continue
        for h in p.hosted:
            model, _, rng = h.rpartition(":")
            if model == MODEL:
                a, b = rng.split("-")
                out.setdefault(p.node_id, []).append((int(a), int(b)))
    return out


def node_hex(cluster: LocalCluster, i: int) -> str:
    reply = cluster.call(i, StatusRequest())
    assert isinstance(reply, StatusReply)
    return reply.node_id


def covers(by_node: dict[str, list[tuple[int, int]]]) -> bool:
    served = {i for ss in by_node.values() for a, b in ss for i in range(a, b)}
    return served == set(range(N_ATOMS))


def wait_covered(
    cluster: LocalCluster, i: int, dead: frozenset[str], timeout_s: float
) -> PeersReply:
    """Poll node i's view until the live hosts (not `dead`) cover the model."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = cluster.call(i, PeersRequest(), expect=PeersReply)
        if covers(spans(reply, dead)):
            return reply
        if time.monotonic() > deadline:
            raise AssertionError(f"not covered after {timeout_s}s: {spans(reply, dead)}")
        time.sleep(0.5)  # condition poll (peers has no "covered" wait), under the deadline


def test_auto_hosts_cover_and_recover(cluster: LocalCluster) -> None:
    for i in range(3):
        cluster.host(i, f"{MODEL}:auto")
    reply = wait_covered(cluster, 0, frozenset(), timeout_s=90)
    placed = spans(reply)
    assert len(placed) == 3, placed  # every node placed itself
    assert all(sum(a - b for a, b in ss) < 0 for ss in placed.values())
    rows = {b.model_id: b for b in reply.bottlenecks}
    assert rows[MODEL].tokens_per_s > 0 and "nexusd host" in rows[MODEL].fix

    index = {node_hex(cluster, i): i for i in range(3)}
    # kill a host the two others cannot do without: they must move to cover its atoms
    victim = next(
        (
            index[n]
            for n in sorted(placed)
            if not covers({k: v for k, v in placed.items() if k != n})
        ),
        2,
    )
    dead_id = next(n for n, i in index.items() if i == victim)
    observer = 0 if victim != 0 else 1
    cluster.daemon(victim).kill()
    wait_covered(cluster, observer, frozenset({dead_id}), timeout_s=90)

    reply2 = cluster.call(
        observer, GenerateRequest(prompt="placed", model=MODEL, max_new_tokens=4), timeout_s=120
    )
    assert isinstance(reply2, GenerateReply)
    assert dead_id not in {h.host for h in reply2.route}
