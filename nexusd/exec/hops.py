"""The hops of a routed session: one span of a route, on another node or on this one.

Rule 1: a hop answers one step at a time (`step`), or a batch of stored steps at once
(`replay`, used to rebuild a replacement's KV cache); every failure is a `HopFailed` that
says whether to blame the host and how to score it (`RoutedSession` decides what to do).
Rule 2: outputs are checked before use: decodable, finite, and of the batch/token shape
the input had; a reduced output (wire Rule 6, asked with `argmax_vocab` > 0) is int64 of
shape (B,) with every id in [0, vocab); a last-position one (asked with `last_only`) has
one token.
Rule 3: every step reports compute, queue and transfer time (`HopTiming`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import trio

from atoms.codecs import Encoded, decode, encode
from atoms.errors import AtomError
from mesh.closing import close_bounded
from mesh.errors import MeshError, PeerProtocolError, TransportBroken
from mesh.sync import classify_rejection

from ..errors import NexusError, first_in_group
from .hosting import ExecRefused, SpanHost
from .wire import (
    SESSION_ID_BYTES,
    CloseSession,
    ExecChannel,
    ExecFailure,
    ForwardHop,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    header_of,
    tensor_of,
)


class HopFailed(NexusError):
    """A hop could not give a valid answer; the session fails over if it can.

    Args:
        retryable: another host may succeed (False: the input itself was refused).
        blame: the host misbehaved or failed (broken stream, deadline, invalid output) and is
            reported to the mesh; False for honest refusals (busy, out of KV room), which
            only exclude the host from this session.
        penalty: what the host is scored for when blamed (`mesh.scoring.DEFAULT_WEIGHTS`):
            "bad_output" for an answer that is wrong (undecodable, NaN, wrong shape),
            "malformed" for a reply that breaks the protocol, "timeout" for a failure
            (deadline, broken stream), which honest hosts on bad links have too.
    """

    def __init__(
        self,
        host: bytes,
        reason: str,
        *,
        retryable: bool = True,
        blame: bool = True,
        penalty: str = "timeout",
    ) -> None:
        super().__init__(f"host {host.hex()[:8]}: {reason}")
        self.host = host
        self.reason = reason
        self.retryable = retryable
        self.blame = blame
        self.penalty = penalty


HONEST_REFUSALS = frozenset({"busy", "cache_exhausted", "no_session", "out_of_order", "not_hosted"})


def transport_failure(host: bytes, exc: MeshError) -> HopFailed:
    """The HopFailed for a transport error. A broken stream (`TransportBroken`: closed or
    reset under us) says the host is gone: penalty "unreachable" (scored as a timeout),
    and the daemon stops planning the host until it advertises again."""
    penalty = "unreachable" if isinstance(exc, TransportBroken) else "timeout"
    return HopFailed(host, f"{type(exc).__name__}: {exc}", penalty=penalty)


def refused(host: bytes, code: str, message: str) -> HopFailed:
    """The HopFailed for a host's refusal with `code` (see wire.FAILURE_CODES)."""
    return HopFailed(
        host,
        f"refused: {code}: {message}",
        retryable=code != "bad_input",
        blame=code not in HONEST_REFUSALS and code != "bad_input",
    )


def first_hop_failure(group: BaseExceptionGroup[BaseException]) -> HopFailed | None:
    """The first HopFailed inside a nursery's exception group."""
    return first_in_group(group, HopFailed)


@dataclass(frozen=True, slots=True)
class HopPlan:
    """One span of a route: atoms [start, end) on `host`."""

    host: bytes
    start: int
    end: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HopTiming:
    """What one hop cost for one step (seconds; bytes of the tensors each way)."""

    host: bytes
    start: int
    end: int
    compute_s: float
    queue_s: float
    transfer_s: float
    bytes_out: int
    bytes_in: int
    codec: str = ""  # the wire codec both ways ("" = a local hop, nothing on the wire)
    bytes_saved: int = 0  # raw bytes of the tensors both ways minus bytes_out + bytes_in
    wire_error: float = 0.0  # max|x - decoded| / max|x| of the activations sent (`wire_error`)


