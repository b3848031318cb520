"""Benchmark: 3 daemons placing themselves (`host --auto`) vs the best manual placement (#14).

Rule 1: prints exactly one JSON object on stdout (logs go to stderr and the daemons' log
files).
Rule 2: every mesh gets the same weight budget per node (`atoms.memory_budget_bytes`,
default 80 MB: the 150 MB model does not fit one node, two can cover it), so the manual
layouts are the ones a person could set up on those devices; each layout gets its own
fresh mesh, and the figures are medians over `--repeat` rounds after a warm-up round,
the layouts' rounds interleaved.
Rule 3: the workload is swarm throughput, the figure placement optimises: `--streams`
generations at once from node 0, tokens/s = all their tokens over the wall time.

Manual layouts tried (node 0, 1, 2; atoms [A, B)): the embedding+4 blocks / the rest cut
(the only cut both halves of which fit 80 MB) with the third node on either half or on
the middle blocks. The auto mesh: every node `host MODEL --auto`; measured once the spans
cover the model and have not changed for a few placement intervals. All the meshes run
at once (12 daemons, idle but for the one measured) so that their rounds interleave.
Target: auto / best manual >= 0.9.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nexusd.api.records import GenerateReply, GenerateRequest, PeersReply, PeersRequest
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.harness.demo import PROMPT, default_models_dir

from .common import CALL_TIMEOUT_S, common_args, emit_json, median, quiet_logs, rounded, work_dir

MODEL = "nexus-1.1-random"  # full-length generations (the trained model may stop at [SEP])
N_ATOMS = 11
TARGET_RATIO = 0.9
BUDGET = 80_000_000
INTERVAL_S = 1.0
MANUAL: dict[str, list[str]] = {
    "cut5+first": ["0-5", "5-11", "0-5"],
    "cut5+second": ["0-5", "5-11", "5-11"],
    "cut5+middle": ["0-5", "5-11", "1-10"],
}


def env(budget: int) -> dict[str, str]:
    return {
        "NEXUSD_MESH__ADVERT_REFRESH_S": "1",
        "NEXUSD_MESH__ADVERT_LEASE_S": "4",
        "NEXUSD_MESH__PING_INTERVAL_S": "1",
        "NEXUSD_ATOMS__MEMORY_BUDGET_BYTES": str(budget),
        "NEXUSD_ATOMS__PLACEMENT_INTERVAL_S": str(INTERVAL_S),
    }


def layout_of(reply: PeersReply) -> tuple[tuple[str, ...], ...]:
    """Each node's hosted spans of MODEL, in node-id order."""
    return tuple(
        tuple(sorted(h.rpartition(":")[2] for h in p.hosted if h.startswith(MODEL + ":")))
        for p in sorted(reply.peers, key=lambda p: p.node_id)
        if p.state == "online"
    )


def covered(layout: tuple[tuple[str, ...], ...]) -> bool:
    atoms = set()
    for spans in layout:
        for s in spans:
            a, b = (int(x) for x in s.split("-"))
            atoms |= set(range(a, b))
    return atoms == set(range(N_ATOMS))


