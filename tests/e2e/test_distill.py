"""`train distill` across real daemons: a student hosted by the mesh, its head and the
teacher on the origin, ends equal to the same distillation in one process, and records its
teacher and the teacher's perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.datasets import Order, lm_dataset, special_ids
from atoms.distill import DistillConfig, TeacherLoss, student_of
from atoms.model import Model
from atoms.span import Span
from atoms.training import OptimConfig, Schedule, SpanTrainer, fp32_copy
from nexusd.api.records import TrainProgressEvent, TrainReply, TrainRequest
from nexusd.errors import ApiError
from nexusd.harness.cluster import local_cluster
from nexusd.jobs.training import micro_batches
from nexusd.model_registry import ModelRegistry

from .test_training import FAST, TEXT, assert_close, trained

pytestmark = pytest.mark.e2e

STUDENT = "nexus-1.1-s3"


def reference(
    teacher: Model, student: Model, req: TrainRequest, data: Path
) -> dict[str, torch.Tensor]:
    """The same distillation in one process: one SpanTrainer over the whole student."""
    tok = student.tokenizer
    assert tok is not None
    bos, eos = special_ids(tok)
    ds = lm_dataset(data.read_text(), tok, length=req.seq_len, digest="")
    loss = TeacherLoss(
        Span(teacher.atoms),
        DistillConfig(temperature=req.temperature, alpha=req.alpha),
        bos=bos,
        pad=eos,
    )
    optim = OptimConfig(weight_decay=req.weight_decay, dropout=req.dropout)
    trainer = SpanTrainer(
        Span(fp32_copy(student.atoms)), optim, needs_input_grad=False, loss_fn=loss
    )
    sched = Schedule(
        lr=req.lr, warmup_steps=req.warmup_steps, total_steps=req.steps, decay=req.decay
    )
    order = Order(len(ds.train), req.micro_batch, req.seed)
    for step in range(req.steps):
        count = 0
        for k, mb in enumerate(micro_batches(ds.train, order, step, req.accumulation, req.seed)):
            ctx = ForwardContext.for_tokens(mb.x.shape[0], mb.x.shape[1], causal=True)
            ctx.dropout, ctx.seed = req.dropout, mb.seed
            count += trainer.loss(k, mb.x, mb.targets, ctx)[0].count
        norm = math.sqrt(trainer.grad_sq_norm()) / count
        trainer.apply(step, lr=sched.lr_at(step), scale=min(1.0, req.clip / norm) / count)
    return {n: p.detach() for n, p in trainer.span.named_parameters() if p.requires_grad}


def test_distilled_student_equals_one_process(
    tmp_path: Path, models_dir: Path, registry: ModelRegistry
) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    teacher = registry.load_model("nexus-1.1")
    if STUDENT not in registry.available():
        registry.save(student_of(teacher, STUDENT, base_layers=[0, 2, 4]))
    student = registry.load_model(STUDENT)
    req = TrainRequest(
        task="distill",
        model=STUDENT,
        teacher="nexus-1.1",
        output="nexus-1.1-s3-distilled",
        data=str(data),
        steps=2,
        micro_batch=2,
        accumulation=2,
        seq_len=16,
        lr=1e-3,
        warmup_steps=1,
        clip=0.5,
        eval_interval=0,
        eval_examples=4,
        checkpoint_interval=1,
        temperature=2.0,
        alpha=0.7,
        seed=3,
    )
    with local_cluster(tmp_path, 2, models_dir=models_dir, env=FAST) as c:
        # 8 atoms: the embedding, 3 base layers and the positions on 1, the two Nexus
        # blocks on 0 (the origin); the head runs in the job's own host, with the teacher
        c.host(1, f"{STUDENT}:0-5")
        c.host(0, f"{STUDENT}:5-8")
        c.wait_hosts(0, 2, STUDENT)
        with pytest.raises(ApiError, match="teacher: expected a model other than"):
            c.call(0, TrainRequest(**{**_fields(req), "teacher": STUDENT}), expect=TrainReply)
        events: list[object] = []
        reply = c.call(0, req, expect=TrainReply, timeout_s=600, on_event=events.append)
    assert [e.step for e in events if isinstance(e, TrainProgressEvent)] == [1, 2]
    assert reply.task == "distill" and reply.model == "nexus-1.1-s3-distilled"
    assert {h.start for h in reply.route} >= {0, 5}
    assert reply.val_perplexity > 0 and reply.teacher_val_perplexity > 0
    assert_close(reference(teacher, student, req, data), trained(registry, reply.model))
    saved = registry.load_model(reply.model)
    assert saved.config["teacher"] == "nexus-1.1"
    assert json.loads(str(saved.config["distill"])) == {"temperature": 2.0, "alpha": 0.7}


def _fields(req: TrainRequest) -> dict[str, object]:
    return {f: getattr(req, f) for f in req.__dataclass_fields__}
