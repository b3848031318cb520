"""The daemon: composes the node's services under one nursery and one lifetime.

Rule 1: one daemon per data directory, enforced by an exclusive lock taken before anything
else is touched; a second daemon is refused with the holder's pid.
Rule 2: shutdown is graceful and bounded: a stop request (signal or API) first drains (no
new jobs, running ones may finish) for at most `node.shutdown_grace_s`, then cancels
everything; a second signal cancels at once.
Rule 3: SIGHUP (`systemctl reload`) re-reads the config and applies what is safe while
running: `log.level`, and entries added to `atoms.host` (hosted at once). Anything else
that changed (ports, keys, budgets, removed spans) is named in a warning: it takes a
restart. A config that does not load is logged and the running one is kept.
Rule 4: once serving, the heap built at start-up (torch, libp2p and the hosted spans:
~280k tracked objects) is moved out of the garbage collector's sight (`gc.freeze` after
one collection). A full collection walked all of it with the event loop stopped: 0.24 s
every few minutes of serving under 8 concurrent generations (0.04 s frozen), and at exit
(SIGTERM to exit ~1.0 s, 0.4-0.5 s frozen).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import structlog
import torch
import trio

from mesh.hlc import HybridClock
from mesh.identity import EnvelopeVerifier
from mesh.state import HostedSpan, NodeState

from .. import __version__
from ..api.records import (
    HostRequest,
    OkReply,
    ProgressEvent,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
)
from ..api.server import ApiServer, Emit
from ..config import Config, ExecConfig
from ..errors import NEXUS_ERRORS, AlreadyRunning, ApiError
from ..exec.adaptive import codec_policy_of
from ..exec.hosting import SpanHost, warm_up
from ..exec.planner import MeshView
from ..exec.profile import measure_step
from ..exec.train_host import TrainHost
from ..exec.verify import VerifyPolicy
from ..exec.wire import Signer
from ..jobs.engine import JobEngine, TrainingSetup
from ..jobs.journal import Journal
from ..jobs.service import JobService
from ..logging import set_level
from ..metrics import Metrics, serve_metrics
from ..model_files import weight_files
from ..model_registry import ModelRegistry, parse_host_spec
from ..paths import NodePaths, ensure_private_dir
from .auto_host import DaemonHoster, bottleneck_rows
from .files import MeshInfo, load_name, load_node_key
from .mesh_service import MeshApi, MeshService, NodeView
from .models_service import ModelsDaemonSide, ModelsService, Progress
from .placement_service import PlacementService, weight_memory_budget

log = structlog.get_logger(__name__)
_RELOADABLE = frozenset({("log", "level"), ("atoms", "host")})  # what SIGHUP applies


@contextmanager
def node_lock(paths: NodePaths) -> Iterator[IO[str]]:
    """Hold the data directory's exclusive lock for the lifetime of the block.

    Raises:
        AlreadyRunning: another process holds it (its pid is in the message).
    """
    ensure_private_dir(paths.data_dir)
    fh = open(paths.lock_file, "a+")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise AlreadyRunning(
                f"another nexusd (pid {holder}) is running with data dir {paths.data_dir}"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield fh
    finally:
        fh.close()


def _settle_heap() -> None:
    """Rule 4: collect the start-up garbage once, then freeze what is left: later
    collections walk only what the node allocates while it serves."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "heap_settled",
        frozen_objects=gc.get_freeze_count(),
        collect_ms=round((time.perf_counter() - t0) * 1e3, 1),
    )


def verify_policy(cfg: ExecConfig) -> VerifyPolicy | None:
    """The origin's spot-check policy from [exec]; None when it checks nothing."""
    policy = VerifyPolicy(
        rate=cfg.verify_rate,
        first_steps=cfg.verify_first_steps,
        tol_fp32=cfg.verify_tol_fp32,
        tol_bf16=cfg.verify_tol_bf16,
        beside=cfg.verify_beside,
    )
    return policy if policy.enabled else None


def train_verify_policy(cfg: Config) -> VerifyPolicy | None:
    """The origin's spot-checks of training hosts ([train] verify_*, [exec] tolerances)."""
    policy = VerifyPolicy(
        rate=cfg.train.verify_rate,
        first_steps=cfg.train.verify_first_micro_batches,
        tol_fp32=cfg.exec.verify_tol_fp32,
        tol_bf16=cfg.exec.verify_tol_bf16,
    )
    return policy if policy.enabled else None


