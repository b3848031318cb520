"""Distributed training in one process: TrainHosts behind wire-encoded links, driven by a
TrainPipeline, equal the same training in one SpanTrainer."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import pytest
import torch
import trio

from atoms.atom import ForwardContext
from atoms.codecs import Encoded
from atoms.model import Model
from atoms.nexus import NexusConfig, base_atom_count, build_nexus
from atoms.span import Span
from atoms.training import OptimConfig, SpanTrainer, fp32_copy, micro_batch_seed
from mesh.hlc import HybridClock
from mesh.identity import NodeKey, seal_large
from mesh.wire import decode_any, encode
from nexusd.api.records import TrainRequest
from nexusd.errors import ApiError
from nexusd.exec.hosting import ExecRefused
from nexusd.exec.session import HopFailed, HopPlan
from nexusd.exec.train_host import TrainHost, local_link
from nexusd.exec.train_origin import (
    MicroBatch,
    NonFiniteStep,
    TrainHop,
    TrainPipeline,
    Turnstile,
    schedule_ops,
)
from nexusd.exec.train_wire import (
    MAX_MICRO_BATCHES,
    MAX_TARGETS,
    TRAIN_HOST_INBOUND,
    TRAIN_ORIGIN_INBOUND,
    TrainBackward,
    TrainLoss,
)
from nexusd.exec.wire import (
    EXEC_DOMAIN,
    MAX_HEADER_BYTES,
    SESSION_ID_BYTES,
    ExecFailure,
    TensorHeader,
)
from nexusd.jobs.training import validate
from nexusd.metrics import Metrics

B, T, M = 2, 10, 4
OPTIM = OptimConfig(dropout=0.1, weight_decay=0.01)


@pytest.fixture(scope="module")
def model() -> Model:
    return build_nexus(None, NexusConfig(), seed=5)


def span_lookup(model: Model) -> Callable[[str, int, int], Span]:
    def span_for(model_id: str, start: int, end: int) -> Span:
        if model_id != model.model_id:
            raise ExecRefused("not_hosted", model_id)
        return model.span(start, end)

    return span_for


def wire_link(host: TrainHost, peer: bytes):  # type: ignore[no-untyped-def]
    """A link that also round-trips every message and reply through the wire codec."""
    inner = local_link(host, peer)

    async def link(msg: object, enc: Encoded | None, replies: int) -> list[tuple[object, bytes]]:
        msg = decode_any(encode(msg), TRAIN_HOST_INBOUND)
        out = await inner(msg, enc, replies)
        return [(decode_any(encode(r), (*TRAIN_ORIGIN_INBOUND, ExecFailure)), p) for r, p in out]

    return link


def micro_batches(step: int) -> list[MicroBatch]:
    out = []
    for k in range(M):
        ids = torch.randint(
            1000, 3000, (B, T + 1), generator=torch.Generator().manual_seed(100 * step + k)
        )
        out.append(MicroBatch(x=ids[:, :-1], targets=ids[:, 1:], seed=micro_batch_seed(1, step, k)))
    return out


def pipeline(model: Model, cuts: list[int], schedule: str = "1f1b") -> TrainPipeline:
    limiter = trio.CapacityLimiter(1)
    bounds = [0, *cuts, len(model)]
    hops = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        host = TrainHost(
            span_lookup(model), limiter=limiter, metrics=Metrics(), graph_budget_bytes=1 << 30
        )
        node = bytes([i + 1]) * 32
        hops.append(
            TrainHop(HopPlan(node, a, b), model.model_id, wire_link(host, b"o" * 32), remote=False)
        )
    return TrainPipeline(
        hops, first_trainable=base_atom_count(model) + 1, schedule=schedule, causal=True
    )


def reference_step(chain: SpanTrainer, step: int, *, lr: float, clip: float) -> float:
    loss = count = 0.0
    for k, mb in enumerate(micro_batches(step)):
        ctx = ForwardContext.for_tokens(B, T, causal=True)
        ctx.dropout, ctx.seed = OPTIM.dropout, mb.seed
        result, _ = chain.loss(k, mb.x, mb.targets, ctx)
        loss, count = loss + result.loss, count + result.count
    norm = math.sqrt(chain.grad_sq_norm()) / count
    chain.apply(step, lr=lr, scale=min(1.0, clip / norm) / count)
    return loss / count


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
async def test_three_hosts_equal_one_process(model: Model, schedule: str) -> None:
    """Two optimiser steps (4 micro-batches each, dropout on, clipping active) over three
    hosts end with the parameters of the same steps in one process (1e-5 relative)."""
    k = base_atom_count(model)
    pipe = pipeline(model, [k, k + 2], schedule)
    await pipe.open(OPTIM, next_step=0, state=None)
    whole = SpanTrainer(Span(fp32_copy(model.atoms)), OPTIM, needs_input_grad=False)
    for step in range(2):
        report = await pipe.step(step, micro_batches(step), lr=1e-3, clip=0.5)
        ref = reference_step(whole, step, lr=1e-3, clip=0.5)
        assert report.loss / report.count == pytest.approx(ref, rel=1e-5)
    state, next_step = await pipe.state()
    assert next_step == 2
    ref_params = {f"param/{n}": p for n, p in whole.span.named_parameters() if p.requires_grad}
    assert set(state) >= set(ref_params)
    for name, p in ref_params.items():
        assert torch.allclose(state[name], p, rtol=1e-5, atol=1e-6), name
    # the frozen base sent nothing and holds no trainable state
    assert all(int(n.split(".")[1]) > k for n in state)


async def test_resume_from_checkpoint_equals_uninterrupted(model: Model) -> None:
    k = base_atom_count(model)
    straight = pipeline(model, [k])
    await straight.open(OPTIM, next_step=0, state=None)
    for step in range(3):
        await straight.step(step, micro_batches(step), lr=1e-3, clip=1.0)
    first = pipeline(model, [k])
    await first.open(OPTIM, next_step=0, state=None)
    for step in range(2):
        await first.step(step, micro_batches(step), lr=1e-3, clip=1.0)
    saved, next_step = await first.state()
    resumed = pipeline(model, [k, k + 2])  # another cut of the route: names are absolute
    await resumed.open(OPTIM, next_step=next_step, state=saved)
    await resumed.step(2, micro_batches(2), lr=1e-3, clip=1.0)
    a, _ = await straight.state()
    b, _ = await resumed.state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


async def test_hostile_gradient_is_refused_and_changes_nothing(model: Model) -> None:
    k = base_atom_count(model)
    pipe = pipeline(model, [k, k + 2])
    await pipe.open(OPTIM, next_step=0, state=None)
    hop = pipe.hops[1]
    before, _ = await hop.get_state()
    mb = micro_batches(0)[0]
    h, _ = await pipe.hops[0].forward(0, mb.seed, mb.x, grad=False, causal=True)
    out, _ = await hop.forward(0, mb.seed, h, grad=True, causal=True)
    with pytest.raises(HopFailed, match="refused: bad_input"):
        await hop.backward(0, torch.full_like(out, float("nan")), h)
    with pytest.raises(HopFailed, match="refused: bad_input"):
        await hop.backward(0, torch.ones(B, T + 3, out.shape[-1]), h)
    after, _ = await hop.get_state()
    assert all(torch.equal(before[n], after[n]) for n in before)
    raw = await hop._link(TrainBackward(session_id=b"x" * 16, mb=0, tensor=hop_header()), None, 1)
    assert isinstance(raw[0][0], ExecFailure) and raw[0][0].code == "no_session"


def hop_header():  # type: ignore[no-untyped-def]
    from atoms.codecs import encode as enc_tensor
    from nexusd.exec.wire import header_of

    return header_of(enc_tensor(torch.zeros(1, 1, 384)))


async def test_bad_checkpoint_is_refused_and_nan_loss_stops_at_its_step(model: Model) -> None:
    k = base_atom_count(model)
    pipe = pipeline(model, [k])
    await pipe.open(OPTIM, next_step=0, state=None)
    await pipe.step(0, micro_batches(0), lr=1e-3, clip=1.0)
    state, _ = await pipe.state()
    name = f"param/atoms.{len(model) - 1}.proj.weight"
    poisoned = {**state, name: torch.full_like(state[name], float("nan"))}
    with pytest.raises(HopFailed, match="bad_input"):  # a non-finite checkpoint is refused
        await pipe.hops[-1].load_state(poisoned, 1)
    huge = {**state, name: torch.full_like(state[name], 1e38)}  # finite, but overflows
    await pipe.hops[-1].load_state(huge, 1)
    with pytest.raises(NonFiniteStep, match="optimiser step 1"):
        await pipe.step(1, micro_batches(1), lr=1e-3, clip=1.0)


def test_schedules_order_and_bubble() -> None:
    assert schedule_ops("1f1b", 4, 3, 0) == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("B", 0),
        ("F", 3),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert schedule_ops("1f1b", 4, 3, 2) == [("L", k) for k in range(4)]
    assert schedule_ops("gpipe", 2, 2, 0) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    for kind in ("1f1b", "gpipe"):
        ops = schedule_ops(kind, 8, 4, 1)
        assert sorted(ops) == sorted([("F", k) for k in range(8)] + [("B", k) for k in range(8)])


async def test_turnstile_lets_operations_through_in_schedule_order() -> None:
    gate = Turnstile([("F", 1), ("F", 0)])
    seen: list[int] = []

    async def op(k: int) -> None:
        async with gate.turn(("F", k)):
            seen.append(k)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(op, 0)
        nursery.start_soon(op, 1)
    assert seen == [1, 0]


def test_the_largest_loss_step_fits_one_exec_header() -> None:
    """A loss step's targets travel in its header, which a host reads under the exec header
    limit: the largest one the records allow, signed as a channel sends it, fits; a request
    whose micro-batches would not is refused up front, naming micro_batch."""
    sid = bytes(SESSION_ID_BYTES)
    msg = TrainLoss(
        session_id=sid,
        mb=MAX_MICRO_BATCHES - 1,
        seed=2**62,
        causal=True,
        evaluate=False,
        tensor=TensorHeader(dtype="float32", shape=(1, 1, 1), codec="raw"),
        targets=bytes(8 * MAX_TARGETS),
        targets_shape=(1, MAX_TARGETS),
        pad_mask=bytes(MAX_TARGETS),
    )
    key = NodeKey.generate()
    env = seal_large(
        key, EXEC_DOMAIN, encode(msg), b"", clock=HybridClock(max_drift_s=5), now=time.time()
    )
    assert len(env) < MAX_HEADER_BYTES
    with pytest.raises(ValueError, match="at most"):
        TrainLoss(
            session_id=sid,
            mb=0,
            seed=0,
            causal=True,
            evaluate=False,
            tensor=msg.tensor,
            targets=bytes(8 * MAX_TARGETS + 8),
            targets_shape=(MAX_TARGETS + 1,),
        )
    validate(TrainRequest(task="lm", model="m", output="o", micro_batch=512, seq_len=128))
    with pytest.raises(
        ApiError,
        match=rf"micro_batch: expected micro_batch x seq_len at most "
        rf"{MAX_TARGETS}",
    ):
        validate(TrainRequest(task="lm", model="m", output="o", micro_batch=512, seq_len=129))
