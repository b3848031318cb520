"""Real `nexusd` daemons as subprocesses, observed through their JSON log lines.

Rule 1: nothing here sleeps: waiting means reading the daemon's log (a reader thread feeds a
queue) until an expected event arrives or a deadline passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def nexusd_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUSD_")}
    env.update({"NEXUSD_LOG__FORMAT": "json", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT)})  # fmt: skip
    if extra:
        env.update(extra)
    return env


def run_cli(args: Sequence[str], *, timeout_s: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `nexusd ARGS` to completion in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "nexusd", *args], capture_output=True, text=True,
        timeout=timeout_s, env=nexusd_env(env), cwd=ROOT, check=False,
    )  # fmt: skip


class DaemonProcess:
    """`nexusd run` in a subprocess; `events` are its parsed JSON log lines."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexusd", "run", "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=nexusd_env(env), cwd=ROOT,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, object] | None] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "raw_line", "line": line.rstrip()}
            self.lines.put(event if isinstance(event, dict) else {"event": "raw_line"})
        self.lines.put(None)

    def wait_for(
        self, predicate: Callable[[dict[str, object]], bool] | str, timeout_s: float = 30.0
    ) -> dict[str, object]:
        """The first (already seen or new) log event matching `predicate` (or event name)."""
        match = (lambda e: e.get("event") == predicate) if isinstance(predicate, str) else predicate
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event within {timeout_s}s; last: {self.seen[-5:]}")
            try:
                event = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                raise RuntimeError(f"daemon exited ({self.proc.poll()}); last: {self.seen[-8:]}")
            self.seen.append(event)
            if match(event):
                return event

    def started(self, timeout_s: float = 60.0) -> DaemonProcess:
        self.wait_for("daemon_started", timeout_s)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._reader.join(timeout=5)
            while True:  # keep the log for assertions after the stop
                try:
                    event = self.lines.get_nowait()
                except queue.Empty:
                    break
                if event is not None:
                    self.seen.append(event)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.stop()


@contextlib.contextmanager
def running(data_dir: Path, *args: str, env: dict[str, str] | None = None
            ) -> Iterator[DaemonProcess]:  # fmt: skip
    daemon = DaemonProcess(data_dir, *args, env=env)
    try:
        yield daemon.started()
    finally:
        daemon.kill()
