"""Spot-checks of training: a host that perturbs its gradients, outputs, loss or weights is
caught before the optimiser step; honest hosts agree (fp32 and bf16); checks change
nothing of the training itself."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
import trio

from atoms.codecs import encode
from atoms.model import Model
from atoms.nexus import NexusConfig, base_atom_count, build_nexus
from atoms.precision import to_dtype
from atoms.training import OptimConfig
from nexusd.config import ConfigError, TrainConfig
from nexusd.exec.session import HopFailed, HopPlan
from nexusd.exec.train_host import Reply, TrainHost, local_link
from nexusd.exec.train_origin import TrainHop, TrainPipeline
from nexusd.exec.train_verify import TrainVerifier
from nexusd.exec.train_wire import (
    TrainBackward,
    TrainForward,
    TrainLoss,
    TrainLossResult,
    TrainOutput,
)
from nexusd.exec.verify import VerifyPolicy
from nexusd.exec.wire import header_of, tensor_of
from nexusd.metrics import Metrics

from .test_train_pipeline import OPTIM, micro_batches, span_lookup

ORIGIN = b"o" * 32


@pytest.fixture(scope="module")
def model() -> Model:
    return build_nexus(None, NexusConfig(), seed=5)


class LyingTrainHost(TrainHost):
    """A host whose answers of kind `lie` ("backward", "forward" or "loss") are plausible
    but wrong: finite, the right shape, 5 % of the tensor's scale off (or the loss 5 % off)."""

    def __init__(self, *args: object, lie: str, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.lie = lie
        self.lies = 0

    async def handle(self, peer: bytes, msg: object, payload: bytes) -> list[Reply]:
        out = await super().handle(peer, msg, payload)
        kind = {TrainBackward: "backward", TrainForward: "forward", TrainLoss: "loss"}
        if kind.get(type(msg)) != self.lie:
            return out
        reply, enc = out[0]
        self.lies += 1
        if self.lie == "loss":
            assert isinstance(reply, TrainLossResult)
            return [(dataclasses.replace(reply, loss=reply.loss * 1.05), enc)]
        assert isinstance(reply, TrainOutput) and enc is not None and reply.has_tensor
        t = tensor_of(reply.tensor, enc.data)
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(self.lies))
        bent = encode(t + 0.05 * t.abs().max() * noise.to(t.dtype))
        return [(dataclasses.replace(reply, tensor=header_of(bent)), bent)]


def hosts_of(n: int) -> list[bytes]:
    return [bytes([i + 1]) * 32 for i in range(n)]


def pipeline(
    model: Model,
    cuts: list[int],
    verifier: TrainVerifier | None,
    *,
    liar: int = -1,
    lie: str = "backward",
    liar_model: Model | None = None,
    served: dict[int, Model] | None = None,
) -> TrainPipeline:
    limiter = trio.CapacityLimiter(1)
    bounds = [0, *cuts, len(model)]
    hops = []
    for i, ((a, b), node) in enumerate(
        zip(itertools.pairwise(bounds), hosts_of(len(bounds) - 1), strict=True)
    ):
        kw = {"limiter": limiter, "metrics": Metrics(), "graph_budget_bytes": 1 << 30}
        if i == liar:
            host: TrainHost = LyingTrainHost(span_lookup(liar_model or model), lie=lie, **kw)
        else:
            own = (served or {}).get(i, model)
            host = TrainHost(span_lookup(own), **kw)  # type: ignore[arg-type]
        link = local_link(host, ORIGIN)
        hops.append(TrainHop(HopPlan(node, a, b), model.model_id, link, remote=False))
    return TrainPipeline(
        hops,
        first_trainable=base_atom_count(model) + 1,
        schedule="1f1b",
        causal=True,
        verify=verifier,
    )


def verifier(
    model: Model, outcomes: list[str], *, rate: float = 1.0, optim: OptimConfig = OPTIM
) -> TrainVerifier:
    v = TrainVerifier(
        policy=VerifyPolicy(rate=rate, first_steps=1),
        span_for=span_lookup(model),
        model_id=model.model_id,
        optim=optim,
        causal=True,
        trusted=ORIGIN,
        limiter=trio.CapacityLimiter(1),
        rng=random.Random(0),
        on_check=outcomes.append,
    )
    v.opened(0, None, model)
    return v


def cuts(model: Model) -> list[int]:
    """[0,k) frozen; [k,k+2) holds the first trainable atom; [k+2,k+3) returns its input's
    gradient; the head takes the loss."""
    k = base_atom_count(model)
    return [k, k + 2, k + 3]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
