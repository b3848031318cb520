"""`nexusd train lm|classify|distill`: a training job over the mesh, with a live progress bar.

Rule: every knob is a flag that sets a `[train]` config key (`dest="train.<key>"`), so the
defaults live in one place (the config) and a journaled job records the values it ran with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ..api.records import TrainProgressEvent, TrainReply, TrainRequest
from ..config import Config
from ..errors import ApiError
from ..paths import NodePaths
from .base import CommandSpec, call_daemon
from .output import emit, route_table, table, wire_summary

DEFAULT_MODELS = {"lm": "nexus-1.1", "classify": "minilm", "distill": ""}


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "task",
        choices=("lm", "classify", "distill"),
        help="lm: causal-LM fine-tuning of a decoder (its trainable atoms; a frozen "
        "base stays frozen); classify: a classifier head over an encoder's "
        "pooled features; distill: train a student decoder (--model, hosted by the "
        "mesh, e.g. made by `nexusd make-student`) on a teacher's soft targets "
        "(--teacher, run on this node) mixed with the hard labels, or an embedding "
        "student (MiniLM) on the cosine to the teacher's sentence vectors",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="ID",
        help="id of the model the run produces (a new version of --model)",
    )
    p.add_argument(
        "--model",
        default="",
        help="model to start from (default: nexus-1.1 for lm, minilm for classify; "
        "distill: the student, required)",
    )
    p.add_argument(
        "--data",
        default="",
        metavar="FILE",
        help="lm: UTF-8 text (.txt or .xz; default: the shipped English corpus); "
        "classify: labelled .jsonl or .csv (text, label[, split]) (.xz ok)",
    )
    p.add_argument(
        "--validation",
        default="",
        metavar="FILE",
        help="held-out data (default: a deterministic 5 %% split of --data, or the "
        "rows whose split is 'validation')",
    )
    g = p.add_argument_group("training (defaults: the [train] config section)")
    for flag, kind, what in (
        ("steps", int, "optimiser steps"),
        ("micro-batch", int, "sequences per micro-batch"),
        ("accumulation", int, "micro-batches per optimiser step (gradient accumulation)"),
        ("seq-len", int, "tokens per training sequence (lm)"),
        ("lr", float, "peak learning rate"),
        ("warmup-steps", int, "linear warmup steps"),
        ("min-lr-ratio", float, "final learning rate as a share of the peak"),
        ("weight-decay", float, "AdamW weight decay (not on norms, biases, per-head scales)"),
        ("dropout", float, "dropout rate in trainable atoms"),
        ("clip", float, "global gradient-norm clip (0: off)"),
        ("eval-interval", int, "validate every N steps (0: at the end only)"),
        ("eval-examples", int, "validation examples per evaluation"),
        ("checkpoint-interval", int, "checkpoint every N steps (0: at the end only)"),
        ("seed", int, "seeds the data order and dropout: same seed, same run"),
        ("replicas", int, "data-parallel copies of the trainable spans (distinct hosts)"),
        ("average-every", int, "1: sum replicas' gradients each step; H: DiLoCo rounds"),
        ("outer-lr", float, "DiLoCo outer learning rate"),
        ("outer-momentum", float, "DiLoCo outer Nesterov momentum"),
    ):
        g.add_argument(
            f"--{flag}",
            type=kind,
            dest=f"train.{flag.replace('-', '_')}",
            metavar="N" if kind is int else "X",
            help=what,
        )
    g.add_argument(
        "--teacher",
        dest="train.teacher",
        metavar="MODEL",
        help="distill: the teacher model; it runs forward only, on this node",
    )
    g.add_argument(
        "--temperature",
        type=float,
        dest="train.distill_temperature",
        metavar="T",
        help="distill: softening temperature of teacher and student distributions "
        "(the KL term is scaled by T^2)",
    )
    g.add_argument(
        "--alpha",
        type=float,
        dest="train.distill_alpha",
        metavar="X",
        help="distill: weight of the KL term in [0, 1]; 1 - alpha weighs the hard-label "
        "cross-entropy (0: hard labels only)",
    )
    g.add_argument(
        "--token-weight",
        type=float,
        dest="train.distill_token_weight",
        metavar="W",
        help="distill, embedding models: weight of the token term (the student's last "
        "hidden states against the teacher's, relative squared error) beside the cosine "
        "of the sentence vectors; 0: vectors only",
    )
    g.add_argument(
        "--decay",
        choices=("cosine", "linear", "constant"),
        dest="train.decay",
        help="learning-rate decay after warmup",
    )
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        dest="train.precision",
        help="bf16: autocast compute over fp32 master weights",
    )
    g.add_argument(
        "--schedule",
        choices=("1f1b", "gpipe"),
        dest="train.schedule",
        help="pipeline schedule of micro-batches across hosts",
    )
    g.add_argument(
        "--codec",
        choices=("raw", "fp16", "bf16", "int8", "auto"),
        dest="train.codec",
        help="wire codec of the activations and gradients between stages on other hosts "
        "(default raw: exact, equal to one process; a lossy codec changes the training "
        "a little; auto: per hop from the link's RTT and bandwidth and [exec] "
        "slow_link_codec, the error budget)",
    )
    p.add_argument(
        "--job-id",
        default="",
        help="idempotency key: the same id resumes or returns the stored result",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print the route, per-hop timings and idle shares",
    )


def _request(args: argparse.Namespace, cfg: Config) -> TrainRequest:
    t = cfg.train
    model = args.model or DEFAULT_MODELS[args.task]
    if not model:
        raise ApiError("bad_request", "--model: train distill needs the student model's id")
    data = str(Path(args.data).resolve()) if args.data else ""
    validation = str(Path(args.validation).resolve()) if args.validation else ""
    for name, path in (("--data", data), ("--validation", validation)):
        if path and not Path(path).is_file():
            raise ApiError("bad_request", f"{name}: no such file {path}")
    return TrainRequest(
        task=args.task,
        model=model,
        output=args.output,
        data=data,
        validation=validation,
        steps=t.steps,
        micro_batch=t.micro_batch,
        accumulation=t.accumulation,
        seq_len=t.seq_len,
        lr=t.lr,
        warmup_steps=min(t.warmup_steps, t.steps),
        decay=t.decay,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        dropout=t.dropout,
        clip=t.clip,
        precision=t.precision,
        schedule=t.schedule,
        eval_interval=t.eval_interval,
        eval_examples=t.eval_examples,
        checkpoint_interval=t.checkpoint_interval,
        seed=t.seed,
        replicas=t.replicas,
        average_every=t.average_every,
        outer_lr=t.outer_lr,
        outer_momentum=t.outer_momentum,
        teacher=t.teacher if args.task == "distill" else "",
        temperature=t.distill_temperature,
        alpha=t.distill_alpha,
        token_weight=t.distill_token_weight,
        codec=t.codec,
        job_id=args.job_id,
    )


class _Bar:
    """The live progress bar (stderr): step, loss, learning rate, tokens/s, ETA."""

    def __init__(self, steps: int, enabled: bool) -> None:
        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("{task.fields[val]}"),
            TimeRemainingColumn(),
            console=self._console,
            disable=not enabled,
        )
        self._task: TaskID = self._progress.add_task(
            "train", total=steps, loss="-", lr="-", rate="-", val=""
        )

    def __enter__(self) -> _Bar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    async def on_event(self, event: object) -> None:
        if not isinstance(event, TrainProgressEvent):
            return
        if event.resumed_from >= 0:
            self._progress.console.print(
                f"resumed from the checkpoint of step {event.resumed_from}"
            )
        fields: dict[str, str] = {
            "loss": f"{event.loss:.3f}",
            "lr": f"{event.lr:.2e}",
            "rate": f"{event.tokens_per_s:.0f}",
        }
        if event.val_loss >= 0:
            fields["val"] = f"val {event.val_loss:.3f}" + (
                f" acc {event.val_accuracy:.1%}" if event.val_accuracy >= 0 else ""
            )
        self._progress.update(self._task, completed=event.step, **fields)  # type: ignore[arg-type]


def _train(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    req = _request(args, cfg)
    with _Bar(req.steps, enabled=not args.json and sys.stderr.isatty()) as bar:
        reply = call_daemon(paths, req, expect=TrainReply, timeout_s=None, on_event=bar.on_event)
    emit(args, reply, lambda: _human(reply, args.verbose))
    return 0


def _human(r: TrainReply, verbose: bool) -> str:
    rows = [
        ["model", f"{r.model} (from {r.parent})"],
        ["steps", str(r.steps)],
        ["train loss", f"{r.train_loss:.4f}"],
        ["validation loss", f"{r.val_loss:.4f}"],
    ]
    embeddings = r.task == "distill" and (r.val_cosine_mean != 0.0 or r.val_cosine_min != 0.0)
    if r.task == "lm" or (r.task == "distill" and not embeddings):
        rows.append(["validation perplexity", f"{r.val_perplexity:.2f}"])
    if r.task == "distill" and not embeddings:
        rows.append(["teacher's validation perplexity", f"{r.teacher_val_perplexity:.2f}"])
    if embeddings:
        rows.append(
            [
                "validation cosine to the teacher",
                f"mean {r.val_cosine_mean:.4f}, min {r.val_cosine_min:.4f}",
            ]
        )
    accuracy = "validation share at cosine >= 0.95" if embeddings else "validation accuracy"
    rows += [
        [accuracy, f"{r.val_accuracy:.2%}"],
        ["time", f"{r.elapsed_s:.1f} s ({r.tokens_per_s:.0f} targets/s, {r.tokens} in all)"],
        ["checkpoints", r.checkpoint],
    ]
    if r.resumed_from >= 0:
        rows.append(["resumed from step", str(r.resumed_from)])
    if r.failovers:
        rows.append(["failovers", "; ".join(r.failovers)])
    if wire := wire_summary(r.route):  # a lossy --codec: per-hop codec and bytes saved
        rows.append(["wire", wire.removeprefix("wire: ")])
    out = table(["", ""], rows)
    if verbose:
        out += (
            "\n"
            + route_table(r.route)
            + "\n"
            + table(["host", "idle share"], [[h, f"{v:.1%}"] for h, v in r.bubble])
        )
    return out


TRAIN_COMMANDS = (
    CommandSpec(
        "train",
        "train a model over the mesh: lm (fine-tune a decoder), classify "
        "(a classifier head) or distill (a student on a teacher's soft targets); "
        "a live progress bar, checkpoints that resume",
        _flags,
        _train,
    ),
)
