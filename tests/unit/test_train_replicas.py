"""Replicas that train together: synchronous gradient sums (H = 1) and DiLoCo rounds."""

from __future__ import annotations

import pytest
import torch

from atoms.model import Model
from atoms.nexus import NexusConfig, base_atom_count, build_nexus
from nexusd.exec.train_replicas import Averaging, ReplicaGroup

from .test_train_pipeline import OPTIM, micro_batches, pipeline


@pytest.fixture(scope="module")
def model() -> Model:
    return build_nexus(None, NexusConfig(), seed=5)


async def group(model: Model, replicas: int, averaging: Averaging) -> ReplicaGroup:
    k = base_atom_count(model)
    pipes = [pipeline(model, [k] if r % 2 else [k, k + 2]) for r in range(replicas)]
    for p in pipes:
        await p.open(OPTIM, next_step=0, state=None)
    g = ReplicaGroup(pipes, averaging)
    await g.start()
    return g


async def states(g: ReplicaGroup, kind: str = "state") -> list[dict[str, torch.Tensor]]:
    return [await p.tensors(kind) for p in g.pipelines]


async def test_synchronous_replicas_stay_identical_and_equal_one_route(model: Model) -> None:
    two = await group(model, 2, Averaging(every=1))
    one = await group(model, 1, Averaging(every=1))
    for step in range(2):
        a = await two.step(step, micro_batches(step), lr=1e-3, clip=0.5)
        b = await one.step(step, micro_batches(step), lr=1e-3, clip=0.5)
        assert a.count == b.count and a.loss == pytest.approx(b.loss, rel=1e-6)
    r0, r1 = await states(two)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[n], r1[n]) for n in r0)
    (single,) = await states(one)
    c = model.atoms[0].spec.dim("hidden")
    for name, t in single.items():
        if name.startswith("param/"):
            got = r0[name]
            if name.endswith("qkv.bias"):
                # the key bias's gradient is zero in exact arithmetic (softmax ignores a shift
                # of every logit of a row): what remains is rounding noise, which AdamW turns
                # into steps of up to lr whatever the sum order; compare q and v only
                got, t = torch.cat([got[:c], got[2 * c :]]), torch.cat([t[:c], t[2 * c :]])
            assert torch.allclose(got, t, rtol=1e-5, atol=1e-6), name


async def test_diloco_rounds_make_replicas_identical(model: Model) -> None:
    g = await group(model, 2, Averaging(every=2, outer_lr=0.7, outer_momentum=0.9))
    start = (await states(g, "params"))[0]
    await g.step(0, micro_batches(0), lr=1e-3, clip=1.0)
    p0, p1 = await states(g, "params")
    assert any(not torch.equal(p0[n], p1[n]) for n in p0)  # local steps on their own data
    await g.step(1, micro_batches(1), lr=1e-3, clip=1.0)  # the round after step 2
    p0, p1 = await states(g, "params")
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    assert any(not torch.equal(p0[n], start[n]) for n in p0)
    outer = g.outer_state()
    assert {n.removeprefix("outer_param/") for n in outer if n.startswith("outer_param/")} == set(
        p0
    )


def test_averaging_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="every >= 1"):
        Averaging(every=0)