@dataclass(slots=True, kw_only=True)
class HopTotals:
    """Running totals of one hop over a job's steps (or a training run's operations)."""

    steps: int = 0
    compute_s: float = 0.0
    queue_s: float = 0.0
    transfer_s: float = 0.0
    bytes_out: int = 0
    bytes_in: int = 0
    codec: str = ""
    bytes_saved: int = 0
    wire_error: float = 0.0  # the largest over the steps

    def add(self, t: HopTiming) -> None:
        self.steps += 1
        self._fold(t)

    def merge(self, other: HopTotals) -> None:
        self.steps += other.steps
        self._fold(other)

    def _fold(self, t: HopTiming | HopTotals) -> None:
        """Sum one step's (or another total's) costs into these."""
        self.compute_s += t.compute_s
        self.queue_s += t.queue_s
        self.transfer_s += t.transfer_s
        self.bytes_out += t.bytes_out
        self.bytes_in += t.bytes_in
        self.codec = t.codec or self.codec
        self.bytes_saved += t.bytes_saved
        self.wire_error = max(self.wire_error, t.wire_error)


@dataclass(frozen=True, slots=True)
class StepInput:
    x: torch.Tensor
    position: int
    causal: bool
    pad_mask: bytes


def raw_bytes(t: torch.Tensor) -> int:
    """What `t` costs on the wire in the exact `raw` codec (the baseline of bytes_saved)."""
    return t.numel() * t.element_size()


def wire_error(x: torch.Tensor, enc: Encoded) -> float:
    """The error a lossy codec put into the activations sent: max|x - decoded| / max|x|
    (0 for raw and for token ids). Costs one decode per step of a lossy hop."""
    if enc.codec == "raw" or not x.is_floating_point():
        return 0.0
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak == 0.0:
        return 0.0
    return float((decode(enc).float() - x.float()).abs().max()) / peak


class Hop(Protocol):
    plan: HopPlan

    async def open(self, batch: int, max_len: int) -> None: ...
    async def step(
        self, step_id: int, inp: StepInput, *, argmax_vocab: int = 0, last_only: bool = False
    ) -> tuple[torch.Tensor, HopTiming]: ...
    async def replay(
        self,
        first_id: int,
        inputs: list[StepInput],
        *,
        per_step_s: float,
        last_only: bool = False,
    ) -> list[torch.Tensor]: ...
    async def close(self) -> None: ...


MAX_STALE_REPLIES = 8


