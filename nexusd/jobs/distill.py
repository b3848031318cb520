"""`train distill`: a student model trained over the mesh on a teacher's soft targets.

Rule 1: the student is an ordinary decoder the mesh hosts (e.g. `nexusd models student`
cuts one from Nexus 1.1); its atoms [0, n-1) run on their hosts exactly as in `train lm`
(forwards, backwards, optimiser steps, checkpoints, failover), and its head [n-1, n) runs
here, in a `TrainHost` of the job's own whose loss is `atoms.distill.TeacherLoss`.
Rule 2: the teacher runs here too, forward only: for each micro-batch the head's loss
rebuilds the input ids from the targets and runs the teacher on them, so teacher logits
(B x T x vocab floats) never cross the network and no exec message changes.
Rule 3: validation is the hard-label perplexity of the student, and the teacher's on the
same examples is reported beside it; the student saved under `output` records the teacher,
its digest, temperature and alpha in its lineage, as `train lm` records its parent.
Rule 4: a teacher or student that ends in the pooling atom (MiniLM) is an embedding
distillation (`distill_embeddings`, `atoms.distill_embed`): the data is one example per
paragraph (at most `seq_len` tokens), the micro-batch's targets carry the input ids the
teacher needs, the loss is the cosine to the teacher's sentence vectors, every parameter of
the student trains, and the reply reports the validation cosine (mean and min).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import structlog
import torch
import trio

from atoms.atom import ForwardContext
from atoms.corpus import corpus_path, read_text
from atoms.datasets import Dataset, Examples, file_digest, special_ids
from atoms.distill import DistillConfig, TeacherLoss
from atoms.distill_embed import (
    COSINE_ONLY,
    EmbedDistillConfig,
    EmbedTeacherLoss,
    cosines,
    embed_dataset,
    ends_in_pooling,
)
from atoms.errors import AtomError
from atoms.model import Model
from atoms.span import Span
from atoms.training import IGNORE, LossFn, apply_trained, renamed

from ..api.records import TrainReply, TrainRequest
from ..errors import ApiError
from ..exec.hosting import ExecRefused
from ..exec.session import HopPlan
from ..exec.train_host import TrainHost, local_link
from ..exec.train_origin import TrainHop
from .training import (
    Emit,
    Mesh,
    Plan,
    Route,
    TrainRun,
    first_trainable,
    lineage,
    load_data,
    optim_of,
    reply_metrics,
    reply_of,
    schedule_of,
    validate,
)

log = structlog.get_logger(__name__)


def validate_distill(req: TrainRequest) -> DistillConfig:
    """The request's distillation settings (`bad_request` names a bad field)."""
    if not req.teacher:
        raise ApiError("bad_request", "teacher: train distill needs a teacher model id")
    if req.teacher == req.model:
        raise ApiError("bad_request", "teacher: expected a model other than the student")
    try:
        return DistillConfig(temperature=req.temperature, alpha=req.alpha)
    except ValueError as exc:
        raise ApiError("bad_request", str(exc)) from None


def _same_tokenizer(teacher: Model, student: Model, why: str) -> None:
    t_tok, s_tok = teacher.tokenizer, student.tokenizer
    if t_tok is None or s_tok is None or t_tok.to_json() != s_tok.to_json():
        raise ApiError(
            "bad_request",
            f"teacher {teacher.model_id} and student {student.model_id} must share one "
            f"tokenizer ({why})",
        )


def _check_pair(teacher: Model, student: Model) -> None:
    for m in (teacher, student):
        if m.family not in ("nexus", "llama") or m.atoms[-1].spec.kind.value != "lm_head":
            raise ApiError("bad_request", f"model {m.model_id}: train distill needs decoders")
    _same_tokenizer(teacher, student, "soft targets are over the same vocabulary")


def teacher_perplexity(teacher: Model, data: Examples, batch: int, limit: int) -> float:
    """The teacher's hard-label perplexity on the first `limit` validation examples."""
    span = Span(teacher.atoms)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, min(limit, len(data)), batch):
            ex = data.take(range(i, min(i + batch, limit, len(data))))
            ctx = ForwardContext.for_tokens(ex.inputs.shape[0], ex.inputs.shape[1], causal=True)
            out = span(ex.inputs, ctx, check=False).float()
            flat = ex.targets.reshape(-1)
            nll += float(
                torch.nn.functional.cross_entropy(
                    out.reshape(flat.shape[0], -1), flat, ignore_index=IGNORE, reduction="sum"
                )
            )
            count += int((flat != IGNORE).sum())
    return math.exp(min(nll / max(count, 1), 50.0))


