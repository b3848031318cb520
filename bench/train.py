"""Benchmark: `train lm` of nexus-1.1 over a mesh of daemons vs one process (docs/architecture.md §9 "train").

Rule 1: prints exactly one JSON object on stdout; every baseline runs in the same run,
interleaved round by round with the mesh runs (these shared machines are noisy).
Rule 2: every daemon is stopped (`hosted_mesh`), every baseline is a subprocess under a
deadline, every count is fixed; trained models land in the work dir, never in the shared
models folder (the bench gives the daemons a folder of links to it).
Rule 3: the one-process baseline runs exactly the job's arithmetic (same windows, order,
dropout seeds, clip, schedule), so its per-step losses must equal the mesh's: the JSON says
how far apart they are.

Baseline: `SpanTrainer` over all 11 atoms in one process with one torch thread (the
reference the e2e tests compare trained weights with), not a 1-daemon mesh: what a user
without nexus would run, with no protocol cost at all. Throughput is tokens (targets) per
second over the steps between the first (sessions, allocations) and the last (validation).
Setups: (1) three daemons, the origin hosting the frozen base [0,8), host1 the two trainable
blocks [8,10), host2 the head [10,11) (the head is ~60 % of a step's compute, so every cut
that gives it a host of its own is as balanced as any; this one keeps the frozen base whole),
unpinned, 1F1B and GPipe, against the one-process baseline; (2) two daemons pinned to one
core each (origin on the first span) against a single-core process, for each 2-way cut;
(3) each run's measured idle share per host (`TrainReply.bubble`) beside the GPipe formula
(p-1)/(m+p-1), p = stages with a backward, m = accumulation; (4) fp32 vs bf16 autocast in
one process: tokens/s and validation loss before and after the same steps; (5) the same two
pinned daemons each hosting the whole model as two data-parallel replicas (`replicas=2`,
gradients summed every step: losses equal one process up to the order of the sums), which
no cut can match when one atom (the head) is most of a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atoms.atom import ForwardContext
from atoms.corpus import corpus_path, is_validation, paragraphs, read_text
from atoms.datasets import Order, lm_dataset
from atoms.model import Model
from atoms.span import Span
from atoms.training import OptimConfig, Schedule, SpanTrainer, fp32_copy
from nexusd.api.records import TrainProgressEvent, TrainReply, TrainRequest
from nexusd.harness.cluster import LocalCluster
from nexusd.harness.demo import default_models_dir
from nexusd.jobs.training import eval_batches, micro_batches
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
from .embed import cpu_seconds, pin_process, usable_cores

MODEL = "nexus-1.1"
TARGET_RATIO = 0.7  # 3-daemon mesh over one process (2 shared cores)
TARGET_SPEEDUP = 1.5  # 2 pinned single-core hosts over one single-core process
LAYOUT_3 = ((0, 8), (8, 10), (10, 11))  # origin, host1, host2
CUTS = (10, 9)  # 2-way cuts [0,c) + [c,11), measured pinned
N_ATOMS = 11
FIRST_TRAINABLE = 8  # atoms 0-7 (MiniLM base, positions) are frozen
LOSS_TOLERANCE = 1e-3  # per-step mean loss, mesh vs one process (nats)
WORKER_TIMEOUT_S = 600.0
Doc = dict[str, object]


# ---- the one-process baseline (runs in a subprocess) ---------------------------------------------


def one_process(model: Model, req: TrainRequest, data: Path, precision: str) -> Doc:
    """`req`'s training in this process, as the mesh job does it; seconds and loss per step
    and the validation loss before and after (the job's own validation batches)."""
    assert model.tokenizer is not None
    ds = lm_dataset(read_text(data), model.tokenizer, length=req.seq_len, digest="")
    trainer = SpanTrainer(
        Span(fp32_copy(model.atoms)),
        OptimConfig(weight_decay=req.weight_decay, dropout=req.dropout, precision=precision),
        needs_input_grad=False,
    )
    sched = Schedule(
        lr=req.lr,
        warmup_steps=req.warmup_steps,
        total_steps=req.steps,
        decay=req.decay,
        min_ratio=req.min_lr_ratio,
    )
    order = Order(len(ds.train), req.micro_batch, req.seed)
    evals = eval_batches(ds.validation, req.micro_batch, req.eval_examples)

    def validation() -> float:
        total, count = 0.0, 0
        for mb in evals:
            r = trainer.evaluate(
                mb.x, mb.targets, ForwardContext.for_tokens(*mb.x.shape[:2], causal=True)
            )
            total, count = total + r.loss, count + r.count
        return total / max(1, count)

    before = validation()
    secs, losses, tokens, busy = [], [], 0, []
    for step in range(req.steps):
        busy.append((machine_busy_s(), time.process_time()))
        t0 = time.perf_counter()
        loss, count = 0.0, 0
        for k, mb in enumerate(micro_batches(ds.train, order, step, req.accumulation, req.seed)):
            ctx = ForwardContext.for_tokens(mb.x.shape[0], mb.x.shape[1], causal=True)
            ctx.dropout, ctx.seed = req.dropout, mb.seed
            r = trainer.loss(k, mb.x, mb.targets, ctx)[0]
            loss, count = loss + r.loss, count + r.count
        norm = math.sqrt(trainer.grad_sq_norm()) / count
        clip = min(1.0, req.clip / norm) if req.clip > 0 and norm > 0 else 1.0
        trainer.apply(step, lr=sched.lr_at(step), scale=clip / count)
        secs.append(time.perf_counter() - t0)
        losses.append(loss / count)
        tokens = count
    timed = secs[1:-1]
    others = busy[-1][0] - busy[1][0] - (busy[-1][1] - busy[1][1])
    return {
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "losses": losses,
        "val_before": before,
        "val_after": validation(),
        "others_cores": others / sum(timed),
    }


def worker(models_dir: Path, settings: str, data: Path, precisions: list[str]) -> int:
    """`--worker`: one-process runs of `settings` (a TrainRequest as JSON), one per precision."""
    torch.set_num_threads(1)  # like the daemons (node.torch_threads = 1)
    req = TrainRequest(**json.loads(settings))
    model = ModelRegistry(models_dir).load_model(MODEL)
    runs = {p: one_process(model, req, data, p) for p in precisions}
    emit_json({"runs": runs, "affinity": sorted(os.sched_getaffinity(0))})
    return 0


@dataclass(frozen=True, slots=True)
class OneRun:
    """One one-process run: tokens/s over the timed steps, loss per step, validation loss."""

    tokens_per_s: float
    losses: tuple[float, ...]
    val_before: float
    val_after: float
    others_cores: float  # cores other processes of the machine used meanwhile


def baseline(
    models_dir: Path, req: TrainRequest, data: Path, precisions: list[str], core: int | None
) -> dict[str, OneRun]:
    """Run `worker` in a subprocess (bound to `core` if given); its runs by precision."""
    cmd = [
        sys.executable,
        "-m",
        "bench.train",
        "--worker",
        "--models-dir",
        str(models_dir),
        "--settings",
        json.dumps(dataclasses.asdict(req)),
        "--data",
        str(data),
        "--precisions",
        ",".join(precisions),
    ]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
        preexec_fn=pin,
        cwd=Path(__file__).resolve().parents[1],
    )
    if res.returncode != 0:
        raise RuntimeError(f"baseline worker failed ({res.returncode}): {res.stderr[-800:]}")
    runs = json.loads(res.stdout.strip().splitlines()[-1])["runs"]  # Any: our worker's JSON
    return {p: OneRun(**{**r, "losses": tuple(r["losses"])}) for p, r in runs.items()}


