"""The origin's side of distributed training: a pipeline of training hops.

Rule 1: the origin drives every micro-batch forward along the route, the span holding the
head takes the loss and starts the backward pass, and output gradients flow back along the
same hops; the backward stops at the span holding the first trainable atom (the frozen
base before it only ever runs inference forwards).
Rule 2: each hop executes its operations in the order of a fixed schedule (1F1B with a
flush, or GPipe), enforced by a turnstile per hop: several micro-batches are in flight on
different hosts at once, and gradients add up in the same order on every run, so a rerun
from a checkpoint ends bit-identical.
Rule 3: the origin commits each optimiser step: it sums the hosts' squared gradient
norms, decides the clip scale, and sends `TrainApply(step)` to every trainable hop.
Rule 4: checkpoint tensors are named by absolute atom index ("param/atoms.9.qkv.weight"),
so a checkpoint restores onto any cut of the route.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch
import trio

from atoms.codecs import Encoded, decode, encode
from atoms.errors import AtomError
from atoms.training import LossSum, OptimConfig
from mesh.closing import close_bounded
from mesh.errors import MeshError, PeerProtocolError

from ..errors import NexusError, first_in_group
from .hops import raw_bytes, wire_error
from .session import (
    HopFailed,
    HopPlan,
    HopTiming,
    HopTotals,
    JobFailed,
    first_hop_failure,
    protocol_penalty,
    refused,
)
from .train_wire import (
    MAX_STATE_TENSORS,
    TrainApplied,
    TrainApply,
    TrainBackward,
    TrainClose,
    TrainForward,
    TrainGetState,
    TrainLoss,
    TrainLossResult,
    TrainNorm,
    TrainNormResult,
    TrainOpen,
    TrainOpened,
    TrainOutput,
    TrainStateEnd,
    TrainStateTensor,
)
from .wire import SESSION_ID_BYTES, ExecChannel, ExecFailure, header_of, tensor_of

if TYPE_CHECKING:
    from .train_verify import Probe, TrainVerifier

Replies = list[tuple[object, bytes]]
Link = Callable[[object, Encoded | None, int], Awaitable[Replies]]
"""(message, tensor, replies expected: 0, 1, or -1 for "until TrainStateEnd") -> replies."""

T = TypeVar("T")
_ATOM_NAME = re.compile(r"^(param|exp_avg|exp_avg_sq|grad)/atoms\.(\d+)\.(.+)$")


class NonFiniteStep(JobFailed):
    """The loss turned NaN/Inf at an optimiser step: the job stops, checkpoints stay."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(f"loss is not finite at optimiser step {step}: {message}")
        self.step = step
        self.detail = message


@dataclass(frozen=True, slots=True, kw_only=True)
class MicroBatch:
    """One micro-batch: the model's input ids (B, T), its targets, its dropout seed, and
    for padded encoder input the (B, T) mask of real tokens."""

    x: torch.Tensor
    targets: torch.Tensor
    seed: int
    mask: torch.Tensor | None = None

    def pad_mask(self) -> bytes:
        if self.mask is None:
            return b""
        return bytes(self.mask.to(torch.uint8).contiguous().numpy().tobytes())


@dataclass(slots=True)
class StepReport:
    """What one optimiser step did: summed loss, counts, and per-hop costs."""

    loss: float = 0.0
    count: int = 0
    correct: int = 0
    grad_norm: float = 0.0
    wall_s: float = 0.0
    hops: dict[HopPlan, HopTotals] = field(default_factory=dict)

    def add_loss(self, result: LossSum) -> None:
        self.loss += result.loss
        self.count += result.count
        self.correct += result.correct

    def idle_fraction(self, plan: HopPlan) -> float:
        """The share of the step's wall time this hop's host did not compute (bubble)."""
        cost = self.hops.get(plan)
        if cost is None or self.wall_s <= 0:
            return 1.0
        return max(0.0, 1.0 - cost.compute_s / self.wall_s)