async def test_honest_hosts_agree_and_checks_change_nothing(model: Model, precision: str) -> None:
    """Every micro-batch of every host checked (rate 1): no false positive, in fp32 and in
    bf16 autocast; the parameters end equal to an unchecked run's."""
    optim = dataclasses.replace(OPTIM, precision=precision)
    outcomes: list[str] = []
    checked = pipeline(model, cuts(model), verifier(model, outcomes, optim=optim))
    plain = pipeline(model, cuts(model), None)
    for pipe in (checked, plain):
        await pipe.open(optim, next_step=0, state=None)
        for step in range(2):
            await pipe.step(step, micro_batches(step), lr=1e-3, clip=0.5)
    assert outcomes == ["agreed"] * (2 * 4 * 4)  # 2 steps x 4 micro-batches x 4 hops
    a, _ = await checked.state()
    b, _ = await plain.state()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    ("liar", "lie", "what"),
    [
        (2, "backward", "input gradient on atoms \\[9,10\\)"),
        (1, "forward", "output on atoms \\[7,9\\)"),
        (3, "loss", "loss .* on atoms \\[10,11\\)"),
    ],
)
async def test_a_lying_host_is_caught_before_the_optimiser_step(
    model: Model, liar: int, lie: str, what: str
) -> None:
    """Only the first micro-batch of each host is checked (rate 0): the liar is named with
    "wrong_output" in the step it first lies, and no parameter moved."""
    outcomes: list[str] = []
    pipe = pipeline(model, cuts(model), verifier(model, outcomes, rate=0.0), liar=liar, lie=lie)
    await pipe.open(OPTIM, next_step=0, state=None)
    before, _ = await pipe.state()
    with pytest.raises(HopFailed, match=what) as err:
        await pipe.step(0, micro_batches(0), lr=1e-3, clip=0.5)
    assert err.value.host == hosts_of(4)[liar] and err.value.penalty == "wrong_output"
    assert "wrong_output" in outcomes
    after, _ = await pipe.state()
    assert all(torch.equal(before[n], after[n]) for n in before)


async def test_a_host_with_other_weights_is_caught_at_the_start(model: Model) -> None:
    """A host that trains from other weights, consistently (its outputs fit the parameters
    it reports), is caught: at the job's start its parameters must be the origin's."""
    other = build_nexus(None, NexusConfig(), seed=6)
    outcomes: list[str] = []
    v = verifier(model, outcomes, rate=0.0)
    pipe = pipeline(model, cuts(model), v, liar=2, lie="none", liar_model=other)
    await pipe.open(OPTIM, next_step=0, state=None)
    with pytest.raises(HopFailed, match=r"parameter param/atoms\.9\..* at the job.s start"):
        await pipe.step(0, micro_batches(0), lr=1e-3, clip=0.5)


async def test_hosts_serving_bfloat16_are_judged_with_the_bf16_tolerance(model: Model) -> None:
    """An honest host that serves its span in bfloat16 (a frozen span, and one holding a
    frozen and a trainable atom) is no false positive: its outputs and starting parameters
    show it, and it is judged with the bf16 tolerance."""
    half = model.with_atoms([to_dtype(a, "bfloat16") for a in model.atoms])
    outcomes: list[str] = []
    pipe = pipeline(model, cuts(model), verifier(model, outcomes), served={0: half, 1: half})
    await pipe.open(OPTIM, next_step=0, state=None)
    await pipe.step(0, micro_batches(0), lr=1e-3, clip=0.5)
    assert outcomes == ["agreed"] * (4 * 4)


async def test_only_sampled_micro_batches_are_checked(model: Model) -> None:
    """Rate 0.25 after each host's first micro-batch: about a quarter of the later ones."""
    outcomes: list[str] = []
    pipe = pipeline(model, cuts(model), verifier(model, outcomes, rate=0.25))
    await pipe.open(OPTIM, next_step=0, state=None)
    for step in range(3):
        await pipe.step(step, micro_batches(step), lr=1e-3, clip=0.5)
    rng = random.Random(0)  # the verifier's draws: per step, per host, per micro-batch
    draws = [rng.random() < 0.25 for _ in range(3 * 4 * 4 - 4)]  # the first ones draw none
    assert set(outcomes) == {"agreed"}
    assert len(outcomes) == 4 + sum(draws) and 4 < len(outcomes) < 4 + len(draws)


def test_config_keys() -> None:
    assert TrainConfig().verify_rate == 0.02 and TrainConfig().verify_first_micro_batches == 1
    with pytest.raises(ConfigError, match=r"train\.verify_rate"):
        TrainConfig(verify_rate=1.5)
    with pytest.raises(ConfigError, match=r"train\.verify_first_micro_batches"):
        TrainConfig(verify_first_micro_batches=-1)
