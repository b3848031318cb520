"""Benchmark: micro-batched embeddings over a mesh vs one process (docs/architecture.md §9 "embed").

Rule 1: prints exactly one JSON object on stdout; both baselines are measured in the same
run, interleaved with the mesh runs, because these shared machines are noisy.
Rule 2: every process started is stopped (`local_cluster`; the baseline worker is a
subprocess with a deadline), every wait is bounded, every count is fixed.
Rule 3: the texts are generated from templates (no downloads), and the mesh's vectors are
checked against the one-process vectors (minimum cosine reported).

Setup: three daemons: the origin hosts nothing and relays (every hop's input leaves from
it and comes back to it); host1 serves MiniLM atoms 0-4, host2 atoms 4-8. Each host's
threads are pinned to its own core (`sched_setaffinity` on every thread of the daemon,
right after it started; later threads inherit it). Baselines: `atoms.embed.embed_texts`
with one torch thread (a) in this process, unpinned, and (b) in a subprocess pinned to
core 0: "two single-core hosts vs one single-core process" is the pipeline's speedup.
The mesh is also run at several micro-batch sizes, with two requests at once (twice the
micro-batches in flight) and with fp16 activations on the wire, to see what limits the
pipeline; per-daemon CPU seconds (from /proc) show what relaying and sealing cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import trio

from nexusd.api.client import call
from nexusd.api.records import EmbedReply, EmbedRequest, vectors_of
from nexusd.harness.cluster import LocalCluster
from nexusd.harness.demo import default_models_dir
from nexusd.model_registry import DEFAULT_EMBED_MODEL, ModelRegistry

from .common import common_args, emit_json, hosted_mesh, median, quiet_logs, rounded, work_dir

TARGET_SPEEDUP = 1.6  # two pinned single-core hosts vs one single-core process
BASELINE_BATCH = 32  # embed_texts' default (sentence-transformers' too)
HALF_CODEC = "fp16"  # activations on the wire in half precision: half the bytes to seal and move
CONCURRENT = 2  # requests at once in the "more micro-batches in flight" experiment
WORKER_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 300.0
SUBJECTS = (
    "The engineer",
    "A small dog",
    "My neighbour",
    "The orchestra",
    "An old fisherman",
    "The committee",
    "A young student",
    "The storm",
    "Our team",
    "The river",
)
VERBS = (
    "repaired",
    "watched",
    "painted",
    "described",
    "ignored",
    "celebrated",
    "measured",
    "carried",
    "questioned",
    "followed",
)
OBJECTS = (
    "the broken bridge",
    "a quiet evening by the lake",
    "the results of the long experiment",
    "an unexpected letter",
    "the red bicycle",
    "the crowded market on Sunday morning",
    "a forgotten song",
    "the plans for the new library",
    "the mountain road",
    "dinner",
)
TAILS = (
    "",
    " before noon",
    " with great care",
    " while it was raining outside",
    " and then went home",
    " for the third time this year",
)


def sentences(n: int, seed: int = 5) -> list[str]:
    """`n` varied sentences (4-20 words) from templates, fixed by `seed`."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
        for _ in range(n)
    ]


# ---- baselines -------------------------------------------------------------------------------


def local_embedding(model: object, texts: list[str]) -> tuple[torch.Tensor, float]:
    """Vectors and seconds of one in-process `embed_texts` run."""
    from atoms.embed import embed_texts

    t0 = time.perf_counter()
    vecs = embed_texts(model, texts, batch_size=BASELINE_BATCH)  # type: ignore[arg-type]
    return vecs, time.perf_counter() - t0


def worker(models_dir: Path, count: int, repeat: int) -> int:
    """`--worker`: the pinned single-core baseline (run in a subprocess); prints seconds."""
    torch.set_num_threads(1)
    model = ModelRegistry(models_dir).load_model(DEFAULT_EMBED_MODEL)
    texts = sentences(count)
    local_embedding(model, texts[: 2 * BASELINE_BATCH])  # warm-up
    secs, cpu = [], []
    for _ in range(repeat):
        c0 = time.process_time()
        secs.append(local_embedding(model, texts)[1])
        cpu.append(time.process_time() - c0)
    emit_json({"seconds": secs, "cpu_seconds": cpu, "affinity": sorted(os.sched_getaffinity(0))})
    return 0