def _route(mesh: Mesh, req: TrainRequest, n: int, head_host: TrainHost) -> Route:
    """The student's atoms [0, n-1) over the mesh, its head [n-1, n) on this node."""
    plan_body = mesh.planner(
        req.model,
        req.micro_batch * req.seq_len * mesh.registry.config_int(req.model, "hidden_size", 384) * 4,
    )
    head_plan = HopPlan(mesh.node_id, n - 1, n)

    async def connect(p: HopPlan, model_id: str) -> TrainHop:
        if p == head_plan:
            return TrainHop(p, model_id, local_link(head_host, mesh.node_id), remote=False)
        return await mesh.connect(p, model_id)

    return Route(
        plan=lambda _m, ex: [*plan_body(0, n - 1, ex), head_plan],
        connect=connect,
        report=mesh.report,
        name_of=mesh.name_of,
        wait_s=mesh.route_wait_s,
        on_route=mesh.on_route,
    )


async def distill(req: TrainRequest, job_id: str, emit: Emit, mesh: Mesh) -> TrainReply:
    """Run a distillation job (see the module rules) and register the student it trains."""
    validate(req)
    cfg = validate_distill(req)
    if req.output in mesh.registry.available():
        raise ApiError(
            "conflict", f"output: a model {req.output!r} exists already; choose another id"
        )
    student = await trio.to_thread.run_sync(mesh.registry.load_model, req.model)
    teacher = await trio.to_thread.run_sync(mesh.registry.load_model, req.teacher)
    if ends_in_pooling(teacher) or ends_in_pooling(student):
        return await distill_embeddings(req, job_id, emit, mesh, student, teacher)
    _check_pair(teacher, student)
    as_lm = dataclasses.replace(req, task="lm")
    data = await trio.to_thread.run_sync(load_data, as_lm, student)
    tok = student.tokenizer
    assert tok is not None  # _check_pair
    bos, eos = special_ids(tok)
    loss = TeacherLoss(Span(teacher.atoms), cfg, bos=bos, pad=eos)
    run, state, elapsed = await _run_student(req, job_id, emit, mesh, student, data, loss)
    reply = reply_of(run, req.output, elapsed)
    val_loss = run.val[0]
    teacher_ppl = await trio.to_thread.run_sync(
        teacher_perplexity, teacher, data.validation, req.micro_batch, req.eval_examples
    )
    reply = dataclasses.replace(
        reply,
        val_perplexity=round(math.exp(min(val_loss, 50)), 4) if not math.isnan(val_loss) else 0.0,
        teacher_val_perplexity=round(teacher_ppl, 4),
    )
    figures = {
        "val_perplexity": reply.val_perplexity,
        "teacher_val_perplexity": reply.teacher_val_perplexity,
        "val_accuracy": reply.val_accuracy,
    }
    settings: dict[str, str | float] = {"temperature": cfg.temperature, "alpha": cfg.alpha}
    trained = apply_trained(student, state)
    await _save_student(req, mesh, trained, data.digest, reply, figures, settings)
    return reply


# ---- embedding models (`atoms.distill_embed`) ---------------------------------------------


def _check_embed_pair(teacher: Model, student: Model) -> None:
    """Both end in the pooling atom, share a tokenizer and a vector width."""
    for m in (teacher, student):
        if not ends_in_pooling(m):
            other = student if m is teacher else teacher
            raise ApiError(
                "bad_request",
                f"model {m.model_id} ends in {m.atoms[-1].spec.kind.value}, but "
                f"{other.model_id} is an embedding model (ends in pooling): embedding "
                "distillation needs a teacher and a student that both pool sentence vectors",
            )
    _same_tokenizer(teacher, student, "the teacher reads the student's input ids")
    widths = [m.atoms[-1].spec.dim("hidden") for m in (teacher, student)]
    if widths[0] != widths[1]:
        raise ApiError(
            "bad_request",
            f"teacher {teacher.model_id} pools {widths[0]}-wide vectors, student "
            f"{student.model_id} {widths[1]}-wide: the loss compares them",
        )


def load_embed_data(req: TrainRequest, student: Model) -> Dataset:
    """Paragraphs of `--data` (default: the shipped corpus) as embedding examples of at
    most `seq_len` tokens (blocking: run it in a thread)."""
    tok = student.tokenizer
    assert tok is not None  # _check_embed_pair
    try:
        path = Path(req.data) if req.data else corpus_path()
        val = read_text(Path(req.validation)) if req.validation else None
        return embed_dataset(
            read_text(path),
            tok,
            length=req.seq_len,
            digest=file_digest(path),
            validation_text=val,
            max_validation=req.eval_examples,
        )
    except AtomError as exc:
        raise ApiError("bad_request", f"data: {exc}") from None