# ---- the mesh ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshRun:
    """One training job: its reply, when each step's progress arrived (client clock) with
    each daemon's CPU seconds and the machine's busy seconds then, and each step's loss."""

    reply: TrainReply
    step_at: tuple[float, ...]
    cpu_at: tuple[tuple[float, ...], ...]  # daemon 0, 1, ..., then the whole machine
    losses: tuple[float, ...]

    def cores(self, i: int) -> float:
        """Cores daemon i used over the timed steps (<= 1: one torch thread); i = -1: the
        whole machine."""
        return (self.cpu_at[-2][i] - self.cpu_at[0][i]) / (self.step_at[-2] - self.step_at[0])

    def others(self) -> float:
        """Cores the machine's other processes used meanwhile (noise on a shared machine)."""
        return self.cores(-1) - sum(self.cores(i) for i in range(len(self.cpu_at[0]) - 1))

    @property
    def tokens_per_s(self) -> float:
        """Over steps 2 .. N-1 (not the first, not the last, which also validates)."""
        per_step = self.reply.tokens / self.reply.steps
        return per_step * (len(self.step_at) - 2) / (self.step_at[-2] - self.step_at[0])


def mesh_run(cluster: LocalCluster, req: TrainRequest, models: Path, tag: str) -> MeshRun:
    req = dataclasses.replace(req, output=f"bench-{tag}-{time.monotonic_ns()}")
    pids = [cluster.daemon(i).proc.pid for i in range(cluster.size)]
    steps: list[tuple[float, tuple[float, ...], float]] = []

    def on_event(event: object) -> None:
        if isinstance(event, TrainProgressEvent) and event.resumed_from < 0:
            cpu = (*map(cpu_seconds, pids), machine_busy_s())
            steps.append((time.perf_counter(), cpu, event.loss))

    reply = cluster.call(0, req, expect=TrainReply, timeout_s=CALL_TIMEOUT_S * 5, on_event=on_event)
    for folder in (models / req.output, Path(reply.checkpoint)):  # ~150 MB, ~40 MB per run
        shutil.rmtree(folder, ignore_errors=True)
    if len(steps) != req.steps:
        raise RuntimeError(f"{len(steps)} progress events for {req.steps} steps")
    at, cpu, losses = zip(*steps, strict=True)
    return MeshRun(reply, at, cpu, losses)