@dataclass(frozen=True, slots=True)
class Baseline:
    """Runs of the pinned single-core baseline: wall and CPU seconds of each."""

    seconds: tuple[float, ...]
    cpu_s: tuple[float, ...]


def pinned_baseline(models_dir: Path, count: int, repeat: int, core: int) -> Baseline:
    """Run `worker` in a subprocess whose every thread is bound to `core`."""
    cmd = [
        sys.executable,
        "-m",
        "bench.embed",
        "--worker",
        "--models-dir",
        str(models_dir),
        "--count",
        str(count),
        "--repeat",
        str(repeat),
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        cwd=Path(__file__).resolve().parents[1],
    )
    if res.returncode != 0:
        raise RuntimeError(f"baseline worker failed ({res.returncode}): {res.stderr[-800:]}")
    doc = json.loads(res.stdout.strip().splitlines()[-1])  # Any: decoded JSON of our worker
    return Baseline(tuple(map(float, doc["seconds"])), tuple(map(float, doc["cpu_seconds"])))


def merge_baselines(runs: list[Baseline]) -> Baseline:
    return Baseline(
        tuple(x for r in runs for x in r.seconds), tuple(x for r in runs for x in r.cpu_s)
    )


# ---- pinning the hosts --------------------------------------------------------------------------


