"""The dashboard: one self-contained page (package data) and the JSON it polls.

Rule 1: the page needs nothing from the internet: its CSS and JS are inline, it draws with
SVG, and it reads only `GET /api/mesh` from the daemon that served it.
Rule 2: the JSON is built from the job API's own answers (`PeersRequest`, `JobsRequest`,
`ResultRequest`) and the job service's snapshot of running jobs; what is read is bounded
(jobs listed, routes looked up, loss points, metrics file bytes).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import structlog
import trio

from ..api.records import (
    JobsReply,
    JobsRequest,
    PeersReply,
    PeersRequest,
    ResultRequest,
    TrainReply,
)
from ..errors import ApiError
from ..jobs.service import RunningJob

log = structlog.get_logger(__name__)

DASHBOARD_HTML = files("nexusd.http").joinpath("static/dashboard.html").read_bytes()
RECENT_JOBS = 30
ROUTES_LOOKED_UP = 10  # finished jobs whose route (per-hop timings) the page shows
ROUTE_CACHE = 256
LOSS_POINTS = 500
MAX_METRICS_BYTES = 2 * 1024 * 1024

Call = Callable[[object, Callable[[object], Awaitable[None]]], Awaitable[object]]


class MeshSnapshot:
    """Builds the dashboard's JSON; finished jobs' routes are cached (they never change)."""

    def __init__(
        self, call: Call, running: Callable[[], list[RunningJob]], train_dir: Path
    ) -> None:
        self._call = call
        self._running = running
        self._train_dir = train_dir
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def __call__(self) -> dict[str, Any]:
        async def ignore(_event: object) -> None:
            return None

        members: list[dict[str, Any]] = []
        mesh_id, counters = "", {}
        try:
            peers = await self._call(PeersRequest(), ignore)
            if isinstance(peers, PeersReply):
                mesh_id = peers.mesh_id
                members = [dataclasses.asdict(p) for p in peers.peers]
                counters = dict(peers.counters)
        except ApiError as exc:  # the mesh transport is not up yet: show the jobs anyway
            log.debug("dashboard_no_peers", reason=exc.message)
        jobs = await self._call(JobsRequest(RECENT_JOBS), ignore)
        rows = jobs.jobs if isinstance(jobs, JobsReply) else ()
        running = {r.job_id: r for r in self._running()}
        recent: list[dict[str, Any]] = []
        looked_up = 0
        for row in rows:
            item = dataclasses.asdict(row)
            if row.state == "succeeded" and looked_up < ROUTES_LOOKED_UP:
                looked_up += 1
                item.update(await self._finished(row.job_id, row.kind))
            recent.append(item)
        return {
            "time_ms": int(time.time() * 1000),
            "mesh_id": mesh_id,
            "members": members,
            "counters": counters,
            "running": [_running_json(r) for r in running.values()],
            "recent": recent,
        }

    async def _finished(self, job_id: str, kind: str) -> dict[str, Any]:
        cached = self._done.get(job_id)
        if cached is not None:
            return cached

        async def ignore(_event: object) -> None:
            return None

        out: dict[str, Any] = {}
        try:
            reply = await self._call(ResultRequest(job_id), ignore)
        except ApiError as exc:
            log.debug("dashboard_no_result", job=job_id, reason=exc.message)
            return out
        route = getattr(reply, "route", ())
        out["route"] = [dataclasses.asdict(h) for h in route]
        for key in ("elapsed_s", "tokens_per_s", "texts_per_s"):
            if hasattr(reply, key):
                out[key] = getattr(reply, key)
        if isinstance(reply, TrainReply) and kind == "train":
            folder = Path(reply.checkpoint) if reply.checkpoint else self._train_dir / job_id
            out["losses"] = await trio.to_thread.run_sync(self._losses, folder)
            out["model"] = reply.model
        self._done[job_id] = out
        while len(self._done) > ROUTE_CACHE:
            self._done.popitem(last=False)
        return out

    def _losses(self, folder: Path) -> list[list[float]]:
        """[step, train_loss, val_loss (-1: none)] from a run's metrics.csv (its tail)."""
        path = folder / "metrics.csv"
        try:
            with open(path, "rb") as f:
                size = f.seek(0, io.SEEK_END)
                f.seek(max(0, size - MAX_METRICS_BYTES))
                text = f.read(MAX_METRICS_BYTES).decode("utf-8", "replace")
        except OSError:
            return []
        lines = text.splitlines()
        if size > MAX_METRICS_BYTES:  # the header was cut away with the head of the file
            return []
        points = []
        for r in csv.DictReader(lines):
            try:
                val = float(r["val_loss"]) if r.get("val_loss") else -1.0
                points.append([float(r["step"]), float(r["train_loss"]), val])
            except (KeyError, TypeError, ValueError):
                continue
        return points[-LOSS_POINTS:]


def _running_json(r: RunningJob) -> dict[str, Any]:
    return {
        "job_id": r.job_id,
        "kind": r.kind,
        "started_ms": r.started_ms,
        "tokens": r.tokens,
        "route": [dataclasses.asdict(h) for h in r.route.hops] if r.route else [],
        "route_reason": r.route.reason if r.route else "",
        "progress": [r.progress.done, r.progress.total] if r.progress else None,
        "losses": [[e.step, e.loss, e.val_loss] for e in r.losses[-LOSS_POINTS:]],
    }
