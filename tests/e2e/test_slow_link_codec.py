"""`--codec auto` on a real slow link: the hop behind a 10 Mbit/s tbf link travels in int8,
the same hop on a fast link in raw, and the job's reply says which codec and the bytes saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.slow_link import cosine, fresh_bandwidth
from nexusd.api.records import (
    EmbedReply,
    EmbedRequest,
    HopReport,
    StatusReply,
    StatusRequest,
    vectors_of,
)
from nexusd.harness.cluster import LocalCluster, local_cluster

from .test_distributed import FAST

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

# Routes relay activations via the origin: the origin hosts the first half of MiniLM, so
# the hidden states of every micro-batch cross the origin <-> node 1 link to the second half.
TEXTS = tuple(
    f"Sentence {i} about how a mesh of small devices shares one neural network." for i in range(16)
)
ENV = {
    **FAST,
    "NEXUSD_MESH__BANDWIDTH_PROBE_INTERVAL_S": "2",
    "NEXUSD_MESH__BANDWIDTH_PROBE_BYTES": "65536",
    # No spot-checks: this test is about the wire codec, not the replica checks.
    "NEXUSD_EXEC__VERIFY_FIRST_STEPS": "0",
    "NEXUSD_EXEC__VERIFY_RATE": "0",
}


def auto_job(cluster: LocalCluster, node: str) -> tuple[HopReport, list[list[float]]]:
    reply = cluster.call(0, EmbedRequest(texts=TEXTS, codec="auto"))
    assert isinstance(reply, EmbedReply)
    (hop,) = [h for h in reply.route if h.host == node]
    return hop, vectors_of(reply)


def test_auto_codec_is_int8_behind_a_10_mbit_link_and_raw_on_a_fast_one(
    tmp_path: Path, models_dir: Path
) -> None:
    from .netns import namespaces, netns_available

    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with (
        namespaces(2) as ns,
        local_cluster(
            tmp_path,
            2,
            models_dir=models_dir,
            env=ENV,
            prefixes=[ns.prefix(i) for i in range(2)],
            listen_hosts=ns.addrs,
        ) as cluster,
    ):
        cluster.host(0, "minilm:0-4")
        cluster.host(1, "minilm:4-8")
        cluster.wait_hosts(0, 1, "minilm")
        status = cluster.call(1, StatusRequest())
        assert isinstance(status, StatusReply)
        node = status.node_id

        fast_bw = fresh_bandwidth(cluster, node)
        fast, exact = auto_job(cluster, node)
        assert (fast.codec, fast.bytes_saved, fast.wire_error) == ("raw", 0, 0), (fast_bw, fast)

        ns.slow(1, "10mbit")
        slow_bw = fresh_bandwidth(cluster, node)
        slow, approx = auto_job(cluster, node)
        assert slow.codec == "int8", (slow_bw, slow)
        assert 0 < slow.wire_error <= 1 / 254 + 1e-6, slow  # int8: half a step of 1/127
        # int8 blockwise sends ~1 byte per value against raw fp32's 4: most bytes are saved
        sent = slow.bytes_out + slow.bytes_in
        assert slow.bytes_saved > 2 * sent, slow
        assert fast.bytes_out + fast.bytes_in == sent + slow.bytes_saved, (fast, slow)  # raw size
        # ... and the error it introduced is small: the embeddings stay close to the exact ones
        assert min(cosine(a, b) for a, b in zip(exact, approx, strict=True)) > 0.999
