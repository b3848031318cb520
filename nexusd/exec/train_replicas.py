"""Replicas that train together: data parallelism over several training routes.

Rule 1: micro-batch k of a step goes to replica k mod R (each replica is a whole
`TrainPipeline`; their trainable hosts are distinct).
Rule 2: H = 1 (synchronous): after the step's micro-batches, the origin sums every
replica's gradients (in replica order, so every run sums the same way), clips the sum by
its global norm, sends the sum to every replica, and every replica applies the same AdamW
step: replicas stay bit-identical and the step equals one route over all micro-batches
(up to the order of floating-point sums).
Rule 3: H > 1 (DiLoCo): each replica applies its own steps on its own micro-batches; every
H steps the origin averages the replicas' parameters and takes an outer step with Nesterov
momentum (outer_lr 1, momentum 0: plain averaging), then sends the result to every
replica: after an averaging round the replicas hold identical parameters. The outer step
is where an outlier replica could be rejected or clipped (not done yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .session import HopTotals
from .train_origin import MicroBatch, StepReport, TrainPipeline, _gather


@dataclass(frozen=True, slots=True, kw_only=True)
class Averaging:
    """How replicas keep in sync: every `every` optimiser steps, an outer step."""

    every: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.every < 1 or not 0 < self.outer_lr <= 2 or not 0 <= self.outer_momentum < 1:
            raise ValueError("averaging: every >= 1, outer_lr in (0, 2], momentum in [0, 1)")


@dataclass(slots=True)
class _Outer:
    """The origin's outer state (H > 1): the last global parameters and the momentum."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)


class ReplicaGroup:
    """R training pipelines over the same model, driven as one (see the module rules)."""

    def __init__(self, pipelines: Sequence[TrainPipeline], averaging: Averaging) -> None:
        if not pipelines:
            raise ValueError("a replica group needs at least one pipeline")
        self.pipelines = list(pipelines)
        self.averaging = averaging
        self._outer = _Outer()

    @property
    def replicas(self) -> int:
        return len(self.pipelines)

    async def step(
        self, step: int, mbs: Sequence[MicroBatch], *, lr: float, clip: float
    ) -> StepReport:
        if self.replicas == 1:
            return await self.pipelines[0].step(step, mbs, lr=lr, clip=clip)
        shares = [list(mbs[r :: self.replicas]) for r in range(self.replicas)]
        reports = await _gather(
            [partial(p.run, step, share) for p, share in zip(self.pipelines, shares, strict=True)]
        )
        if self.averaging.every == 1:
            await self._synchronous(step, reports, lr=lr, clip=clip)
        else:
            await _gather(
                [
                    partial(self._local, p, step, r, lr, clip)
                    for p, r in zip(self.pipelines, reports, strict=True)
                ]
            )
            if (step + 1) % self.averaging.every == 0:
                await self.average(step + 1)
        return _merge(reports)

    async def _local(
        self, pipe: TrainPipeline, step: int, report: StepReport, lr: float, clip: float
    ) -> None:
        sq = await pipe.grad_sq_norm(step)
        await pipe.commit(step, report, sq_norm=sq, lr=lr, clip=clip)

    async def _synchronous(
        self, step: int, reports: Sequence[StepReport], *, lr: float, clip: float
    ) -> None:
        grads = await _gather([partial(p.tensors, "grads") for p in self.pipelines])
        total = {name: sum_in_order([g[name] for g in grads]) for name in grads[0]}
        sq = sum(float(t.double().pow(2).sum()) for t in total.values())
        merged = _merge(reports)
        await _gather([partial(p.push, total, "grads", step) for p in self.pipelines])
        await _gather(
            [partial(p.commit, step, merged, sq_norm=sq, lr=lr, clip=clip) for p in self.pipelines]
        )

    async def average(self, next_step: int) -> None:
        """One outer step: average the replicas' parameters, Nesterov momentum, push."""
        params = await _gather([partial(p.tensors, "params") for p in self.pipelines])
        mean = {n: sum_in_order([p[n] for p in params]) / self.replicas for n in params[0]}
        outer = self._outer
        if not outer.params:
            outer.params = {n: t.clone() for n, t in params[0].items()}  # before any local step
        new: dict[str, torch.Tensor] = {}
        mu, lr = self.averaging.outer_momentum, self.averaging.outer_lr
        for name, avg in mean.items():
            delta = outer.params[name] - avg  # the pseudo-gradient
            m = outer.momentum.get(name)
            m = delta.clone() if m is None else m.mul_(mu).add_(delta)
            outer.momentum[name] = m
            new[name] = outer.params[name] - lr * (delta + mu * m)
        outer.params = new
        await _gather([partial(p.push, new, "params", next_step) for p in self.pipelines])

    async def start(self) -> None:
        """Remember the starting parameters (the outer step's reference, H > 1)."""
        if self.replicas > 1 and self.averaging.every > 1:
            self._outer.params = await self.pipelines[0].tensors("params")

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The origin's outer state for a checkpoint ("outer_param/...", "outer_momentum/...")."""
        out = {f"outer_param/{n}": t for n, t in self._outer.params.items()}
        out.update({f"outer_momentum/{n}": t for n, t in self._outer.momentum.items()})
        return out

    def load_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        self._outer = _Outer(
            params={
                n.removeprefix("outer_param/"): t
                for n, t in tensors.items()
                if n.startswith("outer_param/")
            },
            momentum={
                n.removeprefix("outer_momentum/"): t
                for n, t in tensors.items()
                if n.startswith("outer_momentum/")
            },
        )


def sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """t0 + t1 + ... in this order (the same order on every run: reproducible sums)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def _merge(reports: Sequence[StepReport]) -> StepReport:
    out = StepReport()
    for r in reports:
        out.loss += r.loss
        out.count += r.count
        out.correct += r.correct
        out.wall_s = max(out.wall_s, r.wall_s)
        for plan, cost in r.hops.items():
            out.hops.setdefault(plan, HopTotals()).merge(cost)
    grad = [r.grad_norm for r in reports if r.grad_norm]
    out.grad_norm = math.fsum(grad) / len(grad) if grad else 0.0
    return out