async def distill_embeddings(
    req: TrainRequest, job_id: str, emit: Emit, mesh: Mesh, student: Model, teacher: Model
) -> TrainReply:
    """`train distill` of an embedding model: the student's layers over the mesh, its
    pooling atom and the teacher here; loss `atoms.distill_embed`: the cosine to the
    teacher's vectors and, weighted by `token_weight`, the student's last hidden states
    against the teacher's token by token (read from the pooling span's input). Every
    parameter of the student trains."""
    _check_embed_pair(teacher, student)
    try:
        cfg = EmbedDistillConfig(w_token=req.token_weight)
    except ValueError as exc:
        raise ApiError("bad_request", f"token_weight: {exc}") from None
    data = await trio.to_thread.run_sync(load_embed_data, req, student)
    loss = EmbedTeacherLoss(Span(teacher.atoms), cfg)
    # validation: the cosine term alone, so the run's val loss is 1 - the mean cosine
    cosine = EmbedTeacherLoss(Span(teacher.atoms), COSINE_ONLY)
    run, state, elapsed = await _run_student(
        req, job_id, emit, mesh, student, data, loss, causal=False, eval_fn=cosine
    )
    trained = apply_trained(student, state)
    val = data.validation.take(range(min(req.eval_examples, len(data.validation))))
    cos = await trio.to_thread.run_sync(
        cosines, trained, teacher, val, req.micro_batch, limiter=mesh.limiter
    )
    reply = dataclasses.replace(
        reply_of(run, req.output, elapsed),
        val_cosine_mean=round(float(cos.mean()), 6),
        val_cosine_min=round(float(cos.min()), 6),
    )
    figures = {"val_cosine_mean": reply.val_cosine_mean, "val_cosine_min": reply.val_cosine_min}
    settings: dict[str, str | float] = {
        "loss": "embedding",
        "w_cos": cfg.w_cos,
        "w_mse": cfg.w_mse,
        "w_token": cfg.w_token,
    }
    await _save_student(req, mesh, trained, data.digest, reply, figures, settings)
    return reply


async def _run_student(
    req: TrainRequest,
    job_id: str,
    emit: Emit,
    mesh: Mesh,
    student: Model,
    data: Dataset,
    loss: LossFn,
    *,
    causal: bool = True,
    eval_fn: LossFn | None = None,
) -> tuple[TrainRun, dict[str, torch.Tensor], float]:
    """Train `student` with `loss` computed here, on the span holding its last atom (the
    head or the pooling, with the teacher), its body over the mesh: the run, its final
    state and wall time."""
    n = len(student)
    head = student.span(n - 1, n)

    def span_for(model_id: str, start: int, end: int) -> Span:
        if model_id != req.model or (start, end) != (n - 1, n):
            raise ExecRefused("not_hosted", f"this job trains only {req.model}[{n - 1},{n})")
        return head

    head_host = TrainHost(
        span_for,
        limiter=mesh.limiter,
        metrics=mesh.metrics,
        graph_budget_bytes=mesh.graph_budget_bytes,
        loss_fn=loss,
        eval_fn=eval_fn,
    )
    plan = Plan(
        parent=student,
        first_trainable=first_trainable(student),
        causal=causal,
        data=data,
        optim=optim_of(req),
        schedule=schedule_of(req),
    )
    route = _route(mesh, req, n, head_host)
    run = TrainRun(req, job_id, plan, route, folder=mesh.folder / job_id, emit=emit)
    state, elapsed = await run.run()
    return run, state, elapsed


async def _save_student(
    req: TrainRequest,
    mesh: Mesh,
    trained: Model,
    data_digest: str,
    reply: TrainReply,
    figures: dict[str, float],
    settings: dict[str, str | float],
) -> None:
    """Register the trained student as `req.output`, recording its parent, data, teacher,
    distillation settings and metrics: the run's losses and steps around the kind's own
    `figures` (perplexities; cosines), which the log line gives too."""
    metrics = reply_metrics(reply, figures)
    extra = lineage(req, mesh.registry.manifest(req.model).digest, data_digest, metrics)
    extra |= {
        "teacher": req.teacher,
        "teacher_digest": mesh.registry.manifest(req.teacher).digest,
        "distill": json.dumps(settings),
    }
    await trio.to_thread.run_sync(mesh.registry.save, renamed(trained, req.output, config=extra))
    mesh.metrics.inc("train_jobs_models_total", task=req.task)
    log.info(
        "distill_model_saved", model=req.output, student=req.model, teacher=req.teacher, **figures
    )