def schedule_ops(kind: str, micro_batches: int, stages: int, stage: int) -> list[tuple[str, int]]:
    """The order of operations of one backward-capable stage: ("F", mb) forward, ("B", mb)
    backward, ("L", mb) the fused forward+loss+backward of the last stage.

    1F1B with a flush: stage s runs min(p - s - 1, m) warm-up forwards, then alternates one
    forward and one backward, then drains the backwards (at most p - s graphs in flight).
    GPipe: every forward, then every backward. Both have the bubble (p - 1) / (m + p - 1).
    """
    m = micro_batches
    if stage == stages - 1:
        return [("L", k) for k in range(m)]
    if kind == "gpipe":
        return [("F", k) for k in range(m)] + [("B", k) for k in range(m)]
    warm = min(stages - stage - 1, m)
    ops = [("F", k) for k in range(warm)]
    f = warm
    for b in range(m):
        if f < m:
            ops.append(("F", f))
            f += 1
        ops.append(("B", b))
    return ops


class Turnstile:
    """Lets a hop's operations through one at a time, in the order of its schedule."""

    def __init__(self, ops: Sequence[tuple[str, int]]) -> None:
        self._ops = list(ops)
        self._pos = 0
        self._events = {op: trio.Event() for op in self._ops}
        if self._ops:
            self._events[self._ops[0]].set()

    @asynccontextmanager
    async def turn(self, op: tuple[str, int]) -> AsyncIterator[None]:
        event = self._events.get(op)
        if event is None:
            raise NexusError(f"operation {op} is not in this hop's schedule")
        await event.wait()
        try:
            yield
        finally:
            self._pos += 1
            if self._pos < len(self._ops):
                self._events[self._ops[self._pos]].set()


