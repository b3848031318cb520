"""The one place that configures logging.

Rule 1: structlog renders everything, including stdlib loggers (py-libp2p's `libp2p` logger
among them): console on a TTY, JSON lines otherwise (journald, files, pipes).
Rule 2: keys, secrets, signatures and payloads are never logged: a processor drops any
event field whose name says it holds one, whatever the call site did.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import structlog

_SECRET_WORDS = ("secret", "seed", "private", "signature", "payload", "password", "token_secret")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_secrets(
    _logger: object, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace fields that name a secret with a marker (defence in depth)."""
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "<redacted>"
    return event


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> None:
    """Route structlog and stdlib logging to `stream` (default stderr) in one format.

    Args:
        level: debug / info / warning / error.
        fmt: "console", "json", or "auto" (console when `stream` is a TTY).
        stream: where lines go.
    """
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # py-libp2p sets propagate=False on its logger and prints to bare stderr; bring it home.
    # Its INFO lines are chatty (dial failures, protocol negotiation): keep them at WARNING.
    lib = logging.getLogger("libp2p")
    for old in list(lib.handlers):
        lib.removeHandler(old)
    lib.propagate = True
    lib.setLevel(max(_LEVELS[level], logging.WARNING))


def set_level(level: str) -> None:
    """Change the log level of a running process (SIGHUP reload); the format stays."""
    if level not in _LEVELS:
        raise ValueError(f"log level: expected one of {sorted(_LEVELS)}, got {level!r}")
    logging.getLogger().setLevel(_LEVELS[level])
    logging.getLogger("libp2p").setLevel(max(_LEVELS[level], logging.WARNING))
