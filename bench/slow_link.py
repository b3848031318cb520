"""Benchmark: embedding throughput over a 10 Mbit/s link, `--codec raw` vs `--codec auto`.

Rule 1: prints exactly one JSON object on stdout; without root and network namespaces it
prints `{"bench": "slow_link", "skipped": REASON}` and exits 0.
Rule 2: both codecs run in the same mesh, interleaved (raw, auto, raw, auto, ...), on the
same fixed batch of sentences; the figure is the ratio of the median throughputs.
Rule 3: every namespace and daemon started is removed or stopped (`namespaces`,
`local_cluster`), every wait is bounded.

Setup: two daemons, each in its own network namespace. The origin hosts MiniLM atoms 0-4,
node 1 atoms 4-8 behind a tbf-limited 10 Mbit/s link (both ends of its veth), so each
micro-batch's hidden states (micro x tokens x 384 floats) cross the slow link. With
`auto` the origin measures that link (bandwidth probes) below `[exec] slow_link_bytes_per_s`
and its RTT; the rule (`nexusd.exec.adaptive`) estimates int8 the fastest and sends the hop
int8; the reply's route says the codec and the bytes it saved. The error
introduced: the cosine of the auto embeddings to the raw ones (min over the batch).

    python -m bench.slow_link [--count 64] [--repeat 3] [--rate 10mbit] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from nexusd.api.records import (
    EmbedReply,
    EmbedRequest,
    PeersReply,
    StatusReply,
    StatusRequest,
    WaitRequest,
    vectors_of,
)
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.harness.demo import default_models_dir
from nexusd.harness.netns import namespaces, netns_available
from nexusd.model_registry import ModelRegistry

from .common import CALL_TIMEOUT_S, common_args, emit_json, median, quiet_logs, rounded, work_dir
from .embed import sentences

MODEL = "minilm"
ENV = {
    "NEXUSD_MESH__ADVERT_REFRESH_S": "1",
    "NEXUSD_MESH__PING_INTERVAL_S": "1",
    "NEXUSD_MESH__BANDWIDTH_PROBE_INTERVAL_S": "2",
    "NEXUSD_MESH__BANDWIDTH_PROBE_BYTES": "65536",
    # Spot-checks off: the bench measures the wire, not the replica checks.
    "NEXUSD_EXEC__VERIFY_FIRST_STEPS": "0",
    "NEXUSD_EXEC__VERIFY_RATE": "0",
}


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def fresh_bandwidth(cluster: LocalCluster, node: str) -> float:
    """Three fresh probes of `node` (the median then stands on the limited link alone);
    the origin's measured bandwidth to it, MB/s."""
    reply: object = None
    for _ in range(3):
        reply = cluster.call(0, WaitRequest("probed", node, timeout_s=60), timeout_s=90)
    assert isinstance(reply, PeersReply)
    return next(p.bandwidth_mb_per_s for p in reply.peers if p.node_id == node)


def embed(
    cluster: LocalCluster, texts: list[str], codec: str, micro: int
) -> tuple[float, EmbedReply]:
    """Texts per second (client wall clock) and the reply of one embed job."""
    t0 = time.perf_counter()
    reply = cluster.call(
        0,
        EmbedRequest(texts=tuple(texts), micro_batch=micro, codec=codec),
        timeout_s=CALL_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - t0
    assert isinstance(reply, EmbedReply)
    return len(texts) / elapsed, reply


def run(
    models_dir: Path, root: Path, *, count: int, repeat: int, micro: int, rate: str
) -> dict[str, object]:
    registry = ModelRegistry(models_dir)
    registry.folder(MODEL)  # built once, before any daemon needs it
    n_atoms = registry.info(MODEL).n_atoms
    cut = n_atoms // 2
    texts = sentences(count)
    with (
        namespaces(2) as ns,
        local_cluster(
            root,
            2,
            models_dir=models_dir,
            env=ENV,
            prefixes=[ns.prefix(i) for i in range(2)],
            listen_hosts=ns.addrs,
        ) as cluster,
    ):
        cluster.host(0, f"{MODEL}:0-{cut}")
        cluster.host(1, f"{MODEL}:{cut}-{n_atoms}")
        cluster.wait_hosts(0, 1, MODEL)
        status = cluster.call(1, StatusRequest())
        assert isinstance(status, StatusReply)
        node = status.node_id
        ns.slow(1, rate)
        bandwidth = fresh_bandwidth(cluster, node)
        embed(cluster, texts[:micro], "raw", micro)  # warm-up: sessions, caches
        speeds: dict[str, list[float]] = {"raw": [], "auto": []}
        replies: dict[str, EmbedReply] = {}
        for _ in range(repeat):
            for codec in ("raw", "auto"):
                speed, replies[codec] = embed(cluster, texts, codec, micro)
                speeds[codec].append(speed)
    raw, auto = replies["raw"], replies["auto"]
    (hop,) = [h for h in auto.route if h.host == node]
    (raw_hop,) = [h for h in raw.route if h.host == node]
    cosines = [cosine(a, b) for a, b in zip(vectors_of(raw), vectors_of(auto), strict=True)]
    raw_speed, auto_speed = median(speeds["raw"]), median(speeds["auto"])
    return {
        "bench": "slow_link",
        "model": MODEL,
        "link": rate,
        "measured_link_mb_per_s": rounded(bandwidth, 3),
        "sentences": count,
        "micro_batch": micro,
        "repeat": repeat,
        "raw_sentences_per_s": rounded(raw_speed, 2),
        "auto_sentences_per_s": rounded(auto_speed, 2),
        "auto_over_raw": rounded(auto_speed / raw_speed, 3),
        "target_auto_over_raw": 2.0,
        "runs": {k: [rounded(v, 2) for v in vs] for k, vs in speeds.items()},
        "auto_hop_codec": hop.codec,
        "auto_hop_bytes": hop.bytes_out + hop.bytes_in,
        "auto_hop_bytes_saved": hop.bytes_saved,
        "auto_hop_wire_error": hop.wire_error,
        "raw_hop_bytes": raw_hop.bytes_out + raw_hop.bytes_in,
        "auto_cosine_to_raw_mean": rounded(sum(cosines) / len(cosines), 6),
        "auto_cosine_to_raw_min": rounded(min(cosines), 6),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.slow_link", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--count", type=int, default=64, help="sentences per job")
    p.add_argument("--repeat", type=int, default=3, help="rounds of (raw, auto)")
    p.add_argument("--micro-batch", type=int, default=32, help="texts per micro-batch")
    p.add_argument("--rate", default="10mbit", help="the tbf rate of the slow link")
    args = p.parse_args(argv)
    quiet_logs()
    reason = netns_available()
    if reason:
        emit_json({"bench": "slow_link", "skipped": reason})
        return 0
    count, repeat = (16, 1) if args.smoke else (args.count, args.repeat)
    if count < 1 or repeat < 1 or not 1 <= args.micro_batch <= 256:
        p.error("--count, --repeat >= 1 and --micro-batch in 1..256 expected")
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root:
        doc = run(
            models_dir, root, count=count, repeat=repeat, micro=args.micro_batch, rate=args.rate
        )
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
