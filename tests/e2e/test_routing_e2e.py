"""Routes follow measured load: a host busy with other work is avoided."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexusd.api.records import (
    CancelRequest,
    GenerateReply,
    GenerateRequest,
    PeersReply,
    StatusReply,
    StatusRequest,
    WaitRequest,
)
from nexusd.errors import ApiError
from nexusd.harness.cluster import LocalCluster, local_cluster

from .test_distributed import FAST

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path, 3, models_dir=models_dir, env=FAST) as c:
        for i in (1, 2):
            c.host(i, "nexus-1.1-random")  # untrained: a long job runs its full length
        c.wait_hosts(0, 2, "nexus-1.1-random")
        yield c


def node_hex(cluster: LocalCluster, i: int) -> str:
    reply = cluster.call(i, StatusRequest())
    assert isinstance(reply, StatusReply)
    return reply.node_id


def route_while_busy(cluster: LocalCluster, busy: int) -> list[str]:
    """Keep node `busy` computing a long local job; return the origin's generation route.

    The load is a generation started on the busy node itself: a latency job whose cheapest
    route is local (the node hosts the whole model), so it cannot spread to the other
    replica the way batch work does.
    """
    job_id = f"busy-{busy}"
    errors: list[BaseException] = []

    def load() -> None:
        try:
            req = GenerateRequest(
                prompt="keep busy", model="nexus-1.1-random", max_new_tokens=480, job_id=job_id
            )
            cluster.call(busy, req, timeout_s=300)
        except ApiError as exc:  # cancelled at the end: expected
            if "cancelled" not in exc.message:
                errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        cluster.call(0, WaitRequest("busy", node_hex(cluster, busy), 0.4, timeout_s=60))
        reply = cluster.call(
            0, GenerateRequest(prompt="route me", model="nexus-1.1-random", max_new_tokens=4)
        )
        assert isinstance(reply, GenerateReply)
        return [h.host for h in reply.route]
    finally:
        cluster.call(busy, CancelRequest(job_id))
        worker.join(timeout=60)
        assert not errors, errors
        cluster.call(0, WaitRequest("idle", node_hex(cluster, busy), 0.2, timeout_s=60))


def test_route_avoids_the_busy_host_whichever_it_is(cluster: LocalCluster) -> None:
    one, two = node_hex(cluster, 1), node_hex(cluster, 2)
    assert route_while_busy(cluster, 1) == [two]
    assert route_while_busy(cluster, 2) == [one]


@pytest.mark.netns
def test_route_avoids_the_host_behind_a_slow_link(tmp_path: Path, models_dir: Path) -> None:
    from .netns import namespaces, netns_available

    reason = netns_available()
    if reason:
        pytest.skip(reason)
    env = {
        **FAST,
        "NEXUSD_MESH__BANDWIDTH_PROBE_INTERVAL_S": "2",
        "NEXUSD_MESH__BANDWIDTH_PROBE_BYTES": "65536",
        # No spot-checks: a first-step check would send the step to the other replica too,
        # and the one behind the slow link times out there and carries a failure penalty
        # into the next phase (correct routing, but not the bandwidth this test is about).
        "NEXUSD_EXEC__VERIFY_FIRST_STEPS": "0",
        "NEXUSD_EXEC__VERIFY_RATE": "0",
    }
    with (
        namespaces(3) as ns,
        local_cluster(
            tmp_path,
            3,
            models_dir=models_dir,
            env=env,
            prefixes=[ns.prefix(i) for i in range(3)],
            listen_hosts=ns.addrs,
        ) as cluster,
    ):
        for i in (1, 2):
            cluster.host(i, "nexus-1.1-random")
        cluster.wait_hosts(0, 2, "nexus-1.1-random")
        ids = {i: node_hex(cluster, i) for i in (1, 2)}
        for slow, fast in ((1, 2), (2, 1)):
            ns.fast(fast)
            # 512 kbit/s: an activation's estimated transfer (~24 ms a leg) outweighs any
            # difference in the two hosts' compute figures (~10 ms a step, one of them timed
            # at load beside the other's load, the other by real steps).
            ns.slow(slow, "512kbit")
            # Three fresh probes of each (the first may have started before the change): the
            # median of the last three then stands on probes of the new link alone.
            for _ in range(3):
                for i in (1, 2):
                    seen = cluster.call(0, WaitRequest("probed", ids[i], timeout_s=60))
            req = GenerateRequest(prompt="slow links", model="nexus-1.1-random", max_new_tokens=3)
            reply = cluster.call(0, req)
            assert isinstance(reply, GenerateReply)
            assert isinstance(seen, PeersReply)
            view = [r for r in seen.peers if r.node_id in ids.values()]  # what the origin saw
            assert [h.host for h in reply.route] == [ids[fast]], (slow, reply.route, view)
