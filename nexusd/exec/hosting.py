"""Serving hosted spans: sessions, KV caches, step ids, idle reclaim, torch off the loop.

Rule 1: a session belongs to the peer that opened it: (peer, session id) is the key, so no
origin can touch another's cache.
Rule 2: all sessions share one KV budget, preallocated as the pages of one `KVPool`
(atoms/kv_pool.py); a session takes pages as its length grows and gives them back when it
closes or idles out. A step the pool cannot hold is refused with `cache_exhausted` before
anything is written (the session stays usable); so is a session whose max_len could never
fit, or that would not get its first page.
Rule 3: a step id is applied once; a repeat is answered from the stored result; a step that
fails mid-way drops its session (its cache may be half-written) and says so.
Rule 4: torch runs in worker threads behind one CapacityLimiter per device; the time spent
waiting for it is the step's queue time, reported back with the compute time. Decode steps
of different sessions that wait together run as one batch (`batching.StepBatcher`).
Rule 5: a step asking `reduce="argmax"` (wire Rule 6) that this host answers last (no
further route) gets its own output's last-position argmax, int64 (B,), in the `raw` codec
whatever the session's codec; `reduce="last"` gets the last position's logits (B, 1, V).
Both run the LM head on the last position only; a span that does not end in logits
refuses them (`bad_input`).
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog
import torch
import trio

from atoms.atom import ForwardContext, IOKind
from atoms.batched import BatchItem, batchable
from atoms.codecs import Encoded, all_finite, encode
from atoms.errors import AtomError, CacheExhausted, CacheNotReady
from atoms.kv_pool import KVPool, PagedCache, PageFormat, pool_shape
from atoms.span import Span
from mesh.errors import MeshError, PeerProtocolError
from mesh.state import HostedSpan, SpanProfile

from ..errors import NexusError
from ..metrics import Metrics
from .batching import ACTIVE_S, BatchedStep, StepBatcher
from .in_flight import MAX_IN_FLIGHT_BYTES, InFlight
from .profile import ComputeProfile
from .wire import (
    CloseSession,
    ExecChannel,
    ExecFailure,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    header_of,
    tensor_of,
)

log = structlog.get_logger(__name__)
KEPT_RESULTS = 1  # answers kept per session for a repeated step id (a resend after a timeout)
MAX_BATCH = 32  # decode steps in one batch at most


class LoadMeter:
    """Busy fraction of the device and peak queue depth over a sliding window.

    Rule: what we advertise is measured, not inferred: `utilisation` is seconds the device
    spent computing in the last `window_s`, divided by `window_s`.
    """

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window = window_s
        self._clock = clock
        self._busy: list[tuple[float, float]] = []  # (end time, seconds busy) per step
        self._peak: list[tuple[float, int]] = []  # (time, queue depth) samples

    def busy(self, seconds: float) -> None:
        self._busy.append((self._clock(), seconds))

    def queue(self, depth: int) -> None:
        self._peak.append((self._clock(), depth))

    def _trim(self) -> float:
        cutoff = self._clock() - self._window
        self._busy = [b for b in self._busy if b[0] >= cutoff]
        self._peak = [q for q in self._peak if q[0] >= cutoff]
        return cutoff

    def utilisation(self) -> float:
        self._trim()
        return min(1.0, sum(s for _, s in self._busy) / self._window)

    def peak_queue(self) -> int:
        self._trim()
        return max((d for _, d in self._peak), default=0)


def warm_up(span: Span) -> float:
    """One tiny forward through a freshly loaded span, so the first real step does not pay
    torch's first-call costs (measured: 0.2-0.45 s on a cold replica during failover).
    Returns the seconds it took; spans with image input are left cold."""
    first = span.atom_list()[0]
    width = first.input_width() or 1
    dtype = first.spec.torch_dtype
    kind = span.in_kind
    if kind is IOKind.IDS:
        x = torch.zeros((1, 2), dtype=torch.long)
    elif kind is IOKind.HIDDEN:
        x = torch.zeros((1, 2, width), dtype=dtype)
    elif kind is IOKind.POOLED:
        x = torch.zeros((1, width), dtype=dtype)
    else:
        return 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        span(x, ForwardContext.for_tokens(1, 2))
    return time.perf_counter() - t0


def session_kv_bytes(span: Span, *, batch: int, max_len: int, page_tokens: int) -> int:
    """The pool bytes one session of `batch` rows x `max_len` tokens can take on `span`
    (whole pages of `page_tokens`): the budget of a host that serves that session alone."""
    if max_len <= 0 or not span.kv_layouts():
        return 0
    fmt = PageFormat.of(span.kv_layouts(), page_tokens)
    page_bytes, _ = pool_shape([fmt])
    return page_bytes * batch * fmt.pages(max_len)


def _reduces(msg: Step) -> bool:
    """Whether this host reduces the step's output: asked to, and it returns the final
    result (no further route: in forward mode only the route's last host does)."""
    return bool(msg.reduce) and not msg.route


def argmax_last(out: torch.Tensor) -> torch.Tensor:
    """The int64 (B,) argmax of the last position of logits (B, T, V), or of (B, V)."""
    last = out[:, -1] if out.dim() == 3 else out
    return last.argmax(dim=-1).to(torch.int64).contiguous()


def _physical_memory() -> int:
    """The machine's RAM in bytes. The pool reserves its address space at once (resident
    only where written), so a budget is capped at a quarter of it."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: trust the budget
        return 1 << 62


class TrainHandler(Protocol):
    """What `serve` needs of the training sessions (`exec.train_host.TrainHost`)."""

    async def handle(
        self, peer: bytes, msg: object, payload: bytes
    ) -> list[tuple[object, Encoded | None]]: ...


class ExecRefused(NexusError):
    """A request this host refuses; becomes an `ExecFailure(code, message)` on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, kw_only=True)