class TrainHop:
    """A training session on one hop's host, over a `Link` (a remote channel or this
    node's own `TrainHost`). Float activations and gradients travel both ways in `codec`
    (the job's, or the one `exec.adaptive` chose for the link); checkpoints always raw."""

    def __init__(
        self,
        plan: HopPlan,
        model_id: str,
        link: Link,
        *,
        remote: bool,
        on_close: Callable[[], Awaitable[None]] | None = None,
        codec: str = "raw",
    ) -> None:
        self.plan = plan
        self._model = model_id
        self._link = link
        self._remote = remote
        self._on_close = on_close
        self.codec = codec
        self.sid = os.urandom(SESSION_ID_BYTES)
        self.trainable_params = 0

    def __repr__(self) -> str:
        return f"TrainHop({self.plan.host.hex()[:8]} [{self.plan.start},{self.plan.end}))"

    async def _call(self, msg: object, enc: Encoded | None = None, replies: int = 1) -> Replies:
        out = await self._link(msg, enc, replies)
        for reply, _ in out:
            if isinstance(reply, ExecFailure):
                if reply.code == "non_finite":
                    raise NonFiniteStep(getattr(msg, "step", -1), reply.message)
                raise refused(self.plan.host, reply.code, reply.message)
        return out

    def _one(self, out: Replies, kind: type) -> tuple[object, bytes]:
        if len(out) != 1 or not isinstance(out[0][0], kind):
            raise HopFailed(
                self.plan.host, f"expected {kind.__name__}, got {out!r:.80}", penalty="malformed"
            )
        return out[0]

    def _tensor(self, header: object, payload: bytes) -> torch.Tensor:
        try:
            return tensor_of(header, payload)  # type: ignore[arg-type]
        except AtomError as exc:
            raise HopFailed(
                self.plan.host, f"invalid output: {exc}", penalty="bad_output"
            ) from None

    def _encode(self, t: torch.Tensor) -> Encoded:
        return encode(t, self.codec if t.is_floating_point() else "raw")

    def seen(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as the host decodes it from this hop's codec (spot-checks replay this)."""
        return t if self.codec == "raw" or not t.is_floating_point() else decode(self._encode(t))

    def _timing(
        self,
        reply: TrainOutput | TrainLossResult,
        elapsed: float,
        sent: tuple[torch.Tensor, Encoded],
        got: tuple[torch.Tensor | None, bytes],
    ) -> HopTiming:
        """One exchange's costs; bytes_saved and wire_error as an inference hop's."""
        compute_s, queue_s = reply.compute_s, reply.queue_s
        transfer = max(0.0, elapsed - compute_s - queue_s) if self._remote else 0.0
        (x, enc), (out, payload) = sent, got
        raw = raw_bytes(x) + (raw_bytes(out) if out is not None else 0)
        return HopTiming(
            host=self.plan.host,
            start=self.plan.start,
            end=self.plan.end,
            compute_s=compute_s,
            queue_s=queue_s,
            transfer_s=transfer,
            bytes_out=len(enc.data),
            bytes_in=len(payload),
            codec=self.codec if self._remote or self.codec != "raw" else "",
            bytes_saved=raw - len(enc.data) - len(payload),
            wire_error=wire_error(x, enc),
        )

    async def open(self, optim: OptimConfig, *, needs_input_grad: bool, next_step: int) -> None:
        msg = TrainOpen(
            session_id=self.sid,
            model_id=self._model,
            start=self.plan.start,
            end=self.plan.end,
            needs_input_grad=needs_input_grad,
            weight_decay=optim.weight_decay,
            beta1=optim.beta1,
            beta2=optim.beta2,
            eps=optim.eps,
            dropout=optim.dropout,
            precision=optim.precision,
            next_step=next_step,
            codec=self.codec,
        )
        reply, _ = self._one(await self._call(msg), TrainOpened)
        assert isinstance(reply, TrainOpened)
        self.trainable_params = reply.trainable_params

    async def forward(
        self,
        mb: int,
        seed: int,
        x: torch.Tensor,
        *,
        grad: bool,
        causal: bool,
        pad_mask: bytes = b"",
    ) -> tuple[torch.Tensor, HopTiming]:
        enc = self._encode(x)
        msg = TrainForward(
            session_id=self.sid,
            mb=mb,
            seed=seed,
            causal=causal,
            grad=grad,
            tensor=header_of(enc),
            pad_mask=pad_mask,
        )
        t0 = trio.current_time()
        reply, payload = self._one(await self._call(msg, enc), TrainOutput)
        assert isinstance(reply, TrainOutput)
        out = self._tensor(reply.tensor, payload)
        tokens_differ = out.dim() >= 3 and x.dim() >= 2 and out.shape[1] != x.shape[1]
        if out.dim() < 2 or out.shape[0] != x.shape[0] or tokens_differ or reply.mb != mb:
            raise HopFailed(
                self.plan.host,
                f"invalid output: {tuple(out.shape)} does not fit input {tuple(x.shape)}",
                penalty="bad_output",
            )
        return out, self._timing(reply, trio.current_time() - t0, (x, enc), (out, payload))

    async def backward(
        self, mb: int, grad: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor | None, HopTiming]:
        """Send d loss / d output of `mb`; returns d loss / d input (shaped like `like`)."""
        enc = self._encode(grad)
        msg = TrainBackward(session_id=self.sid, mb=mb, tensor=header_of(enc))
        t0 = trio.current_time()
        reply, payload = self._one(await self._call(msg, enc), TrainOutput)
        assert isinstance(reply, TrainOutput)
        grad_in = self._input_grad(reply.has_tensor, reply.tensor, payload, like)
        return grad_in, self._timing(
            reply, trio.current_time() - t0, (grad, enc), (grad_in, payload)
        )

    def _input_grad(
        self, has: bool, header: object, payload: bytes, like: torch.Tensor
    ) -> torch.Tensor | None:
        if not has:
            return None
        g = self._tensor(header, payload)
        if tuple(g.shape) != tuple(like.shape):
            raise HopFailed(
                self.plan.host,
                f"invalid output: input gradient {tuple(g.shape)} "
                f"does not fit input {tuple(like.shape)}",
                penalty="bad_output",
            )
        return g

    async def loss(
        self,
        mb: int,
        seed: int,
        x: torch.Tensor,
        targets: torch.Tensor,
        *,
        causal: bool,
        evaluate: bool,
        pad_mask: bytes = b"",
    ) -> tuple[LossSum, torch.Tensor | None, HopTiming]:
        enc = self._encode(x)
        t = targets.to(torch.int64).contiguous()
        msg = TrainLoss(
            session_id=self.sid,
            mb=mb,
            seed=seed,
            causal=causal,
            evaluate=evaluate,
            tensor=header_of(enc),
            targets=t.numpy().astype("<i8").tobytes(),
            targets_shape=tuple(t.shape),
            pad_mask=pad_mask,
        )
        t0 = trio.current_time()
        reply, payload = self._one(await self._call(msg, enc), TrainLossResult)
        assert isinstance(reply, TrainLossResult)
        if not 0 <= reply.count <= t.numel() or not 0 <= reply.correct <= reply.count:
            raise HopFailed(
                self.plan.host,
                f"implausible loss counts {reply.count}, {reply.correct}",
                penalty="bad_output",
            )
        result = LossSum(loss=reply.loss, count=reply.count, correct=reply.correct)
        grad_in = self._input_grad(reply.has_tensor, reply.tensor, payload, x)
        elapsed = trio.current_time() - t0
        return result, grad_in, self._timing(reply, elapsed, (x, enc), (grad_in, payload))

    async def norm(self, step: int) -> tuple[float, int]:
        reply, _ = self._one(
            await self._call(TrainNorm(session_id=self.sid, step=step)), TrainNormResult
        )
        assert isinstance(reply, TrainNormResult)
        if not (math.isfinite(reply.sq_norm) and reply.sq_norm >= 0):
            raise NonFiniteStep(step, f"gradient norm {reply.sq_norm} from {self}")
        return reply.sq_norm, reply.micro_batches

    async def apply(self, step: int, *, lr: float, scale: float) -> bool:
        msg = TrainApply(session_id=self.sid, step=step, lr=lr, scale=scale)
        reply, _ = self._one(await self._call(msg), TrainApplied)
        assert isinstance(reply, TrainApplied)
        return reply.applied

    async def get_state(self, kind: str = "state") -> tuple[dict[str, torch.Tensor], int]:
        """The host's tensors of `kind` (train_wire.STATE_KINDS; absolute names) and its
        next optimiser step."""
        out = await self._call(TrainGetState(session_id=self.sid, kind=kind), None, -1)
        tensors: dict[str, torch.Tensor] = {}
        end = out[-1][0] if out else None
        if not isinstance(end, TrainStateEnd) or end.count != len(out) - 1:
            raise HopFailed(
                self.plan.host, "checkpoint transfer ended early or miscounted", penalty="malformed"
            )
        for reply, payload in out[:-1]:
            if not isinstance(reply, TrainStateTensor):
                raise HopFailed(
                    self.plan.host,
                    f"expected TrainStateTensor, got {reply!r:.60}",
                    penalty="malformed",
                )
            tensors[absolute_name(reply.name, self.plan.start)] = self._tensor(
                reply.tensor, payload
            )
        return tensors, end.next_step

    async def load_state(
        self, tensors: dict[str, torch.Tensor], next_step: int, kind: str = "state"
    ) -> None:
        """Send this hop's part of `tensors` (names absolute; others ignored): restore a
        checkpoint ("state"), set the step's gradients ("grads") or parameters ("params")."""
        mine = {
            relative_name(n, self.plan.start): t
            for n, t in tensors.items()
            if self.plan.start <= atom_of(n) < self.plan.end
        }
        for i, (name, t) in enumerate(sorted(mine.items())):
            enc = encode(t)
            msg = TrainStateTensor(session_id=self.sid, name=name, index=i, tensor=header_of(enc))
            await self._call(msg, enc, 0)
        end = TrainStateEnd(session_id=self.sid, count=len(mine), next_step=next_step, kind=kind)
        self._one(await self._call(end), TrainApplied)

    async def close(self) -> None:
        """Tell the host (shielded, bounded); hosts reclaim idle training sessions anyway."""
        await close_bounded(
            partial(self._link, TrainClose(session_id=self.sid), None, 0),
            ignore=(HopFailed, NexusError),
        )
        if self._on_close is not None:
            await close_bounded(self._on_close, ignore=(MeshError,))


def channel_link(channel: ExecChannel, host: bytes, *, timeout_s: float) -> Link:
    """A `Link` over an exec channel: one exchange at a time (the host answers a stream's
    messages in order), each under `timeout_s`; a broken stream or a deadline is the hop's
    failure."""
    lock = trio.Lock()

    async def link(msg: object, enc: Encoded | None, replies: int) -> Replies:
        out: Replies = []
        async with lock:
            try:
                with trio.fail_after(timeout_s):
                    await channel.send(msg, enc)
                    while replies and len(out) <= MAX_STATE_TENSORS:
                        reply, payload = await channel.receive()
                        out.append((reply, payload))
                        if replies == 1 or isinstance(reply, ExecFailure | TrainStateEnd):
                            return out
            except trio.TooSlowError:
                raise HopFailed(host, f"no answer within {timeout_s} s") from None
            except PeerProtocolError as exc:  # a forged, replayed or malformed reply
                raise HopFailed(
                    host, f"{type(exc).__name__}: {exc}", penalty=protocol_penalty(exc)
                ) from None
            except MeshError as exc:
                raise HopFailed(host, f"{type(exc).__name__}: {exc}") from None
        if replies:
            raise HopFailed(
                host, f"more than {MAX_STATE_TENSORS} checkpoint tensors", penalty="malformed"
            )
        return out

    return link


def atom_of(name: str) -> int:
    match = _ATOM_NAME.match(name)
    if match is None:
        raise NexusError(f"checkpoint tensor name {name!r} is not <kind>/atoms.<index>.<param>")
    return int(match.group(2))


def absolute_name(name: str, start: int) -> str:
    match = _ATOM_NAME.match(name)
    if match is None:
        raise NexusError(f"checkpoint tensor name {name!r} is not <kind>/atoms.<index>.<param>")
    return f"{match.group(1)}/atoms.{start + int(match.group(2))}.{match.group(3)}"


def relative_name(name: str, start: int) -> str:
    return absolute_name(name, -start)


@dataclass(frozen=True, slots=True)
class _Role:
    backward: bool  # this hop runs backwards (it holds or follows the first trainable atom)
    input_grad: bool  # it returns its input's gradient (a trainable atom lies before it)


class TrainPipeline:
    """A training route: hops covering [0, n_atoms), driven step by step.

    Args:
        hops: opened-or-not training hops, in route order.
        first_trainable: index of the model's first atom with a trainable parameter.
        schedule: "1f1b" or "gpipe".
        causal: the model's attention is causal (language models).
        verify: spot-checks of the hosts' outputs and gradients (`train_verify`); None: none.
    """

    def __init__(
        self,
        hops: Sequence[TrainHop],
        *,
        first_trainable: int,
        schedule: str,
        causal: bool,
        verify: TrainVerifier | None = None,
    ) -> None:
        if not hops or hops[-1].plan.end <= first_trainable:
            raise NexusError("a training route needs a trainable atom in its last hop")
        self.hops = list(hops)
        self._causal = causal
        self._schedule = schedule
        self.roles = [
            _Role(backward=h.plan.end > first_trainable, input_grad=h.plan.start > first_trainable)
            for h in self.hops
        ]
        self.stages = sum(r.backward for r in self.roles)
        self.verify = verify

    @property
    def route(self) -> list[HopPlan]:
        return [h.plan for h in self.hops]

    def trainable_hops(self) -> list[TrainHop]:
        return [h for h, r in zip(self.hops, self.roles, strict=True) if r.backward]

    async def open(
        self, optim: OptimConfig, *, next_step: int, state: dict[str, torch.Tensor] | None
    ) -> None:
        """Open every hop's session (concurrently) and restore `state` onto them."""

        async def one(hop: TrainHop, role: _Role) -> None:
            await hop.open(optim, needs_input_grad=role.input_grad, next_step=next_step)
            if state is not None and role.backward:
                await hop.load_state(state, next_step)

        await _gather([partial(one, h, r) for h, r in zip(self.hops, self.roles, strict=True)])

    def _ops(self, micro_batches: int) -> list[list[tuple[str, int]]]:
        ops, stage = [], 0
        for role in self.roles:
            if role.backward:
                ops.append(schedule_ops(self._schedule, micro_batches, self.stages, stage))
                stage += 1
            else:
                ops.append([("F", k) for k in range(micro_batches)])
        return ops

    async def step(
        self, step: int, mbs: Sequence[MicroBatch], *, lr: float, clip: float
    ) -> StepReport:
        """One optimiser step over `mbs`: forwards, losses and backwards in the schedule's
        order, then the global-norm clip and `TrainApply(step)` on every trainable hop."""
        report = await self.run(step, mbs)
        sq = await self.grad_sq_norm(step)
        await self.commit(step, report, sq_norm=sq, lr=lr, clip=clip)
        return report

    async def run(self, step: int, mbs: Sequence[MicroBatch]) -> StepReport:
        """The micro-batches of optimiser step `step` (gradients summed on the hosts); a
        sampled one is checked as soon as its backward is done, while the later ones run,
        and always before the optimiser step (`train_verify`)."""
        report = StepReport(hops={h.plan: HopTotals() for h in self.hops})
        gates = [Turnstile(ops) for ops in self._ops(len(mbs))]
        probes = self.verify.sample(self.route, len(mbs)) if self.verify is not None else {}
        t0 = trio.current_time()
        try:
            await _gather(
                [
                    partial(self._micro_batch, step, k, mbs[k], gates, report, probes.get(k, {}))
                    for k in range(len(mbs))
                ]
            )
        except NonFiniteStep as exc:  # raised by a hop that knows no step number
            raise NonFiniteStep(step, exc.detail) from None
        if report.count == 0:
            raise JobFailed(f"optimiser step {step}: no target carried a loss")
        if not math.isfinite(report.loss):
            raise NonFiniteStep(step, f"summed loss {report.loss}")
        report.wall_s = trio.current_time() - t0
        return report

    async def grad_sq_norm(self, step: int) -> float:
        """The squared norm of the step's summed gradients over every trainable hop."""
        norms = await _gather([partial(h.norm, step) for h in self.trainable_hops()])
        return sum(sq for sq, _ in norms)

    async def commit(
        self, step: int, report: StepReport, *, sq_norm: float, lr: float, clip: float
    ) -> None:
        """Apply optimiser step `step`: clip the mean gradient (norm sqrt(sq_norm) / count)
        to `clip`, then one AdamW update at `lr` on every trainable hop."""
        grad_norm = math.sqrt(sq_norm) / report.count
        report.grad_norm = grad_norm
        clip_scale = min(1.0, clip / grad_norm) if clip > 0 and grad_norm > 0 else 1.0
        scale = clip_scale / report.count
        t0 = trio.current_time()
        await _gather([partial(h.apply, step, lr=lr, scale=scale) for h in self.trainable_hops()])
        report.wall_s += trio.current_time() - t0

    async def tensors(self, kind: str) -> dict[str, torch.Tensor]:
        """Every trainable hop's tensors of `kind`, by absolute name."""
        parts = await _gather([partial(h.get_state, kind) for h in self.trainable_hops()])
        merged: dict[str, torch.Tensor] = {}
        for part, _ in parts:
            merged.update(part)
        return merged

    async def push(self, tensors: dict[str, torch.Tensor], kind: str, next_step: int) -> None:
        """Send every trainable hop its part of `tensors` of `kind`."""
        await _gather(
            [partial(h.load_state, tensors, next_step, kind) for h in self.trainable_hops()]
        )

    async def _micro_batch(
        self,
        step: int,
        k: int,
        mb: MicroBatch,
        gates: list[Turnstile],
        report: StepReport,
        probes: dict[int, Probe],
    ) -> None:
        x, mask = mb.x, mb.pad_mask()
        inputs: list[torch.Tensor] = []
        last = len(self.hops) - 1
        for i, hop in enumerate(self.hops[:-1]):
            async with gates[i].turn(("F", k)):
                inputs.append(x)
                x, timing = await hop.forward(
                    k, mb.seed, x, grad=self.roles[i].backward, causal=self._causal, pad_mask=mask
                )
            report.hops[hop.plan].add(timing)
            if i in probes:
                probes[i].forward(inputs[i], x, mask)
        last_mask = mask if x.dim() >= 3 or x.dtype == torch.long else b""
        async with gates[last].turn(("L", k)):
            result, grad, timing = await self.hops[last].loss(
                k, mb.seed, x, mb.targets, causal=self._causal, evaluate=False, pad_mask=last_mask
            )
        report.hops[self.hops[last].plan].add(timing)
        report.add_loss(result)
        if last in probes:
            probes[last].loss_of(x, result, grad, last_mask)
        for i in range(last - 1, -1, -1):
            if grad is None or not self.roles[i].backward:
                break
            async with gates[i].turn(("B", k)):
                grad_out = grad
                grad, timing = await self.hops[i].backward(k, grad_out, inputs[i])
            report.hops[self.hops[i].plan].add(timing)
            if i in probes:
                probes[i].backward(grad_out, grad)
        if probes and self.verify is not None:
            await self.verify.check(self, step, k, mb, probes)

    async def evaluate(self, mbs: Sequence[MicroBatch], *, in_flight: int = 4) -> LossSum:
        """The summed loss over `mbs` (no dropout, no gradients), a few in flight."""
        total = [0.0, 0, 0]
        limit = trio.Semaphore(in_flight)

        async def one(mb: MicroBatch) -> None:
            async with limit:
                x, mask = mb.x, mb.pad_mask()
                for hop in self.hops[:-1]:
                    x, _ = await hop.forward(
                        0, 0, x, grad=False, causal=self._causal, pad_mask=mask
                    )
                tokens = x.dim() >= 3 or x.dtype == torch.long
                result, _, _ = await self.hops[-1].loss(
                    0,
                    0,
                    x,
                    mb.targets,
                    causal=self._causal,
                    evaluate=True,
                    pad_mask=mask if tokens else b"",
                )
            total[0] += result.loss
            total[1] += result.count
            total[2] += result.correct

        await _gather([partial(one, mb) for mb in mbs])
        return LossSum(loss=float(total[0]), count=int(total[1]), correct=int(total[2]))

    async def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Every trainable hop's tensors (absolute names) and the next optimiser step."""
        parts = await _gather([h.get_state for h in self.trainable_hops()])
        merged: dict[str, torch.Tensor] = {}
        steps = {next_step for _, next_step in parts}
        if len(steps) != 1:
            raise JobFailed(f"trainable hops disagree on the optimiser step: {sorted(steps)}")
        for tensors, _ in parts:
            merged.update(tensors)
        return merged, steps.pop()

    async def close(self) -> None:
        for hop in self.hops:
            await hop.close()


async def _gather(fns: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run coroutines concurrently; results in order. A hop failure inside surfaces as
    itself (not wrapped in an exception group), so callers can fail over."""
    results: list[T | None] = [None] * len(fns)

    async def run(i: int) -> None:
        results[i] = await fns[i]()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(fns)):
                nursery.start_soon(run, i)
    except BaseExceptionGroup as group:
        failure = first_hop_failure(group)
        if failure is not None:
            raise failure from None
        job = first_in_group(group, JobFailed)
        if job is not None:
            raise job from None
        raise
    return results  # type: ignore[return-value]
