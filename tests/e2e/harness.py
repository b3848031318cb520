"""Real `nexusd` daemons as subprocesses for e2e tests (thin layer over `nexusd.harness.cluster`)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from nexusd.harness.cluster import DaemonProcess, daemon_env
from nexusd.harness.cluster import run_cli as _run_cli

ROOT = Path(__file__).resolve().parents[2]
nexusd_env = daemon_env


def run_cli(
    args: Sequence[str], *, timeout_s: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `nexusd ARGS` to completion in a subprocess."""
    return _run_cli(args, env=env, timeout_s=timeout_s)


@contextlib.contextmanager
def running(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(data_dir, *args, env=env)
    try:
        yield daemon.started()
    finally:
        daemon.kill()


__all__ = ["ROOT", "DaemonProcess", "nexusd_env", "run_cli", "running"]
