"""The CLI's side of the mesh's models: list them from the daemon, publish what this node
adds (import, compress), seal its weights, and show a weight fetch as a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from ..api.records import (
    ModelRow,
    ModelsReply,
    ModelsRequest,
    OkReply,
    ProgressEvent,
    PublishModelRequest,
)
from ..config import Config
from ..errors import ApiError, DaemonUnavailable
from ..model_files import weight_files
from ..paths import NodePaths
from .base import call_daemon


def daemon_models(paths: NodePaths) -> tuple[ModelRow, ...] | None:
    """The mesh's models and ours as the running daemon sees them; None without a daemon."""
    if not paths.socket.exists():
        return None
    try:
        return call_daemon(paths, ModelsRequest(), expect=ModelsReply, timeout_s=10).models
    except DaemonUnavailable:
        return None


def where(row: ModelRow) -> str:
    """ "local", "mesh" (published, not here) or "local+mesh"."""
    if row.local and row.published:
        return "local+mesh"
    return "local" if row.local else "mesh"


def model_table_rows(rows: tuple[ModelRow, ...]) -> list[list[str]]:
    return [
        [
            r.model_id,
            r.family,
            str(r.atoms),
            where(r),
            f"v{r.version}" if r.version else "-",
            "yes" if r.weights_here else "no",
            r.digest[:12],
        ]
        for r in rows
    ]


MODEL_HEADERS = ["id", "family", "atoms", "where", "version", "weights", "digest"]


def settle_new_model(cfg: Config, paths: NodePaths, model_id: str, folder: Path) -> str:
    """After `import-model` / `compress` wrote `folder`: seal its weights (a node of a mesh,
    own models directory) and have the daemon publish its manifest; returns what happened."""
    files = weight_files(paths, seal_new=not cfg.atoms.models_dir)
    sealed = files.seal_folder(folder)
    note = f"; {sealed} weight files encrypted at rest" if sealed else ""
    if not paths.socket.exists():
        return note + "; published in the mesh when the daemon starts"
    try:
        reply = call_daemon(paths, PublishModelRequest(model_id), expect=OkReply, timeout_s=30)
    except DaemonUnavailable:
        return note + "; published in the mesh when the daemon starts"
    except ApiError as exc:
        return note + f"; not published: {exc.message}"
    return note + f"; {reply.message}"


class FetchBar:
    """A rich progress bar (stderr) for the weights `nexusd host` fetches from peers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not getattr(args, "json", False) and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> FetchBar:
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    async def on_event(self, event: object) -> None:
        if not self.enabled or not isinstance(event, ProgressEvent) or event.job_id != "weights":
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("fetching weights"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("weights", total=event.total)
        assert self._task is not None
        self._progress.update(self._task, completed=event.done, total=event.total)
