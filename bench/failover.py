"""Benchmark: latency a host failure adds to a generation (docs/architecture.md §9 "failover").

Rule 1: prints exactly one JSON object on stdout; the runs without a failure (the
baseline) are measured in the same run, before and after the runs with one.
Rule 2: every daemon started is stopped (`local_cluster`), killed ones included; every
wait is bounded; the victim is SIGKILLed from the job's own event stream (after a third
of the tokens, the host serving the route's last hop), never after a sleep.
Rule 3: the output of every run must equal the one-process generation; the JSON says
whether it did, and how many failovers each run made.

Layout: the origin serves Nexus 1.1's first span, host1 the middle one, and the tail is
replicated on `--failures + 1` hosts, so each failure run kills the tail host in use and
the session fails over to a surviving replica and replays the tail's stored inputs.
Target: added latency < 2 x one step + the replay, where the replay is estimated as the
replayed steps times the tail hop's per-step cost in the runs without failure. The
origin's log gives the measured split: detection (kill -> `hop_failed`) and reroute
(`hop_failed` -> `span_rerouted`: open the new hop + replay); `rest_s` is what is left
(the steps after the failover running slower, noise). Every tail replica runs one short
job first (from itself as origin), so the standby it fails over to is warm.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from nexusd.api.records import (
    GenerateReply,
    GenerateRequest,
    RouteEvent,
    StatusReply,
    StatusRequest,
    TokenEvent,
)
from nexusd.harness.cluster import LocalCluster, even_spans
from nexusd.harness.demo import PROMPT, default_models_dir
from nexusd.model_registry import ModelRegistry

from .common import (
    CALL_TIMEOUT_S,
    common_args,
    emit_json,
    hosted_mesh,
    median,
    quiet_logs,
    rounded,
    work_dir,
)
from .generate import local_generation, mesh_generation

# The untrained Nexus 1.1 blocks: the same compute as the shipped model, and a generation
# that runs its full length (the trained model may stop early at [SEP]); speed, not text.
BENCH_MODEL = "nexus-1.1-random"

LOG_WAIT_S = 10.0


@dataclass(slots=True)
class Kill:
    """Watches a job's events; kills the last hop's host after `after` tokens."""

    cluster: LocalCluster
    hex_to_index: dict[str, int]
    after: int
    tokens: int = 0
    routes: list[RouteEvent] = field(default_factory=list)
    victim: int | None = None
    killed_at: float = 0.0  # time.time(), comparable with the daemons' log timestamps

    def __call__(self, event: object) -> None:
        if isinstance(event, RouteEvent):
            self.routes.append(event)
        elif isinstance(event, TokenEvent):
            self.tokens += 1
            if self.tokens == self.after and self.victim is None and self.routes:
                self.victim = self.hex_to_index[self.routes[-1].hops[-1].host]
                self.killed_at = time.time()
                self.cluster.daemon(self.victim).proc.kill()  # SIGKILL, reaped after the job


def node_ids(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for i in range(cluster.size):
        reply = cluster.call(i, StatusRequest(), expect=StatusReply, timeout_s=30)
        out[reply.node_id] = i
    return out


def log_time(event: dict[str, object]) -> float:
    """Seconds since the epoch of a daemon's JSON log line (its ISO UTC "timestamp")."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def failure_run(
    cluster: LocalCluster, ids: dict[str, int], tokens: int
) -> tuple[GenerateReply, float, Kill, dict[str, float]]:
    """One job with a kill after tokens/3; reply, client seconds, the kill, log split."""
    kill = Kill(cluster, ids, max(2, tokens // 3))
    t0 = time.perf_counter()
    req = GenerateRequest(prompt=PROMPT, model=BENCH_MODEL, max_new_tokens=tokens)
    reply = cluster.call(0, req, expect=GenerateReply, timeout_s=CALL_TIMEOUT_S, on_event=kill)
    wall = time.perf_counter() - t0
    if kill.victim is not None:
        cluster.daemon(kill.victim).stop()  # reap it and close its log
    origin = cluster.daemon(0)

    def first_after(name: str, since: float) -> dict[str, object]:
        return origin.wait_for(
            lambda e: e.get("event") == name and log_time(e) >= since, LOG_WAIT_S
        )

    failed = first_after("hop_failed", kill.killed_at - 0.001)
    rerouted = first_after("span_rerouted", log_time(failed))
    split = {
        "detect_s": log_time(failed) - kill.killed_at,
        "reroute_s": log_time(rerouted) - log_time(failed),
        "replayed_steps": float(str(rerouted.get("replayed", 0))),
    }
    return reply, wall, kill, split


def tail_step_s(reply: GenerateReply) -> float:
    """Per-step cost of the route's last hop (compute + queue + transfer)."""
    tail = max(reply.route, key=lambda h: h.end)
    return (tail.compute_s + tail.queue_s + tail.transfer_s) / max(1, tail.steps)


def layout_for(n_atoms: int, failures: int) -> list[list[str]]:
    (a0, b0), (a1, b1), (a2, b2) = even_spans(n_atoms, 3)
    model = BENCH_MODEL
    return [
        [f"{model}:{a0}-{b0}"],
        [f"{model}:{a1}-{b1}"],
        *[[f"{model}:{a2}-{b2}"] for _ in range(failures + 1)],
    ]


def run(
    models_dir: Path, root: Path, *, tokens: int, failures: int, repeat: int
) -> dict[str, object]:
    torch.set_num_threads(1)
    registry = ModelRegistry(models_dir)
    info = registry.info(BENCH_MODEL)
    model = registry.load_model(BENCH_MODEL)
    ref, _ = local_generation(model, registry.tokenizer(BENCH_MODEL).encode_prompt(PROMPT), tokens)
    layout = layout_for(info.n_atoms, failures)
    names = ["origin", "host1", *[f"tail{i}" for i in range(1, failures + 2)]]
    with hosted_mesh(
        root, layout, models_dir=models_dir, names=names, wait=[(BENCH_MODEL, len(layout))]
    ) as cluster:
        ids = node_ids(cluster)
        mesh_generation(cluster, min(tokens, 4))  # warm-up
        warmed = [warm_replica(cluster, i) for i in range(2, cluster.size)]
        clean = [mesh_generation(cluster, tokens)[0] for _ in range(repeat)]
        failed = [failure_run(cluster, ids, tokens) for _ in range(failures)]
        clean.append(mesh_generation(cluster, tokens)[0])  # after the failures, too
    doc = summarise(clean, failed, ref, tokens=tokens, layout=layout)
    doc["replicas_warmed"] = all(warmed)
    return doc


def warm_replica(cluster: LocalCluster, i: int) -> bool:
    """Run a short job from tail replica i so its span has computed once (a hot standby);
    True when the route used its own span."""
    reply, _ = mesh_generation(cluster, 2, origin=i)
    return any(h.name == cluster.names[i] for h in reply.route)


def summarise(
    clean: list[GenerateReply],
    failed: list[tuple[GenerateReply, float, Kill, dict[str, float]]],
    ref: tuple[int, ...],
    *,
    tokens: int,
    layout: list[list[str]],
) -> dict[str, object]:
    base_s = median([r.elapsed_s for r in clean])
    step_s = base_s / tokens
    tail_s = median([tail_step_s(r) for r in clean])
    runs: list[dict[str, object]] = []
    added_s: list[float] = []
    over: list[float] = []
    for reply, wall, kill, split in failed:
        added = reply.elapsed_s - base_s
        replay_est = split["replayed_steps"] * tail_s
        budget = 2 * step_s + replay_est
        added_s.append(added)
        over.append(added / budget)
        runs.append(
            {
                "elapsed_s": rounded(reply.elapsed_s, 3),
                "client_s": rounded(wall, 3),
                "killed_after_tokens": kill.after,
                "victim": kill.victim,
                "failovers": len(reply.failovers),
                "identical": reply.token_ids == ref,
                "added_s": rounded(added, 4),
                "replayed_steps": int(split["replayed_steps"]),
                "replay_estimate_s": rounded(replay_est, 4),
                "budget_s": rounded(budget, 4),
                "added_over_budget": rounded(added / budget, 3),
                "detect_s": rounded(split["detect_s"], 4),
                "reroute_s": rounded(split["reroute_s"], 4),
                "rest_s": rounded(added - split["detect_s"] - split["reroute_s"], 4),
                "reasons": [f[:90] for f in reply.failovers],
            }
        )
    return {
        "bench": "failover",
        "model": BENCH_MODEL,
        "layout": [s for specs in layout for s in specs],
        "new_tokens": tokens,
        "clean_runs": len(clean),
        "failure_runs": len(runs),
        "clean_elapsed_s": rounded(base_s, 3),
        "step_ms": rounded(step_s * 1e3, 3),
        "tail_step_ms": rounded(tail_s * 1e3, 3),
        "clean_identical": all(r.token_ids == ref for r in clean),
        "identical": all(bool(r["identical"]) for r in runs),
        "added_s_median": rounded(median(added_s), 4),
        "added_over_budget_worst": rounded(max(over), 3),
        "added_over_budget_median": rounded(median(over), 3),
        "added_in_steps_median": rounded(median(added_s) / step_s, 2),
        "target": "added_s < 2 x step + replay (added_over_budget < 1)",
        "runs": runs,
        "cpus": os.cpu_count(),
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    p.add_argument(
        "--failures",
        type=int,
        default=2,
        help="failure runs (the tail is replicated on this many + 1 hosts)",
    )
    p.add_argument("--repeat", type=int, default=2, help="runs without a failure, before the kills")
    args = p.parse_args(argv)
    tokens, failures, repeat = args.tokens, args.failures, args.repeat
    if args.smoke:
        tokens, failures, repeat = 6, 1, 1
    if tokens < 3 or failures < 1 or repeat < 1:
        p.error(
            f"--tokens >= 3, --failures >= 1, --repeat >= 1 expected, got {tokens}, {failures}, {repeat}"
        )
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root:
        doc = run(models_dir, root, tokens=tokens, failures=failures, repeat=repeat)
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
