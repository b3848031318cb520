"""`train distill` of an embedding model across real daemons: a 3-layer MiniLM student
hosted by the mesh, its pooling atom and the 6-layer teacher on the origin, ends equal to
the same distillation in one process and reports its validation cosine to the teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.datasets import Order
from atoms.distill_embed import (
    EmbedDistillConfig,
    EmbedTeacherLoss,
    PooledStudent,
    cosines,
    embed_dataset,
    encoder_student_of,
)
from atoms.model import Model
from atoms.span import Span
from atoms.training import OptimConfig, Schedule, fp32_copy
from nexusd.api.records import TrainProgressEvent, TrainReply, TrainRequest
from nexusd.errors import ApiError
from nexusd.harness.cluster import local_cluster
from nexusd.jobs.training import micro_batches
from nexusd.model_registry import ModelRegistry

from .test_training import FAST, TEXT, VALIDATION, assert_close, trained

pytestmark = pytest.mark.e2e

STUDENT = "minilm-s3"


def reference(
    teacher: Model, student: Model, req: TrainRequest, data: Path, validation: Path
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same distillation in one process, the student split as the job splits it (body,
    and the pooling span that computes the loss: `PooledStudent`); (trained parameters,
    validation cosines to the teacher)."""
    tok = student.tokenizer
    assert tok is not None
    ds = embed_dataset(
        data.read_text(), tok, length=req.seq_len, digest="", validation_text=validation.read_text()
    )
    loss = EmbedTeacherLoss(Span(teacher.atoms), EmbedDistillConfig(w_token=req.token_weight))
    optim = OptimConfig(weight_decay=req.weight_decay, dropout=req.dropout)
    trainer = PooledStudent(fp32_copy(student.atoms), loss, optim)
    sched = Schedule(
        lr=req.lr, warmup_steps=req.warmup_steps, total_steps=req.steps, decay=req.decay
    )
    order = Order(len(ds.train), req.micro_batch, req.seed)
    for step in range(req.steps):
        count = 0
        for k, mb in enumerate(micro_batches(ds.train, order, step, req.accumulation, req.seed)):
            ctx = ForwardContext.for_tokens(
                mb.x.shape[0], mb.x.shape[1], causal=False, pad_mask=mb.mask
            )
            ctx.dropout, ctx.seed = req.dropout, mb.seed
            count += trainer.loss(k, mb.x, mb.targets, ctx).count
        norm = math.sqrt(trainer.grad_sq_norm()) / count
        trainer.apply(step, lr=sched.lr_at(step), scale=min(1.0, req.clip / norm) / count)
    params = {n: p.detach() for n, p in trainer.body.span.named_parameters() if p.requires_grad}
    done = student.with_atoms(fp32_copy(trainer.atom_list()))
    return params, cosines(done, teacher, ds.validation, req.micro_batch)


def test_distilled_embedding_student_equals_one_process(
    tmp_path: Path, models_dir: Path, registry: ModelRegistry
) -> None:
    data, validation = tmp_path / "text.txt", tmp_path / "validation.txt"
    data.write_text(TEXT)
    validation.write_text(VALIDATION + "\n\nThe village had a fine walk to the sea.")
    teacher = registry.load_model("minilm")
    if STUDENT not in registry.available():
        registry.save(encoder_student_of(teacher, STUDENT, layers=[0, 2, 4]))
    student = registry.load_model(STUDENT)
    req = TrainRequest(
        task="distill",
        model=STUDENT,
        teacher="minilm",
        output="minilm-s3-distilled",
        data=str(data),
        validation=str(validation),
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
        seed=3,
    )
    # a host opening its session copies the trainable embedding table (11.7 M parameters)
    # to fp32 master weights: on a loaded machine that can take past FAST's 5 s read timeout
    env = {**FAST, "NEXUSD_MESH__READ_TIMEOUT_S": "30"}
    with local_cluster(tmp_path, 2, models_dir=models_dir, env=env) as c:
        # 5 atoms: the embedding and layer 0 on 1, layers 2 and 4 on 0 (the origin); the
        # pooling atom runs in the job's own host, with the teacher
        c.host(1, f"{STUDENT}:0-2")
        c.host(0, f"{STUDENT}:2-4")
        c.wait_hosts(0, 2, STUDENT)
        mismatched = TrainRequest(**{**_fields(req), "teacher": "nexus-1.1"})
        with pytest.raises(ApiError, match="both pool sentence vectors"):
            c.call(0, mismatched, expect=TrainReply)
        events: list[object] = []
        reply = c.call(0, req, expect=TrainReply, timeout_s=600, on_event=events.append)
    assert [e.step for e in events if isinstance(e, TrainProgressEvent)] == [1, 2]
    assert reply.task == "distill" and reply.model == "minilm-s3-distilled"
    assert {h.start for h in reply.route} >= {0, 2, 4}
    ref, ref_cos = reference(teacher, student, req, data, validation)
    assert_close(ref, trained(registry, reply.model))
    assert math.isclose(reply.val_cosine_mean, float(ref_cos.mean()), abs_tol=1e-5)
    assert math.isclose(reply.val_cosine_min, float(ref_cos.min()), abs_tol=1e-5)
    assert math.isclose(reply.val_loss, 1.0 - float(ref_cos.mean()), abs_tol=1e-5)
    saved = registry.load_model(reply.model)
    assert saved.config["teacher"] == "minilm" and saved.config["parent"] == STUDENT
    settings = json.loads(str(saved.config["distill"]))
    assert settings["loss"] == "embedding" and settings["w_token"] == req.token_weight == 1.0


def _fields(req: TrainRequest) -> dict[str, object]:
    return {f: getattr(req, f) for f in req.__dataclass_fields__}