def describe(runs: list[MeshRun], names: list[str], req: TrainRequest, ref: OneRun) -> Doc:
    """Median throughput of `runs`, and the last one's route, bubble and losses."""
    last = runs[-1].reply
    p = sum(1 for h in last.route if h.end > FIRST_TRAINABLE)
    m = req.accumulation
    return {
        "tokens_per_s": rounded(median([r.tokens_per_s for r in runs]), 1),
        "hops": [
            {
                "name": h.name,
                "atoms": f"{h.start}-{h.end}",
                "compute_s_per_step": rounded(h.compute_s / last.steps, 3),
                "transfer_s_per_step": rounded(h.transfer_s / last.steps, 3),
            }
            for h in last.route
        ],
        "bubble_measured": dict(last.bubble),
        "bubble_gpipe_formula": rounded((p - 1) / (m + p - 1), 3),
        "stages_p": p,
        "micro_batches_m": m,
        "max_loss_diff_vs_one_process": rounded(loss_diff(runs, ref), 6),
        "val_loss": last.val_loss,
        "failovers": sum(len(r.reply.failovers) for r in runs),
        "cores_used": {
            n: rounded(median([r.cores(i) for r in runs]), 2) for i, n in enumerate(names)
        },
        "others_cores": rounded(median([r.others() for r in runs]), 2),
    }


def loss_diff(runs: list[MeshRun], ref: OneRun) -> float:
    return max(abs(a - b) for r in runs for a, b in zip(r.losses, ref.losses, strict=True))


