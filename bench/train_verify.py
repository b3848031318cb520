"""Benchmark: what training spot-checks cost: `train lm` tokens/s checked vs unchecked.

Rule 1: prints exactly one JSON object on stdout; the checked and the unchecked runs
alternate round by round on the same mesh (these shared machines are noisy).
Rule 2: every daemon is stopped (`local_cluster`); trained models land in the bench's own
models folder of links (`bench.train.linked_models`), never in the shared one.

Figure: the median over rounds of 1 - checked / unchecked tokens/s of the round's two jobs.
Setup: four daemons. Two origins that host nothing: "checked" with the default [train]
verify_rate and verify_first_micro_batches, "unchecked" with both 0; host1 serves the
frozen base and the two trainable blocks [0,10), host2 the head [10,11). Every job of
either origin takes the same route, and both its stages are remote, so every stage is
checked (the worst case: an origin's own spans are never checked). Throughput: the job's
tokens over its whole time (`TrainReply.tokens_per_s`: sessions, every check, validation)
and over the steps after the first (the steady state; the first micro-batch of each host
is always checked in step 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path

from nexusd.api.records import TrainProgressEvent, TrainReply, TrainRequest
from nexusd.config import TrainConfig
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.harness.demo import default_models_dir

from .common import CALL_TIMEOUT_S, HOSTS_TIMEOUT_S, emit_json, median, quiet_logs, rounded
from .common import work_dir as bench_work_dir
from .train import MODEL, bench_data, linked_models

Doc = dict[str, object]
UNCHECKED = ["env", "NEXUSD_TRAIN__VERIFY_RATE=0", "NEXUSD_TRAIN__VERIFY_FIRST_MICRO_BATCHES=0"]
TARGET_OVERHEAD = 0.10  # of tokens/s, at the default rate


def one_job(
    cluster: LocalCluster, origin: int, req: TrainRequest, models: Path
) -> tuple[float, float]:
    """(whole-job tokens/s, steady tokens/s after the first step) of one run from `origin`."""
    req = dataclasses.replace(req, output=f"bench-verify-{origin}-{time.monotonic_ns()}")
    at: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, TrainProgressEvent) and event.resumed_from < 0:
            at.append(time.perf_counter())

    reply = cluster.call(
        origin, req, expect=TrainReply, timeout_s=CALL_TIMEOUT_S * 10, on_event=on_event
    )
    for folder in (models / req.output, Path(reply.checkpoint)):
        shutil.rmtree(folder, ignore_errors=True)
    per_step = reply.tokens / req.steps
    steady = per_step * (len(at) - 2) / (at[-2] - at[0]) if len(at) >= 3 else 0.0
    return reply.tokens_per_s, steady  # the last step holds the validation: left out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_verify", description=__doc__)
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    quiet_logs()
    defaults = TrainConfig()
    req = TrainRequest(
        task="lm",
        model=MODEL,
        output="unused",
        steps=args.steps,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        accumulation=args.accumulation,
        eval_interval=0,
        eval_examples=16,
        checkpoint_interval=0,
        warmup_steps=1,
    )
    with bench_work_dir(args.workdir) as root:
        models = linked_models(args.models_dir or default_models_dir(), root / "models")
        req = dataclasses.replace(req, data=str(bench_data(root / "corpus.txt", req)))
        runs: dict[str, list[tuple[float, float]]] = {"checked": [], "unchecked": []}
        with local_cluster(
            root / "mesh",
            4,
            models_dir=models,
            names=["checked", "unchecked", "host1", "host2"],
            prefixes=[[], UNCHECKED, [], []],
        ) as cluster:
            cluster.host(2, f"{MODEL}:0-10")
            cluster.host(3, f"{MODEL}:10-11")
            for origin in (0, 1):
                cluster.wait_hosts(origin, 2, MODEL, timeout_s=HOSTS_TIMEOUT_S)
            for _ in range(args.rounds):
                runs["checked"].append(one_job(cluster, 0, req, models))
                runs["unchecked"].append(one_job(cluster, 1, req, models))
    whole = {k: median([w for w, _ in v]) for k, v in runs.items()}
    steady = {k: median([s for _, s in v]) for k, v in runs.items()}
    # each round's checked and unchecked jobs ran back to back: their ratio is the figure
    # (the load of these shared machines moves a lot between rounds)
    pairs = list(zip(runs["checked"], runs["unchecked"], strict=True))
    overhead = median([1 - c[0] / u[0] for c, u in pairs])
    steady_overhead = median([1 - c[1] / u[1] for c, u in pairs if u[1] > 0])
    doc: Doc = {
        "bench": "train_verify",
        "model": MODEL,
        "verify_rate": defaults.verify_rate,
        "verify_first_micro_batches": defaults.verify_first_micro_batches,
        "settings": {
            "steps": req.steps,
            "seq_len": req.seq_len,
            "micro_batch": req.micro_batch,
            "accumulation": req.accumulation,
            "rounds": args.rounds,
        },
        "tokens_per_s": {k: rounded(v, 1) for k, v in whole.items()},
        "steady_tokens_per_s": {k: rounded(v, 1) for k, v in steady.items()},
        "runs": {k: [[rounded(w, 1), rounded(s, 1)] for w, s in v] for k, v in runs.items()},
        "overhead": rounded(overhead, 4),
        "steady_overhead": rounded(steady_overhead, 4),
        "round_overheads": [rounded(1 - c[0] / u[0], 4) for c, u in pairs],
        "target_overhead": TARGET_OVERHEAD,
        "ok": overhead < TARGET_OVERHEAD,
        "cpus": os.cpu_count(),
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