class _Session:
    opened: OpenSession
    span: Span
    cache: PagedCache | None
    batch: int
    reply_codec: str
    last_used: float
    next_step: int = 0
    in_flight: bool = False  # a step of it is computing in a worker thread
    dropped: bool = False  # forgotten meanwhile: its pages go back when the step ends
    results: OrderedDict[int, tuple[StepResult, Encoded]] = field(default_factory=OrderedDict)
    channel: ExecChannel | None = None  # the origin's channel: forwarded steps answer there
    # One step of a session at a time, whichever channel or task brings it: a repeated id
    # waits for the first and is answered from its stored result (wire Rule 3).
    stepping: trio.Lock = field(default_factory=trio.Lock)


class SpanHost:
    """The spans of this node and the sessions origins run on them.

    Args:
        spans: the loaded spans (several models, or several ranges, are fine).
        kv_budget_bytes: KV cache memory shared by all sessions.
        max_sessions: sessions at once; more are refused with `busy`.
        limiter: the device's CapacityLimiter (torch threads).
        metrics: counters and gauges.
        clock: monotonic seconds (injected for tests).
        load_window_s: the window of the advertised utilisation and peak queue depth.
        max_step_tokens: batch x tokens one step may carry (bounds a step's memory).
        kv_page_tokens: tokens per page of the KV pool ([atoms] kv_page_tokens).
        batch_window_s: how long a decode step waits for other sessions' steps to batch
            with ([exec] batch_window_ms); 0 batches only steps that queue anyway.
        inline_max_s: a lone decode step whose span's recent steps took at most this runs
            on the event loop's thread, not a worker's ([exec] inline_step_max_ms;
            `exec.batching` Rule 5); 0: never.
    """

    def __init__(
        self,
        spans: Sequence[Span],
        *,
        kv_budget_bytes: int,
        max_sessions: int,
        limiter: trio.CapacityLimiter,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        load_window_s: float = 5.0,
        max_step_tokens: int = 65536,
        kv_page_tokens: int = 8,
        batch_window_s: float = 0.0,
        inline_max_s: float = 0.0,
    ) -> None:
        self._spans = list(spans)
        self._max_step_tokens = max_step_tokens
        self._budget = kv_budget_bytes
        self._max_sessions = max_sessions
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[tuple[bytes, bytes], _Session] = {}
        self.queued = 0  # steps waiting for or using the device right now
        self.load = LoadMeter(load_window_s, clock)
        self._page_tokens = kv_page_tokens
        self._pool: KVPool | None = None  # built at the first session that needs a cache
        self._batcher = StepBatcher(
            limiter=limiter,
            window_s=batch_window_s,
            max_batch=MAX_BATCH,
            active=self._active_sessions,
            on_batch=self._batched,
            inline_max_s=inline_max_s,
        )
        self.profile = ComputeProfile()  # measured seconds per atom, per model
        # Forwarding (wire Rule 5): opens an exec channel to another host (set by the daemon;
        # None: this host cannot forward, and says so in `StepResult.forward_error`).
        self.dial: Callable[[bytes], Awaitable[ExecChannel]] | None = None
        self._forward_to: dict[bytes, tuple[ExecChannel, float]] = {}  # host -> (channel, used)
        self._dialing = trio.Lock()
        self._idle_s = 60.0  # the serve loops' idle timeout: a peer closes idle channels

    def __repr__(self) -> str:
        spans = ", ".join(f"{s.model_id}[{s.start},{s.end})" for s in self._spans)
        return f"SpanHost({spans}; {len(self._sessions)} sessions, {self.kv_bytes_used} KV bytes)"

    def add_span(self, span: Span) -> HostedSpan:
        """Serve one more span (atoms already loaded and verified)."""
        self._spans.append(span)
        return self.hosted()[-1]

    def remove_span(self, model_id: str, start: int, end: int) -> bool:
        """Stop offering exactly [start, end) of `model_id` to new sessions (sessions
        already open on it keep their span until they close); False if not hosted."""
        for i, s in enumerate(self._spans):
            if (s.model_id, s.start, s.end) == (model_id, start, end):
                del self._spans[i]
                return True
        return False

    def hosted(self) -> list[HostedSpan]:
        """The spans this node serves, as it advertises them."""
        out = []
        for s in self._spans:
            dtype = s.atom_list()[0].spec.dtype
            out.append(HostedSpan(s.model_id, s.start, s.end, dtype))
        return out

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one session costs on the most demanding hosted span
        (summed over its attention atoms' layouts); 0 when no span keeps a KV cache."""
        costs = [
            sum(layout.bytes_per_token(1) for _uid, layout in s.kv_layouts().values())
            for s in self._spans
        ]
        return max(costs, default=0)

    def profiles(self, auto: frozenset[tuple[str, int, int]] = frozenset()) -> list[SpanProfile]:
        """What we measured of each hosted span (those not timed yet are left out); `auto`
        names the spans the daemon placed itself."""
        out = []
        for s in self._spans:
            c = self.profile.get(s.model_id)
            if c is None or not c > 0:
                continue
            kv = sum(layout.bytes_per_token(1) for _uid, layout in s.kv_layouts().values())
            key = (s.model_id, s.start, s.end)
            cap = self.profile.capacity(s.model_id) or c
            out.append(SpanProfile(s.model_id, s.start, s.end, c, kv, key in auto, cap))
        return out

    def _pool_shape(self) -> tuple[int, int]:
        """(page bytes, stripe) that fit every hosted span (`kv_pool.pool_shape`)."""
        return pool_shape([PageFormat.of(s.kv_layouts(), self._page_tokens) for s in self._spans])

    def _page_bytes(self) -> int:
        """Page size that fits the most demanding hosted span (at least 16 bytes)."""
        return self._pool_shape()[0]

    def _pool_for(self, span: Span) -> tuple[KVPool, PageFormat]:
        """The pool, (re)built while no page is in use when the hosted spans need other
        pages than it has (a span added later); and `span`'s page format."""
        fmt = PageFormat.of(span.kv_layouts(), self._page_tokens)
        pool, shape = self._pool, self._pool_shape()
        if pool is None or (pool.used_pages == 0 and (pool.page_bytes, pool.stripe) != shape):
            budget = min(self._budget, _physical_memory() // 4)
            pool = self._pool = KVPool.for_budget(budget, *shape)
            log.info(
                "kv_pool_built", pages=pool.capacity, page_bytes=pool.page_bytes, stripe=shape[1]
            )
        return pool, fmt

    def kv_pages(self) -> tuple[int, int]:
        """(pages in use, pages in the pool); before the pool exists, what it will hold."""
        if self._pool is not None:
            return self._pool.used_pages, self._pool.capacity
        return 0, min(self._budget, _physical_memory() // 4) // self._page_bytes()

    @property
    def kv_bytes_used(self) -> int:
        """Pool bytes held by sessions (whole pages)."""
        return self._pool.used_pages * self._pool.page_bytes if self._pool else 0

    @property
    def kv_free_bytes(self) -> int:
        """Bytes of free pages: what new tokens can still take here (the advert's room)."""
        used, total = self.kv_pages()
        return (total - used) * (self._pool.page_bytes if self._pool else self._page_bytes())

    def _active_sessions(self) -> int:
        cutoff = self._clock() - ACTIVE_S
        return sum(1 for s in self._sessions.values() if s.last_used >= cutoff)

    def _batched(self, steps: int, seconds: float) -> None:
        self.load.busy(seconds)
        self._metrics.inc("exec_batches_total")
        self._metrics.inc("exec_batched_steps_total", steps)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def span_for(self, model_id: str, start: int, end: int) -> Span:
        """A span covering exactly [start, end), cut from a hosted one."""
        for s in self._spans:
            if s.model_id == model_id and s.start <= start and end <= s.end:
                if (s.start, s.end) == (start, end):
                    return s
                atoms = s.atom_list()[start - s.start : end - s.start]
                return Span(atoms)
        raise ExecRefused("not_hosted", f"atoms {model_id}[{start},{end}) are not hosted here")

    async def open(self, peer: bytes, msg: OpenSession) -> SessionOpened:
        """Create a session (idempotent for the same peer, id and parameters); the KV cache
        is allocated in a worker thread (up to the whole budget: not on the event loop)."""
        key = (peer, msg.session_id)
        if key in self._sessions:
            sess = self._sessions[key]
            if sess.opened != msg:
                raise ExecRefused("bad_input", "session id already open with other parameters")
            return SessionOpened(msg.session_id, sess.cache.nbytes if sess.cache else 0)
        if len(self._sessions) >= self._max_sessions:
            raise ExecRefused("busy", f"host serves its maximum of {self._max_sessions} sessions")
        span = self.span_for(msg.model_id, msg.start, msg.end)
        cache = None
        if msg.max_len > 0 and span.kv_layouts():
            cache = self._new_cache(span, msg)
        self._sessions[key] = _Session(
            opened=msg,
            span=span,
            cache=cache,
            batch=msg.batch,
            reply_codec=msg.reply_codec,
            last_used=self._clock(),
        )
        self._metrics.set("host_sessions", len(self._sessions))
        return SessionOpened(msg.session_id, cache.nbytes if cache else 0)

    def _new_cache(self, span: Span, msg: OpenSession) -> PagedCache:
        pool, fmt = self._pool_for(span)
        cache = PagedCache(pool, fmt, batch=msg.batch, max_len=msg.max_len)
        need = cache.pages_for(msg.max_len)
        if need > pool.capacity or pool.free_pages < msg.batch:
            self._metrics.inc("exec_refused_total", code="cache_exhausted")
            raise ExecRefused(
                "cache_exhausted",
                f"KV cache for batch {msg.batch} x {msg.max_len} tokens needs up to {need} "
                f"pages of {pool.page_bytes} bytes; the pool has {pool.free_pages} of "
                f"{pool.capacity} free (host budget {self._budget})",
            )
        return cache

    def _drop(self, key: tuple[bytes, bytes]) -> None:
        """Forget a session and give its pages back to the pool."""
        sess = self._sessions.pop(key, None)
        self._batcher.forget(key)  # no step of it to wait for
        if sess is None or sess.cache is None:
            return
        if sess.in_flight:  # a worker thread still writes its pages: release them after
            sess.dropped = True
        else:
            sess.cache.release()

    def close(self, peer: bytes, session_id: bytes) -> None:
        self._drop((peer, session_id))
        self._metrics.set("host_sessions", len(self._sessions))

    def reclaim_idle(self, idle_s: float) -> int:
        """Drop sessions unused for `idle_s`; returns how many."""
        cutoff = self._clock() - idle_s
        stale = [k for k, s in self._sessions.items() if s.last_used < cutoff]
        for k in stale:
            self._drop(k)
        if stale:
            log.info("sessions_reclaimed", count=len(stale), idle_s=idle_s)
            self._metrics.set("host_sessions", len(self._sessions))
        return len(stale)

    async def step(self, peer: bytes, msg: Step, payload: bytes) -> tuple[StepResult, Encoded]:
        """Apply one step (or answer a repeated one) and return the result and its tensor."""
        sess = self._sessions.get((peer, msg.session_id))
        if sess is None:
            raise ExecRefused("no_session", "no such session here (expired, reclaimed or failed)")
        async with sess.stepping:
            if sess.dropped:
                raise ExecRefused("no_session", "the session was dropped while this step waited")
            return await self._step(sess, peer, msg, payload)

    async def _step(
        self, sess: _Session, peer: bytes, msg: Step, payload: bytes
    ) -> tuple[StepResult, Encoded]:
        sess.last_used = self._clock()
        if msg.step_id < sess.next_step:
            if msg.step_id in sess.results:
                self._metrics.inc("exec_duplicate_steps_total")
                return sess.results[msg.step_id]
            raise ExecRefused("out_of_order", f"step {msg.step_id} is too old to answer again")
        if msg.step_id > sess.next_step:
            raise ExecRefused("out_of_order", f"expected step {sess.next_step}, got {msg.step_id}")
        if _reduces(msg) and sess.span.out_kind is not IOKind.LOGITS:
            span = sess.span
            self._metrics.inc("exec_refused_total", code="bad_input")
            raise ExecRefused(
                "bad_input",
                f"reduce {msg.reduce!r} needs a span ending at the model's LM head; atoms "
                f"{span.model_id}[{span.start},{span.end}) give {span.out_kind.value}",
            )
        try:
            x = tensor_of(msg.tensor, payload)
            ctx = self._context(sess, msg, x)
        except AtomError as exc:
            raise ExecRefused("bad_input", str(exc)) from None
        if sess.cache is not None:
            try:  # all pages of the step before anything is written: a refusal keeps it
                sess.cache.reserve(msg.position + ctx.positions.shape[1])
            except CacheExhausted as exc:
                self._metrics.inc("exec_refused_total", code="cache_exhausted")
                raise ExecRefused("cache_exhausted", str(exc)) from None
        result, enc = await self._compute(peer, sess, msg, x, ctx)
        sess.next_step += 1
        sess.results[msg.step_id] = (result, enc)
        while len(sess.results) > KEPT_RESULTS:
            sess.results.popitem(last=False)
        return result, enc

    def _context(self, sess: _Session, msg: Step, x: torch.Tensor) -> ForwardContext:
        if (
            x.dim() == 0
            or x.shape[0] > sess.batch
            or (sess.cache is not None and x.shape[0] != sess.batch)
        ):
            raise ExecRefused("bad_input", f"session batch is {sess.batch}, got {tuple(x.shape)}")
        tokens = x.shape[1] if sess.span.in_kind in (IOKind.IDS, IOKind.HIDDEN) else 1
        if x.shape[0] * tokens > self._max_step_tokens:
            raise ExecRefused(
                "bad_input",
                f"a step carries at most {self._max_step_tokens} "
                f"batch x tokens, got {x.shape[0] * tokens}",
            )
        if sess.cache is None and msg.position != 0 and sess.span.kv_layouts():
            raise ExecRefused(  # a span that keeps no KV (a head, a norm) runs at any position
                "bad_input",
                f"a session without a KV cache starts every step at position 0, got {msg.position}",
            )
        if sess.cache is not None and sess.cache.length != msg.position:
            raise ExecRefused(
                "out_of_order",
                f"cache holds {sess.cache.length} tokens, step starts at {msg.position}",
            )
        pad = None
        if msg.pad_mask:
            total = msg.position + tokens
            if len(msg.pad_mask) != x.shape[0] * total:
                raise ExecRefused(
                    "bad_input",
                    f"pad_mask: expected {x.shape[0] * total} bytes, got {len(msg.pad_mask)}",
                )
            pad = (
                torch.frombuffer(bytearray(msg.pad_mask), dtype=torch.uint8)
                .view(x.shape[0], total)
                .bool()
            )
        return ForwardContext.for_tokens(
            x.shape[0],
            tokens,
            start=msg.position,
            causal=msg.causal,
            pad_mask=pad,
            cache=sess.cache,
            logits_to_keep=1 if _reduces(msg) else 0,
        )

    async def _compute(
        self, peer: bytes, sess: _Session, msg: Step, x: torch.Tensor, ctx: ForwardContext
    ) -> tuple[StepResult, Encoded]:
        item = BatchItem(
            x=x, position=msg.position, causal=msg.causal, pad_mask=ctx.pad_mask, cache=sess.cache
        )
        kinds = (IOKind.IDS, IOKind.HIDDEN)
        step = BatchedStep(
            span=sess.span,
            item=item,
            single=lambda: sess.span(x, ctx),
            batchable=sess.span.in_kind in kinds and batchable(item),
            session=(peer, msg.session_id),
        )
        self.queued += 1
        self.load.queue(self.queued)
        self._metrics.set("host_queue_depth", self.queued)
        sess.in_flight = True
        try:
            out = await self._batcher.run(step)  # measures the step's queue and compute time
        except (AtomError, ValueError, RuntimeError) as exc:
            self._drop((peer, msg.session_id))  # its cache may be half-written
            code = "cache_exhausted" if isinstance(exc, CacheExhausted) else "bad_input"
            if isinstance(exc, CacheNotReady):
                code = "internal"
            self._metrics.inc("exec_refused_total", code=code)
            raise ExecRefused(code, f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # cleanup, then re-raise: not a boundary
            self._drop((peer, msg.session_id))  # half-written cache: unusable
            raise
        finally:
            self.queued -= 1
            self._metrics.set("host_queue_depth", self.queued)
            sess.in_flight = False
            if sess.dropped and sess.cache is not None:
                sess.cache.release()
        queued_at, started, done = step.queued_at, [step.started], step.finished
        tokens = x.shape[0] * (
            x.shape[1] if sess.span.in_kind in (IOKind.IDS, IOKind.HIDDEN) else 1
        )
        self.profile.observe(
            sess.span.model_id, len(sess.span.atom_list()), tokens, done - started[0]
        )
        # a reduction runs per session, after the (maybe batched) forward
        argmax = _reduces(msg) and msg.reduce == "argmax"
        enc = self._reduced(peer, msg, out) if argmax else encode(out, sess.reply_codec)
        queue_s = started[0] - queued_at if started else 0.0
        self._metrics.inc("exec_steps_total", model=sess.span.model_id)
        result = StepResult(
            session_id=msg.session_id,
            step_id=msg.step_id,
            tensor=header_of(enc),
            compute_s=done - started[0],
            queue_s=queue_s,
        )
        return result, enc

    def _reduced(self, peer: bytes, msg: Step, out: torch.Tensor) -> Encoded:
        """The argmax of `out`'s last position, in the exact `raw` codec (token ids never
        pass a lossy codec). Non-finite logits are refused, as the origin would refuse them
        in full (its check cannot see them once reduced), and the session is dropped."""
        last = out[:, -1] if out.dim() == 3 else out
        if not all_finite(last):
            self._drop((peer, msg.session_id))
            self._metrics.inc("exec_refused_total", code="internal")
            raise ExecRefused("internal", "the step's logits hold NaN or Inf")
        return encode(argmax_last(out), "raw")

    async def serve(
        self, channel: ExecChannel, *, idle_timeout_s: float, train: TrainHandler | None = None
    ) -> None:
        """Answer one origin's stream until it closes, idles out, or misbehaves.

        Args:
            train: handles the training records (`exec.train_host.TrainHost`); None
                refuses them.

        Error handling: refusals go back as `ExecFailure`; a peer protocol error (bad
        signature, malformed record) or a broken stream ends the loop and propagates to the
        caller, which scores the peer and closes the stream.
        """
        self._idle_s = idle_timeout_s
        error: MeshError | None = None
        async with trio.open_nursery() as steps:
            try:
                await self._receive_loop(channel, steps, idle_timeout_s, train)
            except MeshError as exc:  # re-raised below as itself (not in a group) for the
                error = exc  # caller, which tells protocol errors from broken streams
                steps.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _receive_loop(
        self,
        channel: ExecChannel,
        steps: trio.Nursery,
        idle_timeout_s: float,
        train: TrainHandler | None,
    ) -> None:
        """`serve`'s loop. Steps run as tasks of `steps`, at most `max_sessions` of this
        channel at once and `MAX_IN_FLIGHT_BYTES` of their payloads beyond the first (then
        the loop waits before reading on): a forwarding host sends
        every session's steps to the next host on one channel, and steps of different
        sessions must reach the batcher together to be batched. The rest runs in order."""
        peer = channel.stream.remote_id
        slots = InFlight(steps=self._max_sessions, budget_bytes=MAX_IN_FLIGHT_BYTES)
        # the last step read of each session: a session's steps run in the order read (a
        # replay sends many at once), steps of different sessions side by side
        tails: dict[tuple[bytes, bytes], trio.Event] = {}
        while True:
            try:
                msg, payload = await channel.receive(timeout_s=idle_timeout_s)
            except MeshError as exc:
                if isinstance(exc, PeerProtocolError):
                    raise
                return  # idle or gone: sessions stay until reclaimed, a new stream may resume
            if isinstance(msg, Step):
                await slots.admit(len(payload))
                key = (msg.origin or peer, msg.session_id)
                after, done = tails.get(key), trio.Event()
                tails[key] = done
                steps.start_soon(
                    self._serve_step, channel, peer, msg, payload, key, after, done, slots, tails
                )
                continue
            try:
                if isinstance(msg, OpenSession):
                    await channel.send(await self.open(peer, msg))
                    self._sessions[(peer, msg.session_id)].channel = channel
                elif isinstance(msg, CloseSession):
                    self.close(peer, msg.session_id)
                elif train is not None:
                    for reply, tensor in await train.handle(peer, msg, payload):
                        await channel.send(reply, tensor)
                else:
                    raise ExecRefused(
                        "bad_input", f"{type(msg).__name__}: this host does not train"
                    )
            except ExecRefused as exc:
                sid = getattr(msg, "session_id", b"")
                step_id = getattr(msg, "step_id", -1)
                log.info("exec_refused", peer=peer.hex()[:8], code=exc.code, reason=str(exc))
                await channel.send(ExecFailure(sid, step_id, exc.code, str(exc)))

    async def _serve_step(
        self,
        channel: ExecChannel,
        peer: bytes,
        msg: Step,
        payload: bytes,
        key: tuple[bytes, bytes],
        after: trio.Event | None,
        done: trio.Event,
        slots: InFlight,
        tails: dict[tuple[bytes, bytes], trio.Event],
    ) -> None:
        """One step read by `serve` (its session's `key` in `tails`), once the step of its
        session read before it is done (`after`): applied and answered (a refusal goes back as `ExecFailure`); a broken
        channel only ends this step's answer."""
        try:
            if after is not None:
                await after.wait()
            if msg.origin and msg.origin != peer:
                await self._forwarded(peer, msg, payload)
                return
            try:
                result, enc = await self.step(peer, msg, payload)
                await self._answer(channel, peer, msg, result, enc)
            except ExecRefused as exc:
                log.info("exec_refused", peer=peer.hex()[:8], code=exc.code, reason=str(exc))
                await channel.send(ExecFailure(msg.session_id, msg.step_id, exc.code, str(exc)))
        except MeshError as exc:  # the stream broke or closed: the loop ends on its next read
            log.info("step_answer_lost", peer=peer.hex()[:8], reason=str(exc))
        finally:
            done.set()
            if tails.get(key) is done:
                del tails[key]
            slots.release(len(payload))

    # ---- forwarding (wire Rule 5) ----------------------------------------------------------

    async def _forwarded(self, peer: bytes, msg: Step, payload: bytes) -> None:
        """A step another host forwards into a session `msg.origin` opened here: applied
        only with that session's forward token; answered on the origin's channel, never to
        the forwarding host (a refusal too: the origin decides what to do)."""
        sess = self._sessions.get((msg.origin, msg.session_id))
        token = sess.opened.forward_token if sess is not None else b""
        if sess is None or sess.channel is None or not token:
            reason = "no such session with forwarding here"
        elif not hmac.compare_digest(token, msg.token):
            reason = "wrong forward token"
        else:
            reason = ""
        if reason or sess is None or sess.channel is None:
            self._metrics.inc("exec_refused_total", code="forward_refused")
            log.info("forward_refused", peer=peer.hex()[:8], reason=reason)
            return
        try:
            try:
                result, enc = await self.step(msg.origin, msg, payload)
            except ExecRefused as exc:
                log.info("exec_refused", peer=peer.hex()[:8], code=exc.code, reason=str(exc))
                await sess.channel.send(
                    ExecFailure(msg.session_id, msg.step_id, exc.code, str(exc))
                )
                return
            await self._answer(sess.channel, msg.origin, msg, result, enc)
        except MeshError as exc:  # the origin's channel broke: it fails this hop over
            log.info("forward_answer_lost", origin=msg.origin.hex()[:8], reason=str(exc))

    async def _answer(
        self, channel: ExecChannel, owner: bytes, msg: Step, result: StepResult, enc: Encoded
    ) -> None:
        """Send the step's output on to the next hop of `msg.route` (the critical path),
        then the result to the origin (its copy, for replay and spot checks)."""
        if msg.route:
            error = await self._forward(owner, msg, result, enc)
            if error:
                result = replace(result, forward_error=error[:200])
        await channel.send(result, enc)

    async def _forward(self, owner: bytes, msg: Step, result: StepResult, enc: Encoded) -> str:
        """Send the output to `msg.route[0]`; "" when sent, else why not (one re-dial)."""
        nxt = msg.route[0]
        step = Step(
            session_id=nxt.session_id,
            step_id=nxt.step_id,
            position=msg.position,
            causal=msg.causal,
            tensor=result.tensor,
            pad_mask=msg.pad_mask,
            route=msg.route[1:],
            origin=owner,
            token=nxt.token,
            reduce=msg.reduce,  # applied by the route's last host only
        )
        if self.dial is None:
            return "this host does not forward"
        error = ""
        for fresh in (False, True):
            try:
                channel = await self._forward_channel(nxt.host, fresh=fresh)
                await channel.send(step, enc)
            except (MeshError, NexusError, OSError, ValueError) as exc:  # e.g. our own id
                self._forward_to.pop(nxt.host, None)
                error = f"to {nxt.host.hex()[:8]}: {type(exc).__name__}: {exc}"
                continue
            self._metrics.inc("exec_forwarded_total")
            return ""
        log.info("forward_failed", reason=error)
        self._metrics.inc("exec_forward_failures_total")
        return error

    async def _forward_channel(self, host: bytes, *, fresh: bool) -> ExecChannel:
        """A channel to `host`, reused while the host would not have closed it as idle."""
        assert self.dial is not None
        async with self._dialing:  # steps forward side by side: one dial, no orphan channel
            now = self._clock()
            cached = self._forward_to.pop(host, None)
            if cached is not None and not fresh and now - cached[1] < self._idle_s / 2:
                channel = cached[0]
            else:
                if cached is not None:
                    await cached[0].aclose()
                channel = await self.dial(host)
            self._forward_to[host] = (channel, now)
            return channel
