"""Training sessions on a host: the optimiser lives with the weights.

Rule 1: a training session belongs to the peer that opened it ((peer, session id) is the
key); it trains a private fp32 copy of the span's trainable atoms (the served weights of
other sessions never change) with `atoms.training.SpanTrainer`.
Rule 2: every tensor and every command from the origin is validated before it touches the
trainer: a gradient of the wrong shape or non-finite is refused (`bad_input`) and changes
nothing; optimiser steps apply once, in order.
Rule 3: torch runs in worker threads behind the device's CapacityLimiter, like inference;
the time spent waiting is the queue time reported back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
import torch
import trio

from atoms.atom import ForwardContext, IOKind
from atoms.codecs import Encoded, encode
from atoms.errors import AtomError
from atoms.span import Span
from atoms.training import (
    BadCheckpoint,
    BadGradient,
    LossFn,
    LossSum,
    NonFiniteLoss,
    OptimConfig,
    SpanTrainer,
    TrainingError,
    fp32_copy,
    trainable,
)

from ..metrics import Metrics
from .hosting import ExecRefused
from .train_wire import (
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
from .wire import ExecFailure, header_of, tensor_of

log = structlog.get_logger(__name__)

Reply = tuple[object, Encoded | None]
T = TypeVar("T")
SpanLookup = Callable[[str, int, int], Span]
EMPTY = encode(torch.zeros(0))


@dataclass(slots=True)
class _Session:
    opened: TrainOpen
    trainer: SpanTrainer
    last_used: float
    incoming: dict[str, torch.Tensor] = field(default_factory=dict)  # a restore in progress


class TrainHost:
    """The training sessions of this node.

    Args:
        span_for: (model, start, end) -> the served span (raises ExecRefused not_hosted).
        limiter: the device's CapacityLimiter.
        metrics: counters.
        graph_budget_bytes: autograd memory one session keeps between forward and backward.
        max_sessions: training sessions at once; more are refused with `busy`.
        clock: monotonic seconds.
        loss_fn: the loss of every session's head span (None: cross-entropy); a job's own
            host sets it (distillation: `atoms.distill.TeacherLoss`).
        eval_fn: the head span's validation loss (None: cross-entropy; embedding
            distillation: `atoms.distill_embed.EmbedTeacherLoss`).
    """

    def __init__(
        self,
        span_for: SpanLookup,
        *,
        limiter: trio.CapacityLimiter,
        metrics: Metrics,
        graph_budget_bytes: int,
        max_sessions: int = 4,
        clock: Callable[[], float] = time.monotonic,
        loss_fn: LossFn | None = None,
        eval_fn: LossFn | None = None,
    ) -> None:
        self._span_for = span_for
        self._loss_fn = loss_fn
        self._eval_fn = eval_fn
        self._limiter = limiter
        self._metrics = metrics
        self._budget = graph_budget_bytes
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[tuple[bytes, bytes], _Session] = {}

    def __repr__(self) -> str:
        return f"TrainHost({len(self._sessions)} sessions)"

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def reclaim_idle(self, idle_s: float) -> int:
        cutoff = self._clock() - idle_s
        stale = [k for k, s in self._sessions.items() if s.last_used < cutoff]
        for k in stale:
            del self._sessions[k]
        return len(stale)

    async def handle(self, peer: bytes, msg: object, payload: bytes) -> list[Reply]:
        """Apply one training message; returns the replies to send, in order.

        Raises:
            ExecRefused: the message is refused (code and reason go back to the origin).
        """
        if isinstance(msg, TrainOpen):
            return [(await self._open(peer, msg), None)]
        if isinstance(msg, TrainClose):
            self._sessions.pop((peer, msg.session_id), None)
            return []
        sid = getattr(msg, "session_id", b"")
        sess = self._sessions.get((peer, sid))
        if sess is None:
            raise ExecRefused("no_session", "no such training session here (closed or reclaimed)")
        sess.last_used = self._clock()
        if isinstance(msg, TrainForward):
            return [await self._forward(sess, msg, payload)]
        if isinstance(msg, TrainBackward):
            return [await self._backward(sess, msg, payload)]
        if isinstance(msg, TrainLoss):
            return [await self._loss(sess, msg, payload)]
        if isinstance(msg, TrainNorm):
            sq = await self._run(sess.trainer.grad_sq_norm)
            reply = TrainNormResult(
                session_id=sid, step=msg.step, sq_norm=sq, micro_batches=sess.trainer.micro_batches
            )
            return [(reply, None)]
        if isinstance(msg, TrainApply):
            return [(await self._apply(sess, msg), None)]
        if isinstance(msg, TrainGetState):
            return await self._state(sess, msg.kind)
        if isinstance(msg, TrainStateTensor):
            self._receive_state(sess, msg, payload)
            return []
        if isinstance(msg, TrainStateEnd):
            return [(await self._restore(sess, msg), None)]
        raise ExecRefused("bad_input", f"unexpected training message {type(msg).__name__}")

    # ---------------------------------------------------------------------------- steps

    async def _open(self, peer: bytes, msg: TrainOpen) -> TrainOpened:
        key = (peer, msg.session_id)
        existing = self._sessions.get(key)
        if existing is not None:
            if existing.opened != msg:
                raise ExecRefused("bad_input", "session id already open with other parameters")
            return self._opened(existing)
        if len(self._sessions) >= self._max:
            raise ExecRefused("busy", f"host trains its maximum of {self._max} sessions")
        span = self._span_for(msg.model_id, msg.start, msg.end)
        try:
            optim = OptimConfig(
                weight_decay=msg.weight_decay,
                beta1=msg.beta1,
                beta2=msg.beta2,
                eps=msg.eps,
                dropout=msg.dropout,
                precision=msg.precision,
            )
        except ValueError as exc:
            raise ExecRefused("bad_input", str(exc)) from None

        def build() -> SpanTrainer:
            atoms = span.atom_list()
            # a private fp32 master copy of what trains; frozen spans are shared as served
            own = Span(fp32_copy(atoms)) if trainable(atoms) else Span(atoms)
            return SpanTrainer(
                own,
                optim,
                needs_input_grad=msg.needs_input_grad,
                graph_budget_bytes=self._budget,
                loss_fn=self._loss_fn,
                eval_fn=self._eval_fn,
            )

        trainer = await trio.to_thread.run_sync(build, limiter=self._limiter)
        trainer.next_step = msg.next_step
        sess = _Session(msg, trainer, self._clock())
        self._sessions[key] = sess
        self._metrics.inc("train_sessions_total")
        log.info(
            "train_session_opened",
            peer=peer.hex()[:8],
            model=msg.model_id,
            span=f"[{msg.start},{msg.end})",
            trains=trainer.trains,
            next_step=msg.next_step,
        )
        return self._opened(sess)

    @staticmethod
    def _opened(sess: _Session) -> TrainOpened:
        n = sum(p.numel() for _, p in sess.trainer.params)
        return TrainOpened(
            session_id=sess.opened.session_id, trainable_params=n, next_step=sess.trainer.next_step
        )

    def _context(
        self,
        sess: _Session,
        x: torch.Tensor,
        *,
        causal: bool,
        seed: int,
        grad: bool,
        pad_mask: bytes,
    ) -> ForwardContext:
        if x.dim() < 2:
            raise ExecRefused("bad_input", f"expected a (B, T, ...) tensor, got {tuple(x.shape)}")
        tokens = x.shape[1] if sess.trainer.span.in_kind in (IOKind.IDS, IOKind.HIDDEN) else 1
        pad = None
        if pad_mask:
            if len(pad_mask) != x.shape[0] * tokens:
                raise ExecRefused(
                    "bad_input",
                    f"pad_mask: expected {x.shape[0] * tokens} bytes, got {len(pad_mask)}",
                )
            pad = torch.frombuffer(bytearray(pad_mask), dtype=torch.uint8)
            pad = pad.view(x.shape[0], tokens).bool()
        ctx = ForwardContext.for_tokens(x.shape[0], tokens, causal=causal, pad_mask=pad)
        ctx.dropout = sess.trainer.optim.dropout if grad else 0.0
        ctx.seed = seed
        return ctx

    async def _forward(self, sess: _Session, msg: TrainForward, payload: bytes) -> Reply:
        x = _decode(msg.tensor, payload)
        ctx = self._context(
            sess, x, causal=msg.causal, seed=msg.seed, grad=msg.grad, pad_mask=msg.pad_mask
        )
        tr = sess.trainer
        fn = (lambda: tr.forward(msg.mb, x, ctx)) if msg.grad else (lambda: tr.infer(x, ctx))
        (out, compute_s), queue_s = await self._timed(fn)
        enc = _reply_tensor(sess, out)
        reply = TrainOutput(
            session_id=msg.session_id,
            mb=msg.mb,
            has_tensor=True,
            tensor=header_of(enc),
            compute_s=compute_s,
            queue_s=queue_s,
        )
        return reply, enc

    async def _backward(self, sess: _Session, msg: TrainBackward, payload: bytes) -> Reply:
        g = _decode(msg.tensor, payload)
        (grad_in, compute_s), queue_s = await self._timed(lambda: sess.trainer.backward(msg.mb, g))
        enc = EMPTY if grad_in is None else _reply_tensor(sess, grad_in.float())
        reply = TrainOutput(
            session_id=msg.session_id,
            mb=msg.mb,
            has_tensor=grad_in is not None,
            tensor=header_of(enc),
            compute_s=compute_s,
            queue_s=queue_s,
        )
        return reply, enc

    async def _loss(self, sess: _Session, msg: TrainLoss, payload: bytes) -> Reply:
        x = _decode(msg.tensor, payload)
        targets = torch.frombuffer(bytearray(msg.targets), dtype=torch.int64)
        targets = targets.view(msg.targets_shape)
        ctx = self._context(
            sess, x, causal=msg.causal, seed=msg.seed, grad=not msg.evaluate, pad_mask=msg.pad_mask
        )
        tr = sess.trainer

        def run() -> tuple[LossSum, torch.Tensor | None]:
            if msg.evaluate:
                return tr.evaluate(x, targets, ctx), None
            return tr.loss(msg.mb, x, targets, ctx)

        ((result, grad_in), compute_s), queue_s = await self._timed(run)
        enc = EMPTY if grad_in is None else _reply_tensor(sess, grad_in.float())
        reply = TrainLossResult(
            session_id=msg.session_id,
            mb=msg.mb,
            loss=result.loss,
            count=result.count,
            correct=result.correct,
            has_tensor=grad_in is not None,
            tensor=header_of(enc),
            compute_s=compute_s,
            queue_s=queue_s,
        )
        return reply, enc

    async def _apply(self, sess: _Session, msg: TrainApply) -> TrainApplied:
        applied = await self._run(lambda: sess.trainer.apply(msg.step, lr=msg.lr, scale=msg.scale))
        if applied:
            self._metrics.inc("train_steps_applied_total")
        return TrainApplied(session_id=msg.session_id, step=msg.step, applied=applied)

    # ------------------------------------------------------------------------ checkpoints

    async def _state(self, sess: _Session, kind: str) -> list[Reply]:
        tr = sess.trainer
        if kind == "grads":
            tensors = await self._run(tr.grad_tensors)
        else:
            tensors = await self._run(tr.state_tensors)
            if kind == "params":
                tensors = {n: t for n, t in tensors.items() if n.startswith("param/")}
        sid = sess.opened.session_id
        out: list[Reply] = []
        for i, (name, t) in enumerate(sorted(tensors.items())):
            enc = encode(t)
            out.append(
                (TrainStateTensor(session_id=sid, name=name, index=i, tensor=header_of(enc)), enc)
            )
        out.append(
            (
                TrainStateEnd(
                    session_id=sid, count=len(tensors), next_step=sess.trainer.next_step, kind=kind
                ),
                None,
            )
        )
        return out

    def _receive_state(self, sess: _Session, msg: TrainStateTensor, payload: bytes) -> None:
        expected = dict(sess.trainer.params)
        base = msg.name.split("/", 1)[-1]
        ref = expected.get(base)
        if ref is None or tuple(msg.tensor.shape) != tuple(ref.shape):
            sess.incoming.clear()
            raise ExecRefused("bad_input", f"state tensor {msg.name!r} does not fit this span")
        sess.incoming[msg.name] = _decode(msg.tensor, payload)

    async def _restore(self, sess: _Session, msg: TrainStateEnd) -> TrainApplied:
        incoming, sess.incoming = sess.incoming, {}
        if len(incoming) != msg.count:
            raise ExecRefused(
                "bad_input", f"state: {msg.count} tensors announced, {len(incoming)} received"
            )
        tr = sess.trainer
        if msg.kind == "grads":
            await self._run(lambda: tr.set_grads(incoming))
        elif msg.kind == "params":
            await self._run(lambda: tr.load_params(incoming))
        else:
            await self._run(lambda: tr.load_state(incoming, msg.next_step))
            log.info("train_state_restored", tensors=msg.count, next_step=msg.next_step)
        return TrainApplied(session_id=msg.session_id, step=tr.next_step, applied=True)

    # ---------------------------------------------------------------------------- torch

    async def _run(self, fn: Callable[[], T]) -> T:
        return (await self._timed(fn))[0][0]

    async def _timed(self, fn: Callable[[], T]) -> tuple[tuple[T, float], float]:
        """Run `fn` in a worker thread; ((result, compute seconds), queue seconds).

        Raises:
            ExecRefused: bad input or gradients (`bad_input`), a NaN loss (`non_finite`),
                a command out of order (`out_of_order`).
        """
        queued = time.perf_counter()
        started: list[float] = []

        def run() -> tuple[T, float]:
            started.append(time.perf_counter())
            result = fn()
            return result, time.perf_counter() - started[0]

        try:
            done = await trio.to_thread.run_sync(run, limiter=self._limiter)
        except NonFiniteLoss as exc:
            self._metrics.inc("train_refused_total", code="non_finite")
            raise ExecRefused("non_finite", str(exc)) from None
        except (BadGradient, BadCheckpoint) as exc:
            self._metrics.inc("train_refused_total", code=type(exc).__name__)
            raise ExecRefused("bad_input", str(exc)) from None
        except TrainingError as exc:
            self._metrics.inc("train_refused_total", code="out_of_order")
            raise ExecRefused("out_of_order", str(exc)) from None
        except (AtomError, ValueError, RuntimeError) as exc:
            self._metrics.inc("train_refused_total", code="bad_input")
            raise ExecRefused("bad_input", f"{type(exc).__name__}: {exc}") from None
        return done, (started[0] - queued if started else 0.0)


def _reply_tensor(sess: _Session, t: torch.Tensor) -> Encoded:
    """An answer's tensor in the hop's codec (floats; anything else raw)."""
    return encode(t, sess.opened.codec if t.is_floating_point() else "raw")


def _decode(header: object, payload: bytes) -> torch.Tensor:
    try:
        return tensor_of(header, payload)  # type: ignore[arg-type]
    except AtomError as exc:
        raise ExecRefused("bad_input", str(exc)) from None


def local_link(
    host: TrainHost, self_id: bytes
) -> Callable[..., Awaitable[list[tuple[object, bytes]]]]:
    """A `train_origin.Link` to this node's own `TrainHost`: the same messages and checks as
    a remote host, without the network (refusals come back as `ExecFailure`, as on the wire).
    """

    async def link(msg: object, enc: Encoded | None, replies: int) -> list[tuple[object, bytes]]:
        try:
            out = await host.handle(self_id, msg, enc.data if enc is not None else b"")
        except ExecRefused as exc:
            sid = getattr(msg, "session_id", b"")
            failure = ExecFailure(
                session_id=sid, step_id=getattr(msg, "mb", -1), code=exc.code, message=str(exc)
            )
            return [(failure, b"")]
        return [(reply, e.data if e is not None else b"") for reply, e in out]

    return link
