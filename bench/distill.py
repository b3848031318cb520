"""Distillation: a 3-base-layer Nexus student trained on the teacher's soft targets against
the same student trained on hard labels only, same steps, same data order.

Prints one JSON object: validation perplexity (hard labels, the corpus's held-out
paragraphs) of the teacher (Nexus 1.1 with its trained weights; `nexus-1.1-random` when
they are absent), of the student before training, after `--steps` steps of hard-label
training (alpha 0) and after as many of distillation (`--alpha`, `--temperature`); the
student's forward time against the teacher's; and the mean KL(teacher || student) per
target at T = 1 on validation, before and after. One process runs the student's whole span
in one `SpanTrainer` with the same loss function (`atoms.distill.TeacherLoss`) the
`nexusd train distill` job gives the span holding the student's head, so the figures are
the mesh job's (the e2e test shows the distributed run equals this one).

    python -m bench.distill [--steps 60] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from atoms.atom import ForwardContext
from atoms.corpus import corpus_path, read_text
from atoms.datasets import Dataset, Examples, Order, lm_dataset, special_ids
from atoms.distill import DistillConfig, TeacherLoss, student_of
from atoms.errors import WeightsError
from atoms.model import Model
from atoms.span import Span
from atoms.training import IGNORE, OptimConfig, Schedule, SpanTrainer, fp32_copy, micro_batch_seed
from nexusd.model_registry import BUILTINS

from .common import emit_json, quiet_logs

KEEP_BASE = (0, 2, 4)  # the student's base layers: every other one of MiniLM's six


def _teacher() -> Model:
    try:
        return BUILTINS["nexus-1.1"]()
    except WeightsError:  # the trained weights are absent (a checkout without them)
        return BUILTINS["nexus-1.1-random"]()


def _ctx(ids: torch.Tensor, seed: int, dropout: float) -> ForwardContext:
    ctx = ForwardContext.for_tokens(ids.shape[0], ids.shape[1], causal=True)
    ctx.dropout, ctx.seed = dropout, seed
    return ctx


def evaluate(model: Model, teacher: Model, val: Examples, batch: int) -> tuple[float, float]:
    """(perplexity on hard labels, mean KL(teacher || model) per target at T = 1)."""
    span, ref = Span(model.atoms), Span(teacher.atoms)
    nll = kl = 0.0
    count = 0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            ex = val.take(range(i, min(i + batch, len(val))))
            out = span(ex.inputs, _ctx(ex.inputs, 0, 0.0), check=False).float()
            tout = ref(ex.inputs, _ctx(ex.inputs, 0, 0.0), check=False).float()
            valid = (ex.targets != IGNORE).reshape(-1)
            s = out.reshape(-1, out.shape[-1])[valid]
            t = tout.reshape(-1, out.shape[-1])[valid]
            nll += float(F.cross_entropy(s, ex.targets.reshape(-1)[valid], reduction="sum"))
            kl += float(
                F.kl_div(
                    F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"
                )
            )
            count += int(valid.sum())
    return math.exp(nll / count), kl / count


def train(
    student: Model, teacher: Model, data: Dataset, args: argparse.Namespace, alpha: float
) -> tuple[Model, float]:
    """Train a copy of `student`'s trainable atoms for `args.steps` steps; (model, s/step)."""
    tok = teacher.tokenizer
    assert tok is not None
    bos, eos = special_ids(tok)
    cfg = DistillConfig(temperature=args.temperature, alpha=alpha)
    loss_fn = TeacherLoss(Span(teacher.atoms), cfg, bos=bos, pad=eos) if alpha > 0 else None
    atoms = fp32_copy(student.atoms)
    trainer = SpanTrainer(
        Span(atoms), OptimConfig(dropout=0.1), needs_input_grad=False, loss_fn=loss_fn
    )
    sched = Schedule(lr=args.lr, warmup_steps=max(1, args.steps // 10), total_steps=args.steps)
    order = Order(len(data.train), args.micro_batch, args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        count = 0
        for k in range(args.accumulation):
            ex = data.train.take(order.rows(step * args.accumulation + k))
            seed = micro_batch_seed(args.seed, step, k)
            count += trainer.loss(k, ex.inputs, ex.targets, _ctx(ex.inputs, seed, 0.1))[0].count
        norm = math.sqrt(trainer.grad_sq_norm()) / count
        trainer.apply(step, lr=sched.lr_at(step), scale=min(1.0, 1.0 / max(norm, 1e-12)) / count)
    per_step = (time.perf_counter() - t0) / args.steps
    trainer.span.train(False)
    trained = Model(
        model_id=student.model_id,
        family=student.family,
        config=student.config,
        atoms=list(trainer.span.atom_list()),
        tokenizer=student.tokenizer,
    )
    return trained, per_step


def forward_ms(model: Model, ids: torch.Tensor) -> float:
    span = Span(model.atoms)
    best = math.inf
    with torch.no_grad():
        for _ in range(7):
            t0 = time.perf_counter()
            span(ids, _ctx(ids, 0, 0.0), check=False)
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=DistillConfig().temperature)
    p.add_argument("--alpha", type=float, default=DistillConfig().alpha)
    p.add_argument("--eval-examples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="3 steps, 8 validation paragraphs")
    p.add_argument("--workdir", default=None, help="unused (the benches' common flag)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_examples, args.micro_batch, args.seq_len = 3, 8, 2, 32
    quiet_logs()
    torch.manual_seed(args.seed)
    teacher = _teacher()
    teacher.span(0, len(teacher)).train(False)
    tok = teacher.tokenizer
    assert tok is not None
    data = lm_dataset(read_text(corpus_path()), tok, length=args.seq_len, digest="")
    val = data.validation.take(range(min(args.eval_examples, len(data.validation))))
    student = student_of(teacher, "nexus-1.1-student", base_layers=KEEP_BASE)
    doc: dict[str, object] = {
        "teacher": teacher.model_id,
        "student_base_layers": list(KEEP_BASE),
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "validation_targets": val.target_count(),
    }
    doc["teacher_ppl"] = round(evaluate(teacher, teacher, val, 16)[0], 3)
    ppl, kl = evaluate(student, teacher, val, 16)
    doc["student_init"] = {"ppl": round(ppl, 3), "kl": round(kl, 4)}
    for name, alpha in (("hard", 0.0), ("distill", args.alpha)):
        trained, per_step = train(student, teacher, data, args, alpha)
        ppl, kl = evaluate(trained, teacher, val, 16)
        doc[name] = {"ppl": round(ppl, 3), "kl": round(kl, 4), "s_per_step": round(per_step, 3)}
    ids = data.validation.inputs[:8]
    t_ms, s_ms = forward_ms(teacher, ids), forward_ms(student, ids)
    doc["forward_ms"] = {"teacher": round(t_ms, 2), "student": round(s_ms, 2)}
    doc["student_speedup"] = round(t_ms / s_ms, 3)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