class RemoteHop:
    """A span on another node, reached over an `ExecChannel`."""

    def __init__(
        self,
        plan: HopPlan,
        model_id: str,
        channel: ExecChannel,
        *,
        step_timeout_s: float,
        codec: str = "raw",
    ) -> None:
        self.plan = plan
        self._model = model_id
        self._ch = channel
        self._timeout = step_timeout_s
        self._codec = codec
        self._sid = os.urandom(SESSION_ID_BYTES)
        # Lets the hosts of this session's route step it with their outputs (forward mode);
        # they learn it only from our `Step.route`, over encrypted channels.
        self._token = os.urandom(SESSION_ID_BYTES)

    @property
    def codec(self) -> str:
        """The wire codec of this hop's tensors, both ways."""
        return self._codec

    async def open(self, batch: int, max_len: int) -> None:
        msg = OpenSession(
            session_id=self._sid,
            model_id=self._model,
            start=self.plan.start,
            end=self.plan.end,
            batch=batch,
            max_len=max_len,
            reply_codec=self._codec,
            forward_token=self._token,
        )
        reply, _ = await self._exchange(lambda: self._ch.send(msg))
        if not isinstance(reply, SessionOpened):
            raise HopFailed(
                self.plan.host,
                f"expected SessionOpened, got {type(reply).__name__}",
                penalty="malformed",
            )

    async def step(
        self, step_id: int, inp: StepInput, *, argmax_vocab: int = 0, last_only: bool = False
    ) -> tuple[torch.Tensor, HopTiming]:
        """One step; with `argmax_vocab` > 0 the host sends the argmax of its last position
        (int64 (B,), ids below `argmax_vocab`) instead of its output, with `last_only` its
        last position's logits (wire Rule 6)."""
        enc = encode(inp.x, self._codec if inp.x.is_floating_point() else "raw")
        msg = Step(
            session_id=self._sid,
            step_id=step_id,
            position=inp.position,
            causal=inp.causal,
            tensor=header_of(enc),
            pad_mask=inp.pad_mask,
            reduce=reduction(argmax_vocab, last_only),
        )
        t0 = trio.current_time()
        reply, payload = await self._exchange(lambda: self._ch.send(msg, enc), step_id)
        elapsed = trio.current_time() - t0
        if not isinstance(reply, StepResult) or reply.step_id != step_id:
            raise HopFailed(
                self.plan.host,
                f"expected StepResult {step_id}, got {reply!r:.80}",
                penalty="malformed",
            )
        out = _checked_output(self.plan.host, reply, payload, inp.x, argmax_vocab, last_only)
        timing = HopTiming(
            host=self.plan.host,
            start=self.plan.start,
            end=self.plan.end,
            compute_s=reply.compute_s,
            queue_s=reply.queue_s,
            transfer_s=max(0.0, elapsed - reply.compute_s - reply.queue_s),
            bytes_out=len(enc.data),
            bytes_in=len(payload),
            codec=self._codec,
            bytes_saved=raw_bytes(inp.x) + raw_bytes(out) - len(enc.data) - len(payload),
            wire_error=wire_error(inp.x, enc),
        )
        return out, timing

    async def replay(
        self,
        first_id: int,
        inputs: list[StepInput],
        *,
        per_step_s: float,
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """Send every stored step at once and collect the answers (one round trip plus the
        compute, instead of one round trip per step). Sending and receiving run
        concurrently, so large answers can never block behind unsent steps.

        Args:
            per_step_s: expected compute per step (measured on the failed host), for the
                deadline: step_timeout + 2 x per_step_s x len(inputs).
            last_only: every step's output is its last position only (wire Rule 6; the
                callers read the last step's, or only each step's next token).
        """
        outs: list[torch.Tensor] = []

        async def send_all() -> None:
            for k, inp in enumerate(inputs):
                enc = encode(inp.x, self._codec if inp.x.is_floating_point() else "raw")
                msg = Step(
                    session_id=self._sid,
                    step_id=first_id + k,
                    position=inp.position,
                    causal=inp.causal,
                    tensor=header_of(enc),
                    pad_mask=inp.pad_mask,
                    reduce=reduction(0, last_only),
                )
                try:
                    await self._ch.send(msg, enc)
                except MeshError as exc:
                    raise transport_failure(self.plan.host, exc) from None

        async def receive_all() -> None:
            for k, inp in enumerate(inputs):
                try:
                    reply, payload = await self._ch.receive()
                except PeerProtocolError as exc:
                    raise HopFailed(
                        self.plan.host,
                        f"{type(exc).__name__}: {exc}",
                        penalty=protocol_penalty(exc),
                    ) from None
                except MeshError as exc:
                    raise transport_failure(self.plan.host, exc) from None
                if isinstance(reply, ExecFailure):
                    raise refused(self.plan.host, reply.code, reply.message)
                if not isinstance(reply, StepResult) or reply.step_id != first_id + k:
                    raise HopFailed(
                        self.plan.host,
                        f"expected StepResult {first_id + k}, got {reply!r:.80}",
                        penalty="malformed",
                    )
                outs.append(_checked_output(self.plan.host, reply, payload, inp.x, 0, last_only))

        deadline_s = self._timeout + 2 * per_step_s * len(inputs)
        try:
            with trio.fail_after(deadline_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all)
                    nursery.start_soon(receive_all)
        except trio.TooSlowError:
            raise HopFailed(
                self.plan.host, f"replay of {len(inputs)} steps took over {deadline_s:.1f} s"
            ) from None
        except BaseExceptionGroup as group:  # trio wraps child errors; surface the hop failure
            failure = first_hop_failure(group)
            if failure is None:
                raise
            raise failure from None
        return outs

    async def close(self) -> None:
        """Tell the host (best effort, bounded) and close the stream; never blocks long."""

        async def tell_and_close() -> None:
            try:
                await self._ch.send(CloseSession(self._sid))
            except MeshError:
                pass  # the host reclaims idle sessions anyway
            await self._ch.aclose()

        await close_bounded(tell_and_close)

    # ---- forward mode (wire Rule 5) ---------------------------------------------------------

    def forward_target(self, step_id: int) -> ForwardHop:
        """Where the previous hop's host sends this hop's input for step `step_id`."""
        return ForwardHop(self.plan.host, self._sid, step_id, self._token)

    async def send_forward(
        self,
        step_id: int,
        inp: StepInput,
        route: tuple[ForwardHop, ...],
        *,
        argmax: bool = False,
        last_only: bool = False,
    ) -> tuple[int, float]:
        """Send step `step_id` to be forwarded along `route` after this hop; the bytes sent
        and their `wire_error`. `argmax`, `last_only`: the route's last host reduces its
        output to its argmax, or to its last position (wire Rule 6)."""
        enc = encode(inp.x, self._codec if inp.x.is_floating_point() else "raw")
        msg = Step(
            session_id=self._sid,
            step_id=step_id,
            position=inp.position,
            causal=inp.causal,
            tensor=header_of(enc),
            pad_mask=inp.pad_mask,
            route=route,
            reduce=reduction(int(argmax), last_only),
        )
        try:
            with trio.fail_after(self._timeout):
                await self._ch.send(msg, enc)
        except trio.TooSlowError:
            raise HopFailed(self.plan.host, f"could not send within {self._timeout} s") from None
        except MeshError as exc:
            raise transport_failure(self.plan.host, exc) from None
        return len(enc.data), wire_error(inp.x, enc)

    async def receive_forwarded(
        self, step_id: int, x: torch.Tensor, *, argmax_vocab: int = 0, last_only: bool = False
    ) -> tuple[torch.Tensor, StepResult, int]:
        """This hop's copy of its output of step `step_id` (its input was `x`, forwarded by
        the previous host): (output, the host's result record, payload bytes); reduced
        (checked against `argmax_vocab`) when > 0, else its last position with `last_only`."""

        async def nothing() -> None:
            return None

        reply, payload = await self._exchange(nothing, step_id)
        if not isinstance(reply, StepResult) or reply.step_id != step_id:
            raise HopFailed(
                self.plan.host,
                f"expected StepResult {step_id}, got {reply!r:.80}",
                penalty="malformed",
            )
        out = _checked_output(self.plan.host, reply, payload, x, argmax_vocab, last_only)
        return out, reply, len(payload)

    async def _receive_reply(self, step_id: int | None) -> tuple[object, bytes]:
        """The next reply, skipping answers to earlier steps: after a forwarded step falls
        back to relay, a host may answer a step twice (its copy, then the repeat)."""
        for _ in range(MAX_STALE_REPLIES + 1):
            reply, payload = await self._ch.receive()
            if (
                step_id is not None
                and isinstance(reply, (StepResult, ExecFailure))
                and 0 <= reply.step_id < step_id
            ):
                continue
            return reply, payload
        raise HopFailed(
            self.plan.host, f"over {MAX_STALE_REPLIES} stale replies", penalty="malformed"
        )

    async def _exchange(
        self, send: Callable[[], Awaitable[None]], step_id: int | None = None
    ) -> tuple[object, bytes]:
        try:
            with trio.fail_after(self._timeout):
                await send()
                reply, payload = await self._receive_reply(step_id)
        except trio.TooSlowError:
            raise HopFailed(self.plan.host, f"no answer within {self._timeout} s") from None
        except PeerProtocolError as exc:  # a forged, replayed or malformed reply
            raise HopFailed(
                self.plan.host, f"{type(exc).__name__}: {exc}", penalty=protocol_penalty(exc)
            ) from None
        except MeshError as exc:
            raise transport_failure(self.plan.host, exc) from None
        if isinstance(reply, ExecFailure):
            raise refused(self.plan.host, reply.code, reply.message)
        return reply, payload


class LocalHop:
    """A span this node hosts itself: no network, same session semantics."""

    def __init__(self, plan: HopPlan, model_id: str, host: SpanHost, self_id: bytes) -> None:
        self.plan = plan
        self._model = model_id
        self._host = host
        self._self = self_id
        self._sid = os.urandom(SESSION_ID_BYTES)

    async def open(self, batch: int, max_len: int) -> None:
        msg = OpenSession(
            session_id=self._sid,
            model_id=self._model,
            start=self.plan.start,
            end=self.plan.end,
            batch=batch,
            max_len=max_len,
        )
        try:
            await self._host.open(self._self, msg)
        except ExecRefused as exc:
            raise refused(self.plan.host, exc.code, str(exc)) from None

    async def step(
        self, step_id: int, inp: StepInput, *, argmax_vocab: int = 0, last_only: bool = False
    ) -> tuple[torch.Tensor, HopTiming]:
        enc = encode(inp.x)
        msg = Step(
            session_id=self._sid,
            step_id=step_id,
            position=inp.position,
            causal=inp.causal,
            tensor=header_of(enc),
            pad_mask=inp.pad_mask,
            reduce=reduction(argmax_vocab, last_only),
        )
        try:
            reply, out_enc = await self._host.step(self._self, msg, enc.data)
            out = tensor_of(reply.tensor, out_enc.data)
        except ExecRefused as exc:
            raise refused(self.plan.host, exc.code, str(exc)) from None
        except AtomError as exc:
            raise HopFailed(
                self.plan.host, f"invalid output: {exc}", penalty="bad_output"
            ) from None
        _check_output(self.plan.host, inp.x, out, argmax_vocab, last_only)
        timing = HopTiming(
            host=self.plan.host,
            start=self.plan.start,
            end=self.plan.end,
            compute_s=reply.compute_s,
            queue_s=reply.queue_s,
            transfer_s=0.0,
            bytes_out=0,
            bytes_in=0,
        )
        return out, timing

    async def replay(
        self,
        first_id: int,
        inputs: list[StepInput],
        *,
        per_step_s: float,
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        return [
            (await self.step(first_id + k, inp, last_only=last_only))[0]
            for k, inp in enumerate(inputs)
        ]

    async def close(self) -> None:
        self._host.close(self._self, self._sid)


def reduction(argmax_vocab: int, last_only: bool) -> str:
    """`Step.reduce` for a hop asked for its argmax (`argmax_vocab` > 0), its last position
    (`last_only`), or its full output (wire Rule 6)."""
    return "argmax" if argmax_vocab else "last" if last_only else ""


def _checked_output(
    host: bytes,
    reply: StepResult,
    payload: bytes,
    x: torch.Tensor,
    argmax_vocab: int = 0,
    last_only: bool = False,
) -> torch.Tensor:
    """The reply's tensor, decoded (dtype, length, finiteness) and shape-checked against `x`
    (a reduced one against `argmax_vocab`, see `_check_output`)."""
    try:
        out = tensor_of(reply.tensor, payload)
    except AtomError as exc:
        raise HopFailed(host, f"invalid output: {exc}", penalty="bad_output") from None
    _check_output(host, x, out, argmax_vocab, last_only)
    return out


def _check_output(
    host: bytes, x: torch.Tensor, out: torch.Tensor, argmax_vocab: int = 0, last_only: bool = False
) -> None:
    """A wrong shape is a bad output, scored as one (not as a timeout). With `argmax_vocab`
    > 0 the output must be the reduced one: int64 (B,), every id in [0, argmax_vocab); with
    `last_only` (B, 1, ...) logits."""
    if argmax_vocab:
        _check_reduced(host, x, out, argmax_vocab)
        return
    if out.dim() < 2 or out.shape[0] != x.shape[0]:
        raise HopFailed(
            host,
            f"invalid output: shape {tuple(out.shape)} does not fit input {tuple(x.shape)}",
            penalty="bad_output",
        )
    if last_only and (out.dim() != 3 or out.shape[1] != 1):
        raise HopFailed(
            host,
            f"invalid output: expected the last position's logits (B, 1, V), "
            f"got {tuple(out.shape)}",
            penalty="bad_output",
        )
    if not last_only and x.dim() in (2, 3) and out.dim() >= 3 and out.shape[1] != x.shape[1]:
        raise HopFailed(
            host,
            f"invalid output: {out.shape[1]} tokens, input had {x.shape[1]}",
            penalty="bad_output",
        )


def _check_reduced(host: bytes, x: torch.Tensor, out: torch.Tensor, vocab: int) -> None:
    if out.dtype != torch.int64 or tuple(out.shape) != (x.shape[0],):
        raise HopFailed(
            host,
            f"invalid reduced output: expected int64 ({x.shape[0]},), "
            f"got {out.dtype} {tuple(out.shape)}",
            penalty="bad_output",
        )
    if out.numel() and not (int(out.min()) >= 0 and int(out.max()) < vocab):
        raise HopFailed(
            host,
            f"invalid reduced output: token ids {out.tolist()[:8]} outside [0, {vocab})",
            penalty="bad_output",
        )


def protocol_penalty(exc: PeerProtocolError) -> str:
    """Score reason of a protocol error on an exec reply (see `mesh.sync.classify_rejection`;
    a sender no longer admitted, e.g. just banned, is scored as a plain failure)."""
    return classify_rejection(exc)[1] or "timeout"
