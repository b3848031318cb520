"""Serving the HTTP API: the daemon's backend, the bearer token, hypercorn on trio.

Rule 1: off unless `api.http_port` is set; binds `api.http_host` (127.0.0.1 by default).
Rule 2: a bind other than loopback requires a bearer token: DATA_DIR/http_token (0600),
created when missing. On loopback the token is required only if that file exists.
Rule 3: hypercorn parses HTTP; its bounds come from [api]: headers must arrive within the
keep-alive timeout (a slow-loris client is closed then), at most 16 KiB of them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .. import chat_template
from ..api.server import ApiServer, Emit
from ..config import ApiConfig
from ..errors import ApiError, SetupError
from ..jobs.service import JobService
from ..model_registry import ModelRegistry
from .app import HttpApp, ModelCard
from .dashboard import MeshSnapshot
from .openai import LLAMA3_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate

if TYPE_CHECKING:
    from ..node.daemon import Daemon

log = structlog.get_logger(__name__)

TOKEN_FILE = "http_token"
MAX_HEADER_BYTES = 16 * 1024


class DaemonBackend:
    """The HTTP API's view of the daemon: its job API, models, and mesh snapshot."""

    def __init__(
        self, api: ApiServer, jobs: JobService, registry: ModelRegistry, train_dir: Path
    ) -> None:
        self._api = api
        self._registry = registry
        self._snapshot = MeshSnapshot(api.call, jobs.snapshot, train_dir)

    async def call(self, request: object, emit: Emit) -> object:
        return await self._api.call(request, emit)

    def models(self) -> list[ModelCard]:
        cards = []
        for model_id in self._registry.available():
            try:
                info = self._registry.info(model_id)
            except ApiError as exc:
                log.warning("http_model_unreadable", model=model_id, reason=exc.message)
                continue
            cards.append(ModelCard(model_id, "generate" if info.causal else "embed"))
        return cards

    def chat_template(self, model: str) -> ChatTemplate:
        """The template the model shipped (kept at import), else for Llama imports whose
        tokenizer knows the Llama 3 header tokens that template, else (Nexus 1.1) a plain
        "User:" / "Assistant:" transcript."""
        try:
            info = self._registry.info(model)
            folder = self._registry.folder(model)
        except ApiError:
            return PLAIN_TEMPLATE  # unknown: the job says so (404) with the known models
        shipped = folder / chat_template.FILE
        if shipped.is_file() and shipped.stat().st_size <= chat_template.MAX_TEMPLATE_CHARS:
            eos_text = ""
            try:
                eos = self._registry.eos_token_ids(model)
                if eos:
                    tok = self._registry.tokenizer(model)
                    eos_text = tok.decode(list(eos[:1]), skip_special_tokens=False)
            except ApiError as exc:  # no tokenizer: the job refuses the model, saying why
                log.debug("http_chat_no_eos_text", model=model, reason=exc.message)
            return ChatTemplate.shipped(shipped.read_text(), model=model, eos=eos_text)
        if info.family == "llama":
            tok = self._registry.tokenizer(model)
            if (
                tok.token_to_id("<|start_header_id|>") is not None
                and tok.token_to_id("<|eot_id|>") is not None
            ):
                return LLAMA3_TEMPLATE
        return PLAIN_TEMPLATE

    def count_tokens(self, model: str, texts: Sequence[str]) -> int:
        tok = self._registry.tokenizer(model)
        return sum(len(tok.encode(t)) for t in texts)

    async def mesh(self) -> dict[str, Any]:
        return await self._snapshot()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(data_dir: Path, host: str) -> str | None:
    """The bearer token clients must send, or None (loopback without a token file).

    Raises:
        SetupError: the token file is unreadable or not private.
    """
    path = data_dir / TOKEN_FILE
    if not path.exists():
        if is_loopback(host):
            return None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.info("http_token_created", path=str(path))
    if path.stat().st_mode & 0o077:
        raise SetupError(f"{path} must be private (chmod 600), it holds the HTTP API token")
    token = path.read_text().strip()
    if len(token) < 16:
        raise SetupError(f"{path}: the HTTP API token must be at least 16 characters")
    return token


def hypercorn_config(cfg: ApiConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{cfg.http_host}]" if ":" in cfg.http_host else cfg.http_host
    hc.bind = [f"{host}:{cfg.http_port}"]
    hc.keep_alive_timeout = cfg.http_keep_alive_s  # idle, and headers of a request (h11)
    hc.h11_max_incomplete_size = MAX_HEADER_BYTES
    hc.h2_max_header_list_size = MAX_HEADER_BYTES
    hc.read_timeout = None  # a client waiting on a long job sends nothing: not a timeout
    hc.graceful_timeout = 2.0
    hc.backlog = 128
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve_http(
    app: HttpApp,
    cfg: ApiConfig,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on [api] http_host:http_port until cancelled."""
    hc = hypercorn_config(cfg)
    await serve(app, hc, task_status=task_status)  # type: ignore[arg-type]


async def start_http(nursery: trio.Nursery, daemon: Daemon) -> None:
    """Start the HTTP API of `daemon` in `nursery` (returns once it listens)."""
    cfg = daemon.cfg.api
    token = load_token(daemon.paths.data_dir, cfg.http_host)
    backend = DaemonBackend(
        daemon.api, daemon.jobs, daemon.registry, daemon.paths.data_dir / "train"
    )
    app = HttpApp(
        backend,
        token=token,
        max_body_bytes=cfg.http_max_body_bytes,
        body_timeout_s=cfg.http_body_timeout_s,
        max_inflight=cfg.http_max_inflight,
        metrics=daemon.metrics,
    )
    urls = await nursery.start(serve_http, app, cfg)
    log.info("http_api_started", urls=urls, token_required=token is not None)