def pin_process(pid: int, core: int) -> bool:
    """Bind every thread of `pid` to `core`; True when each one reads back as bound."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        for tid in tids:
            os.sched_setaffinity(tid, {core})
        return all(os.sched_getaffinity(tid) == {core} for tid in tids)
    except (OSError, ValueError):
        return False


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the mesh ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshRun:
    """One embedding job over the mesh: its reply, client wall time, CPU s per daemon."""

    reply: EmbedReply
    wall_s: float
    cpu_s: tuple[float, ...]


def mesh_embedding(
    cluster: LocalCluster, texts: list[str], micro_batch: int, codec: str = "raw"
) -> MeshRun:
    pids = [cluster.daemon(i).proc.pid for i in range(cluster.size)]
    c0 = [cpu_seconds(pid) for pid in pids]
    t0 = time.perf_counter()
    req = EmbedRequest(
        texts=tuple(texts),
        model=DEFAULT_EMBED_MODEL,
        micro_batch=micro_batch,
        codec=codec,
    )
    reply = cluster.call(0, req, expect=EmbedReply, timeout_s=CALL_TIMEOUT_S)
    wall = time.perf_counter() - t0
    cpu = tuple(cpu_seconds(pid) - c for pid, c in zip(pids, c0, strict=True))
    return MeshRun(reply, wall, cpu)


def concurrent_embedding(
    cluster: LocalCluster, texts: list[str], micro_batch: int, k: int
) -> float:
    """Texts/s (client wall) of `k` embed requests sent at once, texts split round robin:
    k x 3 micro-batches in flight instead of 3 (what more lanes per job would give)."""
    sock = cluster.daemon(0).socket

    async def all_at_once() -> None:
        async with trio.open_nursery() as nursery:
            for part in range(k):
                req = EmbedRequest(
                    texts=tuple(texts[part::k]),
                    model=DEFAULT_EMBED_MODEL,
                    micro_batch=micro_batch,
                )
                nursery.start_soon(
                    partial(call, sock, req, expect=EmbedReply, timeout_s=CALL_TIMEOUT_S)
                )

    t0 = time.perf_counter()
    trio.run(all_at_once)
    return len(texts) / (time.perf_counter() - t0)


def min_cosine(reply: EmbedReply, ref: torch.Tensor) -> float:
    got = torch.tensor(vectors_of(reply))
    return float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min())


def describe(run: MeshRun, names: list[str]) -> dict[str, object]:
    """One mesh run: throughput, how busy each host was (compute / elapsed), CPU used."""
    reply, wall = run.reply, run.wall_s
    el = reply.elapsed_s
    hosts = [
        {
            "name": h.name,
            "atoms": f"{h.start}-{h.end}",
            "steps": h.steps,
            "busy": rounded(h.compute_s / el, 3),
            "queue_s": rounded(h.queue_s, 3),
            "transfer_s": rounded(h.transfer_s, 3),
            "mb": rounded((h.bytes_in + h.bytes_out) / 1e6, 2),
        }
        for h in reply.route
    ]
    return {
        "texts_per_s": rounded(reply.count / el, 2),
        "client_texts_per_s": rounded(reply.count / wall, 2),
        "elapsed_s": rounded(el, 3),
        "hosts_busy_sum": rounded(sum(h.compute_s for h in reply.route) / el, 3),
        "hosts": hosts,
        "cpu_s": {n: rounded(c, 2) for n, c in zip(names, run.cpu_s, strict=True)},
    }


def run(
    models_dir: Path, root: Path, *, count: int, repeat: int, micro_batches: list[int]
) -> dict[str, object]:
    torch.set_num_threads(1)
    registry = ModelRegistry(models_dir)
    n_atoms = registry.info(DEFAULT_EMBED_MODEL).n_atoms
    model = registry.load_model(DEFAULT_EMBED_MODEL)
    texts = sentences(count)
    cut = n_atoms // 2
    layout = [[], [f"{DEFAULT_EMBED_MODEL}:0-{cut}"], [f"{DEFAULT_EMBED_MODEL}:{cut}-{n_atoms}"]]
    cores = usable_cores()
    with hosted_mesh(
        root,
        layout,
        models_dir=models_dir,
        names=["origin", "host1", "host2"],
        wait=[(DEFAULT_EMBED_MODEL, 2)],
    ) as cluster:
        pinned = len(cores) >= 2 and all(
            pin_process(cluster.daemon(i).proc.pid, cores[i - 1]) for i in (1, 2)
        )
        ref, _ = local_embedding(model, texts)  # warm-up and reference vectors
        mesh_embedding(cluster, texts[: 3 * micro_batches[0]], micro_batches[0])  # warm-up
        local_s: list[float] = []
        runs: dict[int, list[MeshRun]] = {mb: [] for mb in micro_batches}
        parallel: list[float] = []
        halves: list[MeshRun] = []
        half_cos = 1.0
        singles: list[Baseline] = []
        cos = 1.0
        for _ in range(repeat):  # interleaved: every round has each baseline and each mesh run
            local_s.append(local_embedding(model, texts)[1])
            if pinned:
                singles.append(pinned_baseline(models_dir, count, 1, cores[0]))
            for mb in micro_batches:
                one = mesh_embedding(cluster, texts, mb)
                cos = min(cos, min_cosine(one.reply, ref))
                runs[mb].append(one)
            parallel.append(concurrent_embedding(cluster, texts, micro_batches[0], CONCURRENT))
            half = mesh_embedding(cluster, texts, micro_batches[0], HALF_CODEC)
            half_cos = min(half_cos, min_cosine(half.reply, ref))
            halves.append(half)
        single_core = merge_baselines(singles) if singles else None
    doc = summarise(
        runs, local_s, single_core, count=count, pinned=pinned, cos=cos, layout=layout, cores=cores
    )
    single = median([count / s for s in single_core.seconds]) if single_core is not None else 0.0
    one_client = median([r.reply.count / r.wall_s for r in runs[micro_batches[0]]])
    doc["concurrent_requests"] = {
        "requests": CONCURRENT,
        "micro_batch": micro_batches[0],
        "client_texts_per_s": rounded(median(parallel), 2),
        "over_one_request_client": rounded(median(parallel) / one_client, 3),
        "speedup_pinned": rounded(median(parallel) / single, 3) if single else None,
    }
    half_tps = median([r.reply.count / r.reply.elapsed_s for r in halves])
    doc["half_precision_wire"] = {
        "codec": HALF_CODEC,
        "micro_batch": micro_batches[0],
        "texts_per_s": rounded(half_tps, 2),
        "min_cosine_vs_one_process": rounded(half_cos, 6),
        "speedup_pinned": rounded(half_tps / single, 3) if single else None,
        "cpu_s": {
            n: rounded(median([r.cpu_s[i] for r in halves]), 2)
            for i, n in enumerate(("origin", "host1", "host2"))
        },
    }
    return doc


def summarise(
    runs: dict[int, list[MeshRun]],
    local_s: list[float],
    single_core: Baseline | None,
    *,
    count: int,
    pinned: bool,
    cos: float,
    layout: list[list[str]],
    cores: list[int],
) -> dict[str, object]:
    local_tps = median([count / s for s in local_s])
    per_mb: dict[str, dict[str, object]] = {}
    medians: dict[int, float] = {}
    for mb, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r.reply.elapsed_s)
        medians[mb] = median([r.reply.count / r.reply.elapsed_s for r in rs])
        one = per_mb[str(mb)] = describe(ordered[len(ordered) // 2], ["origin", "host1", "host2"])
        if (
            single_core is not None
        ):  # what even perfect scheduling of this much CPU on the cores allows
            cpu = sum(ordered[len(ordered) // 2].cpu_s)
            one["cpu_bound_speedup"] = rounded(len(cores) * median(single_core.cpu_s) / cpu, 3)
    head = next(iter(runs))  # the first micro-batch size is the headline (the request default)
    best = max(medians, key=lambda mb: medians[mb])
    doc: dict[str, object] = {
        "bench": "embed",
        "model": DEFAULT_EMBED_MODEL,
        "texts": count,
        "repeat": len(local_s),
        "layout": {"origin": layout[0], "host1": layout[1], "host2": layout[2]},
        "min_cosine_vs_one_process": rounded(cos, 6),
        "one_process_texts_per_s": rounded(local_tps, 2),
        "one_process_batch": BASELINE_BATCH,
        "micro_batch": head,
        "mesh_texts_per_s": rounded(medians[head], 2),
        "ratio_vs_one_process": rounded(medians[head] / local_tps, 3),
        "best_micro_batch": best,
        "best_mesh_texts_per_s": rounded(medians[best], 2),
        "by_micro_batch": per_mb,
        "pinned": pinned,
        "pin_method": "sched_setaffinity on every daemon thread",
        "cores": cores,
        "target_speedup": TARGET_SPEEDUP,
        "cpus": os.cpu_count(),
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }
    if single_core is not None:
        single = median([count / s for s in single_core.seconds])
        doc["single_core_process_texts_per_s"] = rounded(single, 2)
        doc["single_core_process_cpu_s"] = rounded(median(single_core.cpu_s), 2)
        doc["speedup_pinned"] = rounded(medians[head] / single, 3)
        doc["best_speedup_pinned"] = rounded(medians[best] / single, 3)
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker, the pinned baseline) and print one JSON object."""
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--count", type=int, default=256, help="sentences per run")
    p.add_argument(
        "--repeat", type=int, default=3, help="rounds (each: both baselines + every mesh run)"
    )
    p.add_argument(
        "--micro-batches",
        default="16,32,64",
        help="comma-separated micro-batch sizes; the first is the headline",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models_dir = args.models_dir or default_models_dir()
    quiet_logs()
    if args.worker:
        return worker(models_dir, args.count, args.repeat)
    count, repeat = args.count, args.repeat
    mbs = [int(x) for x in args.micro_batches.split(",") if x]
    if args.smoke:
        count, repeat, mbs = 16, 1, [8]
    if count < 1 or repeat < 1 or not mbs or not all(1 <= mb <= 256 for mb in mbs):
        p.error(
            f"--count, --repeat >= 1 and micro-batches in 1..256 expected, got {count}, {repeat}, {mbs}"
        )
    with work_dir(args.workdir) as root:
        doc = run(models_dir, root, count=count, repeat=repeat, micro_batches=mbs)
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
