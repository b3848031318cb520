"""Running jobs across the mesh: generation, embeddings, zero-shot classification.

Rule 1: the engine is the origin of every job it runs: it tokenises, plans a route through
`MeshView`, drives a `RoutedSession` per stream of work, and turns outputs into replies.
Rule 2: it never trusts what it cannot check: parameters are validated before anything
runs (`bad_request` names the parameter), outputs are checked by the session.
Rule 3: every reply carries the route and per-hop compute / queue / transfer time.
Rule 4: batch work (embeddings) keeps several micro-batches in flight, one session each,
so different hosts compute at the same time (pipeline parallelism), and batch routes are
sampled among near-best replicas so concurrent clients spread out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
import torch
import trio

from atoms.atom import ForwardContext
from atoms.codecs import wire_bytes
from atoms.generation import Done, GenerationParams, StepRequest, TokenGenerator
from mesh.closing import close_bounded
from mesh.errors import MeshError
from mesh.identity import EnvelopeVerifier

from ..api.records import (
    ClassifyReply,
    ClassifyRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    HopReport,
    ProgressEvent,
    RouteEvent,
    RouteHop,
    TokenEvent,
    TrainReply,
    TrainRequest,
)
from ..errors import NEXUS_ERRORS, ApiError, NexusError, first_in_group
from ..exec.adaptive import AUTO, JOB_CODECS, CodecPolicy, hop_codec, tolerance_codec
from ..exec.hosting import SpanHost
from ..exec.planner import MeshView, make_planner
from ..exec.session import (
    CheckFailed,
    Hop,
    HopFailed,
    HopPlan,
    JobFailed,
    LocalHop,
    Planner,
    RemoteHop,
    RoutedSession,
    StepInput,
    Verification,
)
from ..exec.train_host import TrainHost, local_link
from ..exec.train_origin import NonFiniteStep, TrainHop, channel_link
from ..exec.train_wire import TRAIN_ORIGIN_INBOUND
from ..exec.verify import VerifyPolicy
from ..exec.wire import ORIGIN_INBOUND, ExecChannel, Signer
from ..metrics import Metrics
from ..model_registry import ModelRegistry, TrainedHead
from .costs import HopCosts
from .distill import distill as run_distill
from .judges import Judges
from .training import Mesh as TrainMesh
from .training import train as run_training

log = structlog.get_logger(__name__)

Emit = Callable[[object], Awaitable[None]]
MAX_TEXTS = 10_000
MAX_LABELS = 1_000
MAX_TEXT_CHARS = 100_000
MAX_NEW_TOKENS = 4096
SESSION_CLOSE_S = 5.0  # closing every hop of a job's session (each bounded on its own)


class JobEngine:
    """Runs jobs from this node (the origin) over the mesh.

    Args:
        view: the mesh as the engine sees it (`NodeView`).
        host: this node's own span host (used directly for local hops).
        registry: model folders and tokenizers.
        signer, verifier: for exec channels to remote hosts.
        step_timeout_s: deadline of one hop's answer (a frozen host is failed over).
        training: this node's training host and limits; None: no training jobs.
        verify: spot-checks of the hosts a session goes through ([exec] verify_*); None: none.
        codec_policy: how a job with codec "auto" picks each hop's codec ([exec] slow_link_*).
        host_argmax: greedy generation asks the LM head's host for the next token instead of
            the logits ([exec] host_argmax; exec/wire.py Rule 6).
    """

    def __init__(
        self,
        *,
        view: MeshView,
        host: SpanHost,
        registry: ModelRegistry,
        signer: Signer,
        verifier: EnvelopeVerifier,
        metrics: Metrics,
        step_timeout_s: float,
        rng: random.Random | None = None,
        training: TrainingSetup | None = None,
        verify: VerifyPolicy | None = None,
        codec_policy: CodecPolicy | None = None,
        forward: bool = False,
        host_argmax: bool = True,
    ) -> None:
        self.view = view
        self._host_argmax = host_argmax
        self._forward = forward  # [exec] forward_mode = "forward" (exec/wire.py Rule 5)
        self.host = host
        self.registry = registry
        self._signer = signer
        self._verifier = verifier
        self._metrics = metrics
        self._timeout = step_timeout_s
        self._rng = rng or random.Random()
        self.training = training
        self._verify = verify
        self._codec_policy = codec_policy or CodecPolicy()
        self.judges = Judges(registry)  # spot checks' own computation
        # As a host in another origin's forward-mode route, ours sends its outputs on to the
        # next host over the channels this opens (exec/wire.py Rule 5).
        host.dial = self._host_channel

    async def _host_channel(self, peer: bytes) -> ExecChannel:
        """A channel from our host to another host, for forwarded steps (it only sends)."""
        stream = await self.view.open_exec_stream(peer)
        return ExecChannel(
            stream, self._signer, self._verifier, self.view.is_member, ORIGIN_INBOUND
        )

    def __repr__(self) -> str:
        return f"JobEngine(node={self.view.node_id.hex()[:8]}, models={self.registry.available()})"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that background work (a spot check's judge loading) runs in.
        Without it every judge loads when a check needs it."""
        await self.judges.run(task_status=task_status)

    # ---- sessions ------------------------------------------------------------------------

    def _session(
        self,
        model_id: str,
        *,
        n_atoms: int,
        batch: int,
        max_len: int,
        bytes_per_hop: int,
        kind: Literal["latency", "batch"],
        codec: str,
        on_route: Callable[[list[HopPlan], str], None] | None = None,
        last_only: bool = False,
        spawn: Callable[..., object] | None = None,
        rerun: CheckFailed | None = None,
    ) -> RoutedSession:
        plan = make_planner(
            self.view,
            model_id=model_id,
            bytes_per_hop=bytes_per_hop,
            kv_tokens=max_len,
            kind=kind,
            rng=self._rng,
        )

        async def make_hop(p: HopPlan) -> Hop:
            if p.host == self.view.node_id:
                return LocalHop(p, model_id, self.host, self.view.node_id)
            channel = await self._open_channel(p.host)
            chosen = self._hop_codec(codec, p.host, bytes_per_hop)
            return RemoteHop(p, model_id, channel, step_timeout_s=self._timeout, codec=chosen)

        async def arbiter(
            start: int, end: int, inputs: list[StepInput], batch: int, max_len: int, last: bool
        ) -> torch.Tensor:
            return await self.judges.output((model_id, start, end), inputs, batch, max_len, last)

        verify = (
            None
            if self._verify is None
            else Verification(
                policy=self._verify,
                arbiter=arbiter,
                codec=tolerance_codec(codec, self._codec_policy),
                trusted=self.view.node_id,
                rng=random.Random(self._rng.getrandbits(64)),
                on_check=lambda outcome: self._metrics.inc("verify_checks_total", outcome=outcome),
                judge_ready=lambda start, end: self.judges.ready((model_id, start, end)),
            )
        )
        return RoutedSession(
            n_atoms=n_atoms,
            plan=plan,
            make_hop=make_hop,
            report_failure=self._report,
            batch=batch,
            max_len=max_len,
            on_route=on_route,
            verify=verify,
            forward=self._forward,
            last_only=last_only,
            spawn=spawn if self._verify is not None and self._verify.beside else None,
            excluded=frozenset() if rerun is None else rerun.excluded,
            failovers=() if rerun is None else rerun.failovers,
        )

    def _hop_codec(self, codec: str, host: bytes, payload_bytes: int) -> str:
        """The wire codec of a remote hop to `host` (`exec.adaptive`; "auto" is logged and
        counted in wire_codec_hops_total)."""
        links = self.view.links()
        chosen = hop_codec(codec, links, self.view.node_id, host, self._codec_policy, payload_bytes)
        if codec == AUTO:
            log.info("hop_codec", host=self.view.name_of(host), codec=chosen)
            self._metrics.inc("wire_codec_hops_total", codec=chosen)
        return chosen

    async def _open_channel(self, host: bytes) -> ExecChannel:
        """An exec channel to `host` (the origin's side: replies of inference and training).

        Raises:
            HopFailed: the stream could not be opened.
        """
        try:
            stream = await self.view.open_exec_stream(host)
        except (ApiError, OSError) as exc:
            raise HopFailed(host, f"cannot open a stream: {exc}") from None
        except MeshError as exc:  # neither its direct channel nor libp2p answered
            raise HopFailed(
                host, f"cannot open a stream: {type(exc).__name__}: {exc}", penalty="unreachable"
            ) from None
        except Exception as exc:  # boundary: any transport failure is this hop's failure
            raise HopFailed(host, f"cannot open a stream: {type(exc).__name__}: {exc}") from None
        return ExecChannel(
            stream,
            self._signer,
            self._verifier,
            self.view.is_member,
            (*ORIGIN_INBOUND, *TRAIN_ORIGIN_INBOUND),
        )

    def _report(self, host: bytes, penalty: str, reason: str) -> None:
        """A hop failed and is blamed: count it, score `penalty` against the host."""
        self._metrics.inc("hop_failures_total", reason=penalty)
        if host != self.view.node_id:  # our own span failing is not a peer's misbehaviour
            log.warning("host_reported", host=host.hex()[:8], penalty=penalty, reason=reason)
            self.view.report(host, penalty)

    def route_event(self, job_id: str, hops: list[HopPlan], reason: str) -> RouteEvent:
        return RouteEvent(
            job_id,
            tuple(RouteHop(h.host.hex(), self.view.name_of(h.host), h.start, h.end) for h in hops),
            reason,
        )

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, req: GenerateRequest, job_id: str, emit: Emit) -> GenerateReply:
        """Generate text, streaming each token as a `TokenEvent`."""
        _check_codec(req.codec)
        info = self.registry.info(req.model)
        if not info.causal:
            raise ApiError(
                "bad_request",
                f"model {req.model} is an encoder ({info.family}); "
                "generation needs a decoder such as nexus-1.1",
            )
        if not 1 <= req.max_new_tokens <= MAX_NEW_TOKENS:
            raise ApiError(
                "bad_request",
                f"max_new_tokens: expected 1..{MAX_NEW_TOKENS}, got {req.max_new_tokens}",
            )
        if len(req.prompt) > MAX_TEXT_CHARS or not req.prompt:
            raise ApiError(
                "bad_request",
                f"prompt: expected 1..{MAX_TEXT_CHARS} characters, got {len(req.prompt)}",
            )
        try:
            params = GenerationParams(
                max_new_tokens=req.max_new_tokens,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                seed=req.seed,
                stop_sequences=req.stop,
                stop_token_ids=self.registry.eos_token_ids(req.model),
            )
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from None
        tok = self.registry.tokenizer(req.model)
        prompt_ids = tok.encode_prompt(req.prompt)  # [CLS] text: continued, not closed
        context = self.registry.config_int(
            req.model, "max_positions", 0
        ) or self.registry.config_int(req.model, "max_position_embeddings", 0)
        if context and len(prompt_ids) + req.max_new_tokens > context:
            raise ApiError(
                "bad_request",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                f"({req.max_new_tokens}) exceeds {req.model}'s context "
                f"of {context} positions",
            )
        if params.seed is None:  # a rerun (session Rule 7) must draw the same tokens
            params = dataclasses.replace(params, seed=self._rng.getrandbits(63))
        sent: list[int] = []  # the tokens the client has had, over every run
        rerun: CheckFailed | None = None
        t0 = time.perf_counter()
        while True:  # each rerun excludes one more host: bounded by the failover budget
            try:
                step, costs, session = await self._generation(
                    req, job_id, emit, params, prompt_ids, sent, rerun
                )
                break
            except CheckFailed as exc:
                log.warning("generation_rerun", job=job_id, step=exc.step, reason=str(exc))
                self._metrics.inc("jobs_reruns_total")
                rerun = exc
        elapsed = time.perf_counter() - t0
        self._metrics.inc("jobs_tokens_total", len(step.token_ids), model=req.model)
        return GenerateReply(
            job_id=job_id,
            model=req.model,
            text=step.text,
            token_ids=step.token_ids,
            stop_reason=step.reason.value,
            prompt_tokens=len(prompt_ids),
            elapsed_s=round(elapsed, 6),
            tokens_per_s=round(len(step.token_ids) / elapsed, 3) if elapsed else 0.0,
            route=costs.report(self.view.name_of),
            failovers=tuple(session.failovers),
        )

    async def _generation(
        self,
        req: GenerateRequest,
        job_id: str,
        emit: Emit,
        params: GenerationParams,
        prompt_ids: list[int],
        sent: list[int],
        rerun: CheckFailed | None,
    ) -> tuple[Done, HopCosts, RoutedSession]:
        """One run of a generation on a fresh session. A step's events are held until its
        checks pass (session.py Rule 7); `sent` grows by the tokens emitted, and a rerun
        emits none of those again (its tokens must equal them).

        Raises:
            CheckFailed: a check found a lie; rerun with it (the liar is excluded).
        """
        info = self.registry.info(req.model)
        tok = self.registry.tokenizer(req.model)
        pending: list[tuple[int, object]] = []  # (the step it came from, event)
        steps = 0
        made: list[int] = []  # this run's tokens

        def on_token(token: int, text: str) -> None:
            made.append(token)
            if len(made) > len(sent):
                pending.append((steps - 1, TokenEvent(job_id, token, text)))
            elif sent[len(made) - 1] != token:
                raise JobFailed(
                    f"a rerun after a failed check gave token {token} where the client "
                    f"already has {sent[len(made) - 1]} (position {len(made) - 1})"
                )

        gen = TokenGenerator(params, decode=tok.decode, on_token=on_token)
        hidden = self.registry.config_int(req.model, "hidden_size", 0)
        # greedy: the last host sends the argmax, 8 bytes, not the logits (wire Rule 6)
        reduce = self._host_argmax and params.greedy
        vocab = self.registry.config_int(req.model, "vocab_size", 0) if reduce else 0
        costs = HopCosts()
        try:
            async with trio.open_nursery() as checks:
                session = self._session(
                    req.model,
                    n_atoms=info.n_atoms,
                    batch=1,
                    max_len=len(prompt_ids) + req.max_new_tokens,
                    bytes_per_hop=wire_bytes(hidden, torch.float32, _sized(req.codec)),
                    kind="latency",
                    codec=req.codec,
                    on_route=lambda hops, why: pending.append(
                        (steps, self.route_event(job_id, hops, why))
                    ),
                    last_only=True,  # the next token reads the last position's logits alone
                    spawn=checks.start_soon,
                    rerun=rerun,
                )

                async def flush() -> None:  # token k's events go out while step k + 1 computes
                    confirmed = session.confirmed
                    while pending and pending[0][0] < confirmed:
                        event = pending.pop(0)[1]
                        if isinstance(event, TokenEvent):
                            sent.append(event.token_id)
                        await emit(event)

                try:
                    await session.open()
                    await flush()
                    step: StepRequest | Done = gen.start(prompt_ids)
                    while isinstance(step, StepRequest):
                        try:
                            out, timings = await session.step(
                                StepInput(step.input_ids(), step.start, True, b""),
                                argmax_vocab=vocab,
                                while_waiting=flush,
                            )
                        except CheckFailed:
                            raise
                        except NexusError:  # the checked tokens reach the client, then the error
                            with contextlib.suppress(CheckFailed):  # its steps stay unconfirmed
                                await session.settle()
                            await flush()
                            raise
                        steps += 1
                        costs.add(timings)
                        # int64: the token, picked by the last host; else logits (a checked step)
                        step = (
                            gen.feed_token(int(out[0]))
                            if out.dtype == torch.int64
                            else gen.feed(out)
                        )
                    await session.settle()
                    await flush()
                finally:
                    checks.cancel_scope.cancel()  # checks of a run that ended have no use
                    await close_bounded(session.close, SESSION_CLOSE_S)
        except BaseExceptionGroup as group:  # the run's own error, not the nursery's group
            raise _first_job_error(group) from None
        return step, costs, session

    # ---- embeddings ----------------------------------------------------------------------

    async def embed(self, req: EmbedRequest, job_id: str, emit: Emit) -> EmbedReply:
        """Embed texts, micro-batched, with several micro-batches in flight."""
        vectors, costs, failovers, elapsed = await self._embed_texts(
            req.model, req.texts, req.micro_batch, req.codec, job_id, emit
        )
        n, dims = vectors.shape
        return EmbedReply(
            job_id=job_id,
            model=req.model,
            count=n,
            dims=dims,
            vectors=vectors.contiguous().numpy().tobytes(),
            elapsed_s=round(elapsed, 6),
            texts_per_s=round(n / elapsed, 3) if elapsed else 0.0,
            route=costs.report(self.view.name_of),
            failovers=failovers,
        )

    async def _embed_texts(
        self,
        model_id: str,
        texts: Sequence[str],
        micro_batch: int,
        codec: str,
        job_id: str,
        emit: Emit,
        max_texts: int = MAX_TEXTS,
    ) -> tuple[torch.Tensor, HopCosts, tuple[str, ...], float]:
        _check_codec(codec)
        if not texts or len(texts) > max_texts:
            raise ApiError("bad_request", f"texts: expected 1..{max_texts}, got {len(texts)}")
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            raise ApiError("bad_request", f"texts: each at most {MAX_TEXT_CHARS} characters")
        if not 1 <= micro_batch <= 256:
            raise ApiError("bad_request", f"micro_batch: expected 1..256, got {micro_batch}")
        info = self.registry.info(model_id)
        if info.causal:
            raise ApiError(
                "bad_request",
                f"model {model_id} is a decoder; embeddings need an "
                "encoder with pooling such as minilm",
            )
        tok = self.registry.tokenizer(model_id)
        # Sort by length so micro-batches pad little; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
        hidden = self.registry.config_int(model_id, "hidden_size", 384)
        out: list[torch.Tensor | None] = [None] * len(texts)
        costs = HopCosts()
        failovers: list[str] = []
        done = 0
        lanes = min(3, len(batches))  # micro-batches in flight: enough to fill a 3-hop pipeline
        work: trio.MemorySendChannel[list[int]]
        work, todo = trio.open_memory_channel[list[int]](len(batches))
        for b in batches:
            work.send_nowait(b)
        work.close()
        t0 = time.perf_counter()

        async def lane() -> None:
            nonlocal done
            avg_tokens = 32
            session = self._session(
                model_id,
                n_atoms=info.n_atoms,
                batch=micro_batch,
                max_len=0,
                bytes_per_hop=wire_bytes(
                    micro_batch * avg_tokens * hidden, torch.float32, _sized(codec)
                ),
                kind="batch",
                codec=codec,
            )
            try:
                await session.open()
                async for idx in todo:
                    batch = tok.encode_batch([texts[i] for i in idx])
                    mask = batch.attention_mask.to(torch.uint8).contiguous().numpy().tobytes()
                    vec, timings = await session.step(StepInput(batch.ids, 0, False, mask))
                    costs.add(timings)
                    for row, i in enumerate(idx):
                        out[i] = vec[row].float()
                    done += len(idx)
                    await emit(ProgressEvent(job_id, done, len(texts), "embedding"))
            finally:
                failovers.extend(session.failovers)
                await close_bounded(session.close, SESSION_CLOSE_S)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(lanes):
                    nursery.start_soon(lane)
        except BaseExceptionGroup as group:  # a lane's failure is the job's: surface it as is
            raise _first_job_error(group) from None
        elapsed = time.perf_counter() - t0
        self._metrics.inc("jobs_texts_embedded_total", len(texts), model=model_id)
        vectors = torch.stack([v for v in out if v is not None])
        return vectors, costs, tuple(failovers), elapsed

    # ---- classification ------------------------------------------------------------------

    # ---- training ------------------------------------------------------------------------

    async def train(self, req: TrainRequest, job_id: str, emit: Emit) -> TrainReply:
        """Train over the mesh (jobs/training.py, distill: jobs/distill.py); the result is a
        new model on this node."""
        setup = self.training
        if setup is None:
            raise ApiError("unavailable", "this node runs no training jobs")

        def planner(model_id: str, bytes_per_hop: int) -> Planner:
            return make_planner(
                self.view,
                model_id=model_id,
                bytes_per_hop=bytes_per_hop,
                kv_tokens=0,
                kind="latency",
                rng=self._rng,
            )

        _check_codec(req.codec)
        hidden = self.registry.config_int(req.model, "hidden_size", 384)
        payload = req.micro_batch * req.seq_len * hidden * 4  # one stage boundary, float32

        async def connect(p: HopPlan, model_id: str) -> TrainHop:
            if p.host == self.view.node_id:
                return TrainHop(p, model_id, local_link(setup.host, p.host), remote=False)
            channel = await self._open_channel(p.host)
            return TrainHop(
                p,
                model_id,
                channel_link(channel, p.host, timeout_s=setup.timeout_s),
                remote=True,
                on_close=channel.aclose,
                codec=self._hop_codec(req.codec, p.host, payload),
            )

        mesh = TrainMesh(
            node_id=self.view.node_id,
            planner=planner,
            connect=connect,
            report=self._report,
            name_of=self.view.name_of,
            registry=self.registry,
            limiter=setup.limiter,
            metrics=self._metrics,
            graph_budget_bytes=setup.graph_budget_bytes,
            folder=setup.folder,
            route_wait_s=setup.route_wait_s,
            on_route=lambda hops, why: emit(self.route_event(job_id, hops, why)),
            verify=setup.verify,
        )
        try:
            run = run_distill if req.task == "distill" else run_training
            return await run(req, job_id, emit, mesh)
        except NonFiniteStep as exc:
            raise ApiError(
                "failed", f"{exc}; the last good checkpoint is kept in {setup.folder / job_id}"
            ) from None

    # ---- classification ------------------------------------------------------------------

    async def classify(self, req: ClassifyRequest, job_id: str, emit: Emit) -> ClassifyReply:
        """Zero-shot: embed texts and label descriptions, softmax over cosine similarity; a
        model trained by `train classify` instead runs its parent's embeddings over the mesh
        and its own head here."""
        # the request's size is checked before anything is looked up, for either kind of model
        shown = list(req.labels) if len(req.labels) <= 10 else f"{len(req.labels)} labels"
        if len(req.labels) > MAX_LABELS:
            raise ApiError(
                "bad_request", f"labels: expected 2..{MAX_LABELS} distinct labels, got {shown}"
            )
        if not req.texts or len(req.texts) > MAX_TEXTS:
            raise ApiError("bad_request", f"texts: expected 1..{MAX_TEXTS}, got {len(req.texts)}")
        head = self.registry.trained_head(req.model)
        if head is not None:
            return await self._classify_trained(req, job_id, emit, head)
        labels = tuple(lab.strip() for lab in req.labels if lab.strip())
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ApiError(
                "bad_request", f"labels: expected 2..{MAX_LABELS} distinct labels, got {shown}"
            )
        if "{}" not in req.template:
            raise ApiError("bad_request", "template: must contain {} where the label goes")
        prompts = [req.template.replace("{}", lab) for lab in labels]
        vectors, costs, _fo, elapsed = await self._embed_texts(
            req.model, [*req.texts, *prompts], 16, "raw", job_id, emit, MAX_TEXTS + MAX_LABELS
        )
        texts_v, labels_v = vectors[: len(req.texts)], vectors[len(req.texts) :]
        sims = (
            torch.nn.functional.normalize(texts_v, dim=-1)
            @ torch.nn.functional.normalize(labels_v, dim=-1).T
        )
        probs = torch.softmax(sims / 0.05, dim=-1)  # CLIP-style temperature over cosines
        return _softmax_reply(
            job_id, req.model, labels, probs, elapsed, costs.report(self.view.name_of)
        )

    async def _classify_trained(
        self, req: ClassifyRequest, job_id: str, emit: Emit, head: TrainedHead
    ) -> ClassifyReply:
        given = tuple(lab.strip() for lab in req.labels if lab.strip())
        if given and set(given) != set(head.labels):
            raise ApiError(
                "bad_request",
                f"labels: {req.model} was trained on {list(head.labels)}; "
                "leave labels out or give exactly these",
            )
        vectors, costs, _fo, elapsed = await self._embed_texts(
            head.parent, req.texts, 16, "raw", job_id, emit
        )
        span = await trio.to_thread.run_sync(
            self.registry.load_span, req.model, head.index, head.index + 1
        )

        def run() -> torch.Tensor:
            with torch.inference_mode():
                ctx = ForwardContext.for_tokens(vectors.shape[0], 1)
                return torch.softmax(span(vectors, ctx).float(), dim=-1)

        probs = await trio.to_thread.run_sync(
            run, limiter=self.training.limiter if self.training else None
        )
        return _softmax_reply(
            job_id, req.model, head.labels, probs, elapsed, costs.report(self.view.name_of)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSetup:
    """What the engine needs to run training jobs on this node."""

    host: TrainHost  # this node's own training sessions (local hops)
    limiter: trio.CapacityLimiter
    folder: Path  # checkpoints: folder/<job id>/
    timeout_s: float  # one training exchange with a host
    graph_budget_bytes: int
    route_wait_s: float = 60.0  # waiting for a route to appear (after a restart, a failover)
    verify: VerifyPolicy | None = None  # spot-checks of the hosts ([train] verify_*)


def _softmax_reply(
    job_id: str,
    model: str,
    labels: tuple[str, ...],
    probs: torch.Tensor,
    elapsed: float,
    route: tuple[HopReport, ...],
) -> ClassifyReply:
    predicted = tuple(labels[int(i)] for i in probs.argmax(dim=-1))
    scores = tuple(tuple(round(float(p), 6) for p in row) for row in probs)
    return ClassifyReply(
        job_id=job_id,
        model=model,
        labels=labels,
        predicted=predicted,
        scores=scores,
        elapsed_s=round(elapsed, 6),
        route=route,
    )


def _check_codec(codec: str) -> None:
    if codec not in JOB_CODECS:
        raise ApiError("bad_request", f"codec: expected one of {JOB_CODECS}, got {codec!r}")


def _sized(codec: str) -> str:
    """The codec a route's cost is estimated with ("auto": raw, the worst case)."""
    return "raw" if codec == AUTO else codec


def _first_job_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a job should fail with, from its lanes' exception group: an ApiError or
    other NEXUS error when there is one (the first), else the group itself (a bug)."""
    return first_in_group(group, (ApiError, *NEXUS_ERRORS)) or group