class Daemon:
    """One node: key, local API, metrics, hosted spans, job engine and (when set up) mesh."""

    def __init__(self, cfg: Config, paths: NodePaths) -> None:
        self.cfg = cfg
        self.paths = paths
        self.metrics = Metrics()
        self.key = load_node_key(paths)
        self.name = load_name(paths, cfg)
        self.mesh_info = MeshInfo.load(paths.mesh_file)
        self.started_at = time.monotonic()
        self._stop = trio.Event()
        self._config_spans: set[str] = set()  # atoms.host entries hosted (start or reload)
        self._reloading = trio.Lock()  # one SIGHUP reload at a time
        self.files = weight_files(paths, seal_new=not cfg.atoms.models_dir)
        self.registry = ModelRegistry(
            Path(cfg.atoms.models_dir) if cfg.atoms.models_dir else paths.models_dir,
            reader=self.files.read,
        )
        self.limiter = trio.CapacityLimiter(1)  # one device: torch work runs one at a time
        self.host = SpanHost(
            [],
            kv_budget_bytes=cfg.atoms.kv_cache_budget_bytes,
            max_sessions=cfg.atoms.max_sessions,
            limiter=self.limiter,
            metrics=self.metrics,
            max_step_tokens=cfg.atoms.max_step_tokens,
            kv_page_tokens=cfg.atoms.kv_page_tokens,
            batch_window_s=cfg.exec.batch_window_ms / 1000,
            inline_max_s=cfg.exec.inline_step_max_ms / 1000,
        )
        self.signer = Signer(self.key, HybridClock(max_drift_s=cfg.mesh.max_clock_drift_s))
        self.verifier = EnvelopeVerifier(
            clock=self.signer.clock,
            window_s=cfg.mesh.envelope_window_s,
            max_body_bytes=cfg.mesh.max_frame_bytes,
            replay_capacity=cfg.mesh.replay_cache_entries,
        )
        self.trainer = TrainHost(
            self.host.span_for,
            limiter=self.limiter,
            metrics=self.metrics,
            graph_budget_bytes=cfg.train.graph_budget_bytes,
            max_sessions=cfg.train.max_sessions,
        )
        self.mesh = MeshService(
            cfg,
            paths,
            self.signer,
            self.host,
            self.metrics,
            self.verifier,
            self.name,
            trainer=self.trainer,
        )
        self.view: MeshView = NodeView(self.mesh)
        self.placement = PlacementService(  # "MODEL:auto" spans (`--auto`)
            DaemonHoster(self),
            lambda: self.mesh.node,
            memory_bytes=weight_memory_budget(cfg.atoms),
            interval_s=cfg.atoms.placement_interval_s,
            threshold=cfg.atoms.rebalance_threshold,
        )
        self.mesh.swarm_report = lambda: bottleneck_rows(self.placement, self.mesh.node)
        training = TrainingSetup(
            host=self.trainer,
            limiter=self.limiter,
            folder=paths.data_dir / "train",
            timeout_s=cfg.train.op_timeout_s,
            graph_budget_bytes=cfg.train.graph_budget_bytes,
            route_wait_s=cfg.train.route_wait_s,
            verify=train_verify_policy(cfg),
        )
        self.engine = JobEngine(
            view=self.view,
            host=self.host,
            registry=self.registry,
            signer=self.signer,
            verifier=self.verifier,
            metrics=self.metrics,
            step_timeout_s=cfg.mesh.read_timeout_s,
            training=training,
            verify=verify_policy(cfg.exec),
            codec_policy=codec_policy_of(cfg.exec),
            forward=cfg.exec.forward_mode == "forward",
            host_argmax=cfg.exec.host_argmax,
        )
        self.journal = Journal(paths.jobs_db)
        self.jobs = JobService(self.engine, self.journal, self.metrics)
        self.api = ApiServer(
            paths.socket,
            max_request_bytes=cfg.api.max_request_bytes,
            request_timeout_s=cfg.api.request_timeout_s,
            max_clients=cfg.api.max_clients,
            metrics=self.metrics,
        )
        self.api.route(StatusRequest, self._status)
        self.api.route(ShutdownRequest, self._shutdown)
        self.api.route(HostRequest, self._host_request)
        self.jobs.register(self.api)
        MeshApi(self.mesh, paths, self._joined).register(self.api)
        self.models = ModelsService(
            cfg, self.registry, self.files, self.metrics, lambda: self.mesh.node
        )
        self.model_side = ModelsDaemonSide(self.models, seal_new=not cfg.atoms.models_dir)
        self.model_side.attach(self.mesh, self.api, self.jobs)

    def __repr__(self) -> str:
        return f"Daemon(node={self.key.node_id.hex()[:8]}, data_dir={self.paths.data_dir})"

    def request_stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until a stop is requested, then drain for at most the grace period."""
        torch.set_num_threads(self.cfg.node.torch_threads)
        try:
            async with trio.open_nursery() as nursery:
                for spec in self.cfg.atoms.host:
                    await self.host_spec(spec)
                    self._config_spans.add(spec)
                await nursery.start(self.mesh.run)
                await nursery.start(self.model_side.run)
                await nursery.start(self.placement.run)
                await nursery.start(self.engine.run)
                await nursery.start(self.jobs.run)
                await nursery.start(self.api.run)
                if self.cfg.metrics.listen_port:
                    await nursery.start(
                        serve_metrics,
                        self.metrics,
                        self.cfg.metrics.listen_host,
                        self.cfg.metrics.listen_port,
                    )
                if self.cfg.api.http_port:
                    from ..http.server import start_http  # hypercorn loads only when enabled

                    await start_http(nursery, self)
                nursery.start_soon(self._reclaim_sessions)
                log.info(
                    "daemon_started",
                    node=self.key.node_id.hex()[:8],
                    name=self.name,
                    socket=str(self.api.path),
                    hosted=[f"{h.model_id}:{h.start}-{h.end}" for h in self.host.hosted()],
                    version=__version__,
                )
                _settle_heap()
                task_status.started()
                await self._stop.wait()
                grace = self.cfg.node.shutdown_grace_s
                log.info("daemon_stopping", grace_s=grace, running_jobs=self.jobs.running)
                self.mesh.refresh_advert(NodeState.DRAINING)
                with trio.move_on_after(grace):
                    await self.jobs.drain()
                nursery.cancel_scope.cancel()
        finally:
            self.journal.close()
        log.info("daemon_stopped")

    async def host_span(
        self, spec: str, dtype: str = "", on_progress: Progress | None = None
    ) -> HostedSpan:
        """Load and serve "MODEL" or "MODEL:START-END" (weights verified by digest), in
        `dtype` (default: the node's atoms.dtype); weights this node lacks are fetched from
        peers first (`ModelsService.fetch_span`, progress to `on_progress`)."""
        await self.models.ensure_model(spec.partition(":")[0])
        model_id, start, end = await trio.to_thread.run_sync(parse_host_spec, spec, self.registry)
        await self.models.fetch_span(model_id, start, end, on_progress)
        span = await trio.to_thread.run_sync(
            self.registry.load_span, model_id, start, end, dtype or self.cfg.atoms.dtype
        )
        warm_s = await trio.to_thread.run_sync(warm_up, span, limiter=self.limiter)
        step_s = await trio.to_thread.run_sync(measure_step, span, limiter=self.limiter)
        self.host.profile.seed(model_id, step_s)
        hosted = self.host.add_span(span)
        self.mesh.refresh_advert()
        log.info(
            "span_hosted",
            model=model_id,
            start=start,
            end=end,
            warm_up_ms=round(warm_s * 1e3, 1),
            ms_per_atom=round(step_s * 1e3, 3),
        )
        return hosted

    async def host_spec(self, spec: str, dtype: str = "") -> str:
        """Host "MODEL", "MODEL:START-END", or place "MODEL:auto" (the placement service
        picks the span, now and every `atoms.placement_interval_s`); returns what it did."""
        model_id, _, rng = spec.partition(":")
        if rng == "auto":
            await trio.to_thread.run_sync(self.registry.manifest, model_id)  # known here?
            self.placement.add(model_id)
            return f"placing {model_id} automatically (where the swarm needs it)"
        hosted = await self.host_span(spec, dtype)
        return f"hosting {hosted.model_id} atoms [{hosted.start},{hosted.end})"

    async def _fetch_for(self, spec: str, emit: Emit) -> None:
        """Fetch the weights `spec` needs before hosting it, progress as `ProgressEvent`s
        ("weights", bytes done of total) for the CLI's bar."""
        model_id, _, rng = spec.partition(":")
        if rng == "auto":
            return
        await self.models.ensure_model(model_id)
        model_id, start, end = await trio.to_thread.run_sync(parse_host_spec, spec, self.registry)
        send, recv = trio.open_memory_channel[tuple[int, int]](1)

        def progress(done: int, total: int) -> None:
            with contextlib.suppress(trio.WouldBlock):  # the bar catches up with the next
                send.send_nowait((done, total))

        async def forward() -> None:
            async for done, total in recv:
                await emit(ProgressEvent("weights", done, total, "fetching weights"))

        failed: ApiError | None = None
        fetched = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            with send:
                try:
                    fetched = await self.models.fetch_span(model_id, start, end, progress)
                except ApiError as exc:  # raised as itself, not in the nursery's group
                    failed = exc
        if failed is not None:
            raise failed
        if fetched:
            await emit(ProgressEvent("weights", fetched, fetched, "fetched"))

    async def reload(self, new: Config) -> None:
        """Apply a re-read config (SIGHUP, see Rule 3)."""
        async with self._reloading:
            await self._reload(new)

    async def _reload(self, new: Config) -> None:
        set_level(new.log.level)
        for spec in new.atoms.host:
            if spec in self._config_spans:
                continue
            try:
                await self.host_spec(spec)
            except NEXUS_ERRORS as exc:  # ApiError included (bad spec, unknown model)
                log.error("reload_host_failed", spec=spec, reason=str(exc))
                continue
            self._config_spans.add(spec)
        old, fresh = dataclasses.asdict(self.cfg), dataclasses.asdict(new)
        restart = sorted(
            f"{section}.{key}"
            for section, values in fresh.items()
            for key, value in values.items()
            if value != old[section][key] and (section, key) not in _RELOADABLE
        )
        unhost = sorted(self._config_spans - set(new.atoms.host))
        log.info(
            "config_reloaded",
            log_level=new.log.level,
            hosted=[f"{h.model_id}:{h.start}-{h.end}" for h in self.host.hosted()],
        )
        if restart or unhost:
            log.warning("config_reload_needs_restart", keys=restart, still_hosted=unhost)

    def _joined(self) -> None:
        self.mesh_info = MeshInfo.load(self.paths.mesh_file)
        self.model_side.joined(self.paths.mesh_secret.read_bytes())

    async def _reclaim_sessions(self) -> None:
        idle = self.cfg.atoms.session_idle_s
        while True:
            await trio.sleep(idle / 4)  # periodic housekeeping, not a wait for a condition
            self.host.reclaim_idle(idle)
            self.trainer.reclaim_idle(max(idle, self.cfg.train.op_timeout_s))

    async def _status(self, _req: StatusRequest, _emit: Emit) -> StatusReply:
        node = self.mesh.node
        return StatusReply(
            node_id=self.key.node_id.hex(),
            name=self.name,
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            data_dir=str(self.paths.data_dir),
            socket_path=str(self.api.path),
            mesh_id=self.mesh_info.mesh_id if self.mesh_info else "",
            listen_addrs=tuple(node.transport.listen_addrs()) if node else (),
            peers_connected=len(node.connected()) if node else 0,
            members=len(node.members()) if node else 0,
            hosted=tuple(f"{h.model_id}:{h.start}-{h.end}" for h in self.host.hosted()),
        )

    async def _shutdown(self, _req: ShutdownRequest, _emit: Emit) -> OkReply:
        self.request_stop()
        return OkReply("stopping")

    async def _host_request(self, req: HostRequest, emit: Emit) -> OkReply:
        await self._fetch_for(req.spec, emit)
        return OkReply(await self.host_spec(req.spec, req.dtype))


async def run_daemon(
    cfg: Config, paths: NodePaths, reload_config: Callable[[], Config] | None = None
) -> None:
    """`nexusd run`: hold the lock, run the daemon, stop on SIGINT/SIGTERM, reload on SIGHUP.

    The first SIGINT/SIGTERM asks for a graceful stop; a second one cancels at once.
    SIGHUP calls `reload_config` (off the event loop) and applies the result (Rule 3); a
    config that fails to load is logged, the running one stays.
    """
    with node_lock(paths):
        daemon = Daemon(cfg, paths)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def reload() -> None:
                    if reload_config is None:
                        log.warning("config_reload_unavailable")
                        return
                    try:
                        new = await trio.to_thread.run_sync(reload_config)
                    except NEXUS_ERRORS as exc:  # ConfigError: keep the running config
                        log.error("config_reload_failed", reason=str(exc))
                        return
                    await daemon.reload(new)

                async def watch_signals() -> None:
                    count = 0
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        if signum == signal.SIGHUP:
                            nursery.start_soon(reload)
                            continue
                        count += 1
                        if count == 1:
                            daemon.request_stop()
                        else:
                            nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                await daemon.run()
                nursery.cancel_scope.cancel()