def wait_settled(cluster: LocalCluster, timeout_s: float = 120.0) -> tuple[tuple[str, ...], ...]:
    """Poll node 0 until every node serves a span, the model is covered, and the layout
    has not changed for 4 placement intervals (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        layout = layout_of(cluster.call(0, PeersRequest(), expect=PeersReply))
        now = time.monotonic()
        if layout != last:
            last, since = layout, now
        ready = len(layout) == 3 and all(layout) and covered(layout)
        if ready and now - since >= 4 * INTERVAL_S:
            return layout
        if now > deadline:
            raise RuntimeError(f"auto placement did not settle in {timeout_s}s: {layout}")
        time.sleep(0.25)  # condition poll under the deadline


def swarm_round(cluster: LocalCluster, streams: int, tokens: int) -> float:
    """`streams` generations at once from node 0; all their tokens over the wall time."""
    done: list[int] = []
    errors: list[BaseException] = []

    def one(k: int) -> None:
        req = GenerateRequest(prompt=f"{PROMPT} {k}", model=MODEL, max_new_tokens=tokens)
        try:
            reply = cluster.call(0, req, expect=GenerateReply, timeout_s=CALL_TIMEOUT_S)
            done.append(len(reply.token_ids))
        except Exception as exc:  # any failure: reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT_S + 10)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a generation failed: {errors[0]}")
    return sum(done) / elapsed


@contextlib.contextmanager
def mesh_for(
    root: Path, models_dir: Path, specs: list[str] | None
) -> Iterator[tuple[LocalCluster, tuple[tuple[str, ...], ...], float]]:
    """A fresh mesh: manual `specs` per node, or every node `--auto` when None; yields it
    once its layout has settled, with the layout and the setup seconds."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with local_cluster(root, 3, models_dir=models_dir, env=env(BUDGET)) as cluster:
        for i in range(3):
            cluster.host(i, f"{MODEL}:{specs[i]}" if specs else f"{MODEL}:auto")
        layout = wait_settled(cluster)
        yield cluster, layout, time.monotonic() - t0


def measure_all(
    root: Path,
    models_dir: Path,
    layouts: dict[str, list[str] | None],
    streams: int,
    tokens: int,
    repeat: int,
) -> dict[str, dict[str, object]]:
    """Every layout's mesh up at once; rounds interleaved layout by layout (these shared
    machines vary 10-40 % from minute to minute), a warm-up round each first."""
    with contextlib.ExitStack() as stack:
        meshes = {
            name: stack.enter_context(mesh_for(root / name, models_dir, specs))
            for name, specs in layouts.items()
        }
        rounds: dict[str, list[float]] = {name: [] for name in layouts}
        for r in range(repeat + 1):
            for name, (cluster, _, _) in meshes.items():
                tps = swarm_round(cluster, streams, tokens)
                if r:  # round 0 warms up
                    rounds[name].append(tps)
        out: dict[str, dict[str, object]] = {}
        for name, (cluster, layout, setup_s) in meshes.items():
            after = layout_of(cluster.call(0, PeersRequest(), expect=PeersReply))
            out[name] = {
                "layout": ["+".join(s) for s in layout],
                "layout_after": ["+".join(s) for s in after],
                "tokens_per_s": rounded(median(rounds[name]), 2),
                "rounds": [rounded(x, 2) for x in rounds[name]],
                "setup_s": rounded(setup_s, 1),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m bench.placement", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--streams", type=int, default=3, help="generations at once")
    p.add_argument("--repeat", type=int, default=3, help="measured rounds per layout")
    args = p.parse_args(argv)
    tokens, streams, repeat = args.tokens, args.streams, args.repeat
    manual = MANUAL
    if args.smoke:
        tokens, streams, repeat = 4, 2, 1
        manual = {"cut5+second": MANUAL["cut5+second"]}
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    layouts: dict[str, list[str] | None] = {"auto": None, **manual}
    with work_dir(args.workdir) as root:
        results = measure_all(root, models_dir, layouts, streams, tokens, repeat)
    best = max(manual, key=lambda n: float(results[n]["tokens_per_s"]))  # type: ignore[arg-type]
    auto_tps = float(results["auto"]["tokens_per_s"])  # type: ignore[arg-type]
    best_tps = float(results[best]["tokens_per_s"])  # type: ignore[arg-type]
    emit_json(
        {
            "bench": "placement",
            "model": MODEL,
            "memory_budget_bytes": BUDGET,
            "streams": streams,
            "tokens": tokens,
            "auto_tokens_per_s": auto_tps,
            "best_manual": best,
            "best_manual_tokens_per_s": best_tps,
            "ratio": rounded(auto_tps / best_tps, 3) if best_tps else 0.0,
            "target_ratio": TARGET_RATIO,
            "layouts": results,
            "smoke": bool(args.smoke),
            "cpus": os.cpu_count(),
            "load_avg_1m": rounded(os.getloadavg()[0], 2),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