def machine_busy_s() -> float:
    """Seconds the machine's cores have been busy (/proc/stat), every process included."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def layout_of(spans: tuple[tuple[int, int], ...]) -> list[list[str]]:
    return [[f"{MODEL}:{a}-{b}"] for a, b in spans]


# ---- the measurement -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    models_dir: Path  # where nexus-1.1 is (the baseline reads it)
    models: Path  # the daemons' models folder: links to models_dir's models, and our outputs
    req: TrainRequest
    rounds: int

    def baseline(self, precisions: list[str], core: int | None) -> dict[str, OneRun]:
        return baseline(self.models_dir, self.req, Path(self.req.data), precisions, core)


@dataclass(frozen=True, slots=True)
class Unpinned:
    mesh: dict[str, list[MeshRun]]  # by schedule
    one: dict[str, list[OneRun]]  # by precision


def unpinned(plan: Plan, cluster: LocalCluster) -> Unpinned:
    """Setups 1, 3, 4: the mesh with both schedules against one unpinned process (fp32, bf16)."""
    out = Unpinned({"1f1b": [], "gpipe": []}, {"fp32": [], "bf16": []})
    for _ in range(plan.rounds):
        for prec, one in plan.baseline(["fp32", "bf16"], None).items():
            out.one[prec].append(one)
        for sched, runs in out.mesh.items():
            req = dataclasses.replace(plan.req, schedule=sched)
            runs.append(mesh_run(cluster, req, plan.models, sched))
    return out


def pinned(plan: Plan, cluster: LocalCluster, cores: list[int]) -> tuple[Doc, float, float]:
    """Setup 2 on one cut: both daemons pinned, against a process pinned to one core; the
    cut's figures, its speedup and how far its losses are from the baseline's."""
    ok = len(cores) >= 2 and all(pin_process(cluster.daemon(i).proc.pid, cores[i]) for i in (0, 1))
    runs, single = [], []
    for _ in range(plan.rounds):
        single.append(plan.baseline(["fp32"], cores[0])["fp32"])
        runs.append(mesh_run(cluster, plan.req, plan.models, "pinned"))
    one = median([r.tokens_per_s for r in single])
    speedup = median([r.tokens_per_s for r in runs]) / one
    doc = describe(runs, ["origin", "host1"], plan.req, single[0])
    doc |= {
        "pinned": ok,
        "single_core_tokens_per_s": rounded(one, 1),
        "speedup": rounded(speedup, 3),
        "single_core_others_cores": rounded(median([r.others_cores for r in single]), 2),
    }
    return doc, speedup, loss_diff(runs, single[0])


def precision_doc(one: dict[str, list[OneRun]]) -> Doc:
    rate = {p: median([r.tokens_per_s for r in runs]) for p, runs in one.items()}
    return {
        p: {
            "tokens_per_s": rounded(rate[p], 1),
            "val_loss_before": rounded(runs[-1].val_before, 4),
            "val_loss_after": rounded(runs[-1].val_after, 4),
            "train_loss_first_last": [
                rounded(runs[-1].losses[0], 4),
                rounded(runs[-1].losses[-1], 4),
            ],
            "others_cores": rounded(median([r.others_cores for r in runs]), 2),
        }
        for p, runs in one.items()
    } | {"bf16_over_fp32": rounded(rate["bf16"] / rate["fp32"], 3)}


def run(plan: Plan, root: Path, *, smoke: bool) -> Doc:
    cores = usable_cores()
    names = ["origin", "host1", "host2"]
    two_way = {c: ((0, c), (c, N_ATOMS)) for c in CUTS[: 1 if smoke else None]}
    cuts: dict[str, tuple[Doc, float, float]] = {}
    if smoke:  # one 2-daemon mesh for everything: unpinned first, then pinned
        layout: tuple[tuple[int, int], ...] = two_way[CUTS[0]]
        with hosted_mesh(
            root / "mesh",
            layout_of(layout),
            models_dir=plan.models,
            names=names[:2],
            wait=[(MODEL, 2)],
        ) as cluster:
            un = unpinned(plan, cluster)
            cuts[f"0-{CUTS[0]}+{CUTS[0]}-{N_ATOMS}"] = pinned(plan, cluster, cores)
    else:
        layout = LAYOUT_3
        with hosted_mesh(
            root / "mesh3",
            layout_of(layout),
            models_dir=plan.models,
            names=names,
            wait=[(MODEL, 3)],
        ) as cluster:
            un = unpinned(plan, cluster)
        for c, spans in two_way.items():
            with hosted_mesh(
                root / f"cut{c}",
                layout_of(spans),
                models_dir=plan.models,
                names=names[:2],
                wait=[(MODEL, 2)],
            ) as cluster:
                cuts[f"0-{c}+{c}-{N_ATOMS}"] = pinned(plan, cluster, cores)
        whole = (0, N_ATOMS)
        with hosted_mesh(
            root / "replicas",
            layout_of((whole, whole)),
            models_dir=plan.models,
            names=names[:2],
            wait=[(MODEL, 2)],
        ) as cluster:  # setup 5: data parallelism instead of a cut
            two = dataclasses.replace(plan, req=dataclasses.replace(plan.req, replicas=2))
            cuts[f"replicas 2 x 0-{N_ATOMS}"] = pinned(two, cluster, cores)
    ref = un.one["fp32"][0]
    one = median([r.tokens_per_s for r in un.one["fp32"]])
    rate = {s: median([r.tokens_per_s for r in runs]) for s, runs in un.mesh.items()}
    by_schedule = {
        s: describe(runs, names[: len(layout)], plan.req, ref) for s, runs in un.mesh.items()
    }
    best = max(cuts, key=lambda k: cuts[k][1])
    diffs = [loss_diff(runs, ref) for runs in un.mesh.values()]
    diffs += [diff for _, _, diff in cuts.values()]
    req = plan.req
    return {
        "bench": "train",
        "model": MODEL,
        "settings": {
            "seq_len": req.seq_len,
            "micro_batch": req.micro_batch,
            "accumulation": req.accumulation,
            "steps": req.steps,
            "timed_steps": req.steps - 2,
            "tokens_per_step": req.seq_len * req.micro_batch * req.accumulation,
            "lr": req.lr,
            "dropout": req.dropout,
            "precision": req.precision,
            "rounds": plan.rounds,
        },
        "baseline": "one process: SpanTrainer over all 11 atoms, 1 torch thread (bench.train --worker)",
        "mesh_layout": [f"{a}-{b}" for a, b in layout],
        "one_process_tokens_per_s": rounded(one, 1),
        "mesh_tokens_per_s": rounded(rate["1f1b"], 1),
        "ratio": rounded(rate["1f1b"] / one, 3),
        "ratio_gpipe": rounded(rate["gpipe"] / one, 3),
        "target_ratio": TARGET_RATIO,
        "max_loss_diff_vs_one_process": rounded(max(diffs), 6),
        "losses_match": max(diffs) < LOSS_TOLERANCE,
        "by_schedule": by_schedule,
        "pinned_cuts": {k: c[0] for k, c in cuts.items()},
        "best_cut": best,
        "speedup_pinned": rounded(cuts[best][1], 3),
        "pinned": cuts[best][0]["pinned"],
        "target_speedup": TARGET_SPEEDUP,
        "precision": precision_doc(un.one),
        "cpus": os.cpu_count(),
        "cores": cores,
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }


def bench_data(path: Path, req: TrainRequest) -> Path:
    """A slice of the shipped corpus: enough windows that no step repeats an example, and
    `eval_examples` validation paragraphs (tokenising the whole corpus per job would cost
    more than a smoke run)."""
    need_chars = 5 * req.steps * req.accumulation * req.micro_batch * req.seq_len
    keep, chars, val = [], 0, 0
    for para in paragraphs(read_text(corpus_path())):
        keep.append(para)
        val += is_validation(para)
        chars += 0 if is_validation(para) else len(para)
        if chars >= need_chars and val >= req.eval_examples:
            break
    path.write_text("\n\n".join(keep) + "\n")
    return path


def linked_models(models_dir: Path, folder: Path) -> Path:
    """A models folder for the daemons: links to the shared models, room for our outputs."""
    ModelRegistry(models_dir).folder(MODEL)  # materialised once, in the shared folder
    folder.mkdir(parents=True, exist_ok=True)
    for src in models_dir.iterdir():
        if (src / "manifest.json").is_file() and not (folder / src.name).exists():
            (folder / src.name).symlink_to(src.resolve(), target_is_directory=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=8, help="micro-batches per step (m)")
    p.add_argument(
        "--steps",
        type=int,
        default=6,
        help="optimiser steps per run (>= 3; the first and last are not timed)",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds (each: baselines + mesh runs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--settings", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--precisions", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models_dir = args.models_dir or default_models_dir()
    quiet_logs()
    if args.worker:
        return worker(models_dir, args.settings, args.data, args.precisions.split(","))
    sizes = (
        (16, 2, 2, 3, 1)
        if args.smoke
        else (args.seq_len, args.micro_batch, args.accumulation, args.steps, args.rounds)
    )
    seq_len, micro_batch, accumulation, steps, rounds = sizes
    if steps < 3 or min(sizes) < 1:
        p.error(f"--steps must be >= 3 and every size >= 1, got {sizes}")
    req = TrainRequest(
        task="lm",
        model=MODEL,
        output="bench",
        seq_len=seq_len,
        micro_batch=micro_batch,
        accumulation=accumulation,
        steps=steps,
        lr=1e-3,
        warmup_steps=1,
        eval_interval=0,
        eval_examples=8,
        checkpoint_interval=0,
        seed=0,
    )
    with work_dir(args.workdir) as root:
        req = dataclasses.replace(req, data=str(bench_data(root / "corpus.txt", req)))
        models = linked_models(models_dir, root / "models")
        doc = run(Plan(models_dir, models, req, rounds), root, smoke=args.smoke)
    doc["smoke"] = bool(args.smoke)
    doc["command"] = "python -m bench.train" + (" --smoke" if args.smoke else "")
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
