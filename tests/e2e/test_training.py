"""Training across real daemons: one distributed step equals one process; a killed origin
resumes from its checkpoint and ends where an uninterrupted run ends; a killed host's span
moves to a replica; a trained classifier beats the zero-shot one."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from atoms.atom import ForwardContext
from atoms.datasets import Order, lm_dataset
from atoms.model import Model
from atoms.span import Span
from atoms.training import OptimConfig, Schedule, SpanTrainer, fp32_copy
from nexusd.api.client import DaemonUnavailable
from nexusd.api.records import (
    ClassifyReply,
    ClassifyRequest,
    ResultRequest,
    RouteEvent,
    TrainProgressEvent,
    TrainReply,
    TrainRequest,
)
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.jobs.training import micro_batches
from nexusd.model_registry import ModelRegistry

pytestmark = pytest.mark.e2e

FAST = {
    "NEXUSD_MESH__ADVERT_REFRESH_S": "1",
    "NEXUSD_MESH__ADVERT_LEASE_S": "4",
    "NEXUSD_MESH__PING_INTERVAL_S": "1",
    "NEXUSD_MESH__READ_TIMEOUT_S": "5",
    "NEXUSD_TRAIN__OP_TIMEOUT_S": "20",
}
TEXT = "\n\n".join(
    f"Paragraph {i}: the whale and the ship went on across the grey sea, and Emma said "
    f"that the weather of day {i} was fine enough for a walk to the village."
    for i in range(40)
)
VALIDATION = "The ship and the whale were seen again near the village."


def lm_request(data: Path, output: str, **kw: object) -> TrainRequest:
    settings: dict[str, object] = {
        "task": "lm",
        "model": "nexus-1.1",
        "output": output,
        "data": str(data),
        "steps": 3,
        "micro_batch": 2,
        "accumulation": 3,
        "seq_len": 16,
        "lr": 1e-3,
        "warmup_steps": 1,
        "dropout": 0.1,
        "clip": 0.5,
        "eval_interval": 0,
        "eval_examples": 4,
        "checkpoint_interval": 1,
        "seed": 7,
        **kw,
    }
    return TrainRequest(**settings)  # type: ignore[arg-type]


def reference(model: Model, req: TrainRequest, data: Path) -> dict[str, torch.Tensor]:
    """The same run in one process: one SpanTrainer over the whole model."""
    tok = model.tokenizer
    assert tok is not None
    ds = lm_dataset(data.read_text(), tok, length=req.seq_len, digest="")
    optim = OptimConfig(weight_decay=req.weight_decay, dropout=req.dropout)
    trainer = SpanTrainer(Span(fp32_copy(model.atoms)), optim, needs_input_grad=False)
    sched = Schedule(
        lr=req.lr,
        warmup_steps=req.warmup_steps,
        total_steps=req.steps,
        decay=req.decay,
        min_ratio=req.min_lr_ratio,
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


def trained(registry: ModelRegistry, model_id: str) -> dict[str, torch.Tensor]:
    model = registry.load_model(model_id)
    return {
        f"atoms.{a.spec.index}.{n}": p.detach()
        for a in model.atoms
        for n, p in a.named_parameters()
    }


def assert_close(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert ref, "nothing trained"
    for name, p in ref.items():
        assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-6), name


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path, 3, models_dir=models_dir, env=FAST) as c:
        c.host(0, "nexus-1.1:0-8")  # the frozen base and the positions
        c.host(1, "nexus-1.1:8-11")  # the two Nexus blocks and the head
        c.host(2, "nexus-1.1:8-11")  # a replica of them
        c.wait_hosts(0, 3, "nexus-1.1")
        yield c


def test_distributed_training_equals_one_process_and_resumes(
    cluster: LocalCluster, registry: ModelRegistry, data: Path
) -> None:
    req = lm_request(data, "nexus-e2e-a")
    events: list[object] = []
    reply = cluster.call(0, req, expect=TrainReply, timeout_s=600, on_event=events.append)
    assert reply.steps == 3 and reply.model == "nexus-e2e-a" and reply.resumed_from == -1
    assert [e.step for e in events if isinstance(e, TrainProgressEvent)] == [1, 2, 3]
    hosts = {h.start: h.name for h in reply.route}
    assert set(hosts) >= {0, 8} and len({h.host for h in reply.route}) >= 2
    parent = registry.load_model("nexus-1.1")
    ref = reference(parent, req, data)
    assert_close(ref, trained(registry, "nexus-e2e-a"))
    # the frozen base did not change
    got = trained(registry, "nexus-e2e-a")
    base = trained(registry, "nexus-1.1")
    assert all(torch.equal(got[n], base[n]) for n in base if int(n.split(".")[1]) < 8)

    # the origin dies after a checkpoint; restarted, the journal re-runs the job, which
    # resumes from that checkpoint and ends equal to the uninterrupted run
    req_b = lm_request(data, "nexus-e2e-b", steps=3, job_id="resume-me")
    ckpt = cluster.data_dir(0) / "train" / "resume-me"

    def killed_after_checkpoint(event: object) -> None:
        if isinstance(event, TrainProgressEvent) and event.step == 2:
            cluster.daemon(0).proc.send_signal(signal.SIGKILL)

    with pytest.raises(DaemonUnavailable):  # the connection dies with the daemon
        cluster.call(0, req_b, expect=TrainReply, timeout_s=600, on_event=killed_after_checkpoint)
    cluster.daemon(0).stop()
    assert any(ckpt.glob("step-*.safetensors"))
    cluster.start(0)  # the job resumes at once and waits for its route to reappear
    cluster.host(0, "nexus-1.1:0-8")
    resumed = cluster.call(0, ResultRequest("resume-me"), expect=TrainReply, timeout_s=600)
    assert resumed.resumed_from >= 1
    assert_close(ref, trained(registry, "nexus-e2e-b"))


def test_host_killed_mid_training_moves_its_span_to_a_replica(
    cluster: LocalCluster, registry: ModelRegistry, data: Path
) -> None:
    req = lm_request(data, "nexus-e2e-c", steps=4)
    names = {cluster.names[i]: i for i in range(cluster.size)}
    routes: list[RouteEvent] = []
    killed: list[int] = []

    def kill_the_trained_host(event: object) -> None:
        if isinstance(event, RouteEvent):
            routes.append(event)
        if isinstance(event, TrainProgressEvent) and event.step == 2 and not killed:
            victim = names[next(h.name for h in routes[-1].hops if h.start == 8)]
            killed.append(victim)
            cluster.daemon(victim).proc.kill()

    reply = cluster.call(0, req, expect=TrainReply, timeout_s=600, on_event=kill_the_trained_host)
    assert killed and len(routes) >= 2
    survivor = next(h.name for h in routes[-1].hops if h.start == 8)
    assert names[survivor] not in killed
    assert reply.failovers, "the run should have rerouted around the killed host"
    assert_close(
        reference(registry.load_model("nexus-1.1"), req, data), trained(registry, "nexus-e2e-c")
    )


def test_trained_classifier_beats_zero_shot(tmp_path: Path, models_dir: Path) -> None:
    rows = []
    for i in range(60):
        rows.append((f"The striker scored a goal in match {i} and the crowd cheered.", "alpha"))
        rows.append((f"Shares fell {i} percent as the bank cut its interest rate.", "beta"))
        rows.append((f"Bake the bread for {i} minutes, then add butter and salt.", "gamma"))
    lines = [
        f'{{"text": "{t}", "label": "{lab}", "split": "{"validation" if i % 5 == 0 else "train"}"}}'
        for i, (t, lab) in enumerate(rows)
    ]
    path = tmp_path / "topics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    val = [(t, lab) for i, (t, lab) in enumerate(rows) if i % 5 == 0]
    with local_cluster(tmp_path, 2, models_dir=models_dir, env=FAST) as c:
        c.host(1, "minilm")
        c.wait_hosts(0, 1, "minilm")
        req = TrainRequest(
            task="classify",
            model="minilm",
            output="topics-head",
            data=str(path),
            steps=30,
            micro_batch=16,
            accumulation=1,
            lr=5e-3,
            warmup_steps=3,
            dropout=0.0,
            eval_interval=0,
            eval_examples=100,
            checkpoint_interval=0,
        )
        reply = c.call(0, req, expect=TrainReply, timeout_s=600)
        assert reply.val_accuracy > 0.9
        texts = tuple(t for t, _ in val)
        trained_reply = c.call(
            0, ClassifyRequest(texts=texts, labels=(), model="topics-head"), expect=ClassifyReply
        )
        zero = c.call(
            0, ClassifyRequest(texts=texts, labels=("alpha", "beta", "gamma")), expect=ClassifyReply
        )
    truth = [lab for _, lab in val]
    acc_trained = sum(p == t for p, t in zip(trained_reply.predicted, truth, strict=True)) / len(
        truth
    )
    acc_zero = sum(p == t for p, t in zip(zero.predicted, truth, strict=True)) / len(truth)
    assert acc_trained > 0.9 and acc_trained > acc_zero + 0.2


def test_replicas_split_micro_batches_and_stay_in_sync(
    cluster: LocalCluster, registry: ModelRegistry, data: Path
) -> None:
    req = lm_request(
        data, "nexus-e2e-d", steps=2, replicas=2, average_every=1, checkpoint_interval=0
    )
    routes: list[RouteEvent] = []
    reply = cluster.call(
        0,
        req,
        expect=TrainReply,
        timeout_s=600,
        on_event=lambda e: routes.append(e) if isinstance(e, RouteEvent) else None,
    )
    assert reply.steps == 2 and not reply.failovers
    trained_hosts = {next(h.name for h in r.hops if h.start == 8) for r in routes}
    assert trained_hosts == {"node1", "node2"}  # one replica each
    ref = reference(registry.load_model("nexus-1.1"), req, data)
    got = trained(registry, "nexus-e2e-d")
    start = trained(registry, "nexus-1.1")
    for name, p in ref.items():
        # the same steps, gradients summed in another order: AdamW normalises each entry, so
        # a near-zero gradient may round either way; the difference stays a small fraction
        # of how far training moved the weights
        moved = float((p - start[name]).norm())
        assert float((got[name] - p).norm()) <= 0.02 * moved + 1e-6, name
