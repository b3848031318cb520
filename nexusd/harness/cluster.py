"""A mesh of real `nexusd` daemons on 127.0.0.1, driven from one process.

Used by `nexusd demo`, the multi-node end-to-end tests and the benchmarks: each daemon is a
separate OS process with its own data directory, port and socket, joined by invite.

Rule 1: nothing here sleeps to wait: readiness is read from each daemon's JSON log (a reader
thread per daemon feeds a queue), or asked of a daemon that blocks until it holds
(`peers --wait-hosts`), always under a deadline.
Rule 2: every daemon started is stopped (SIGTERM, then SIGKILL) when the cluster closes,
whatever happened; nothing outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar, overload

import trio

from ..api.client import call
from ..paths import resolve_paths

R = TypeVar("R")

Event = dict[str, object]


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUSD_")}
    env.update({"NEXUSD_LOG__FORMAT": "json", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    if extra:
        env.update(extra)
    return env


class DaemonProcess:
    """`nexusd run` in a subprocess; its parsed JSON log lines arrive in `events`."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "nexusd", "run", "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=daemon_env(env),
        )
        # appended: a restarted daemon's log follows its earlier lives in the same file
        self._log: IO[str] | None = log_file.open("a") if log_file else None
        self.lines: queue.Queue[Event | None] = queue.Queue()
        self.seen: list[Event] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def socket(self) -> Path:
        return resolve_paths(str(self.data_dir), "", {}).socket

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "raw_line", "line": line.rstrip()}
            self.lines.put(event if isinstance(event, dict) else {"event": "raw_line"})
        self.lines.put(None)

    def wait_for(self, predicate: Callable[[Event], bool] | str, timeout_s: float = 30.0) -> Event:
        """The first log event (already seen or new) matching `predicate` or an event name.

        Raises:
            TimeoutError: none within `timeout_s`. RuntimeError: the daemon exited.
        """
        match = (lambda e: e.get("event") == predicate) if isinstance(predicate, str) else predicate
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no matching log event within {timeout_s}s; last: {self.seen[-5:]}"
                )
            try:
                item = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                raise RuntimeError(f"daemon exited ({self.proc.poll()}); last: {self.seen[-8:]}")
            self.seen.append(item)
            if match(item):
                return item

    def started(self, timeout_s: float = 120.0) -> DaemonProcess:
        self.wait_for("daemon_started", timeout_s)
        return self

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the daemon if it is still running (no wait)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int | None = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the daemon (unless `sig` is None: already signalled) and wait for it;
        returns its exit code (SIGKILL after timeout)."""
        if sig is not None:
            self.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        while True:
            try:
                event = self.lines.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                self.seen.append(event)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a daemon's --http-port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_cli(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexusd", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=daemon_env(env),
        check=False,
    )


class ClusterError(RuntimeError):
    """A step of setting up the local mesh failed; the message says which and why."""


class LocalCluster:
    """N daemons on 127.0.0.1: node 0 founds the mesh, the others join by invite.

    Args:
        root: a directory for the nodes' data dirs and logs.
        size: number of daemons.
        models_dir: shared models directory (built-in models are built once).
        env: extra environment for every daemon.
        prefixes: per node, a command prefix (e.g. `ip netns exec NS`) to run its daemon in.
        listen_hosts: per node, the address its mesh transport listens on (127.0.0.1).
        node_args: per node, extra `nexusd run` flags (e.g. `--http-port P` for node 0).
    """

    def __init__(
        self,
        root: Path,
        size: int,
        *,
        models_dir: Path,
        env: dict[str, str] | None = None,
        names: Sequence[str] | None = None,
        prefixes: Sequence[Sequence[str]] | None = None,
        listen_hosts: Sequence[str] | None = None,
        node_args: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least 1 node, got {size}")
        self.root = root
        self.size = size
        self.names = list(names or [f"node{i}" for i in range(size)])
        self.env = {"NEXUSD_ATOMS__MODELS_DIR": str(models_dir), **(env or {})}
        self.prefixes = [list(p) for p in prefixes] if prefixes else [[] for _ in range(size)]
        self.listen_hosts = list(listen_hosts or ["127.0.0.1"] * size)
        self.node_args = [list(a) for a in node_args] if node_args else [[] for _ in range(size)]
        self.daemons: list[DaemonProcess | None] = [None] * size

    def data_dir(self, i: int) -> Path:
        return self.root / self.names[i]

    def daemon(self, i: int) -> DaemonProcess:
        d = self.daemons[i]
        if d is None:
            raise ClusterError(f"{self.names[i]} is not running")
        return d

    def init(self) -> None:
        """`nexusd init` every node, side by side (node 0 founds the mesh)."""
        with ThreadPoolExecutor(max_workers=self.size) as pool:
            results = list(pool.map(self._init_one, range(self.size)))
        for i, res in enumerate(results):
            if res.returncode != 0:
                raise ClusterError(f"init of {self.names[i]} failed: {res.stderr.strip()}")

    def _init_one(self, i: int) -> subprocess.CompletedProcess[str]:
        args = ["init", "--data-dir", str(self.data_dir(i)), "--name", self.names[i]]
        return run_cli([*args, "--new-mesh"] if i == 0 else args, env=self.env)

    def _spawn(self, i: int) -> DaemonProcess:
        return DaemonProcess(
            self.data_dir(i),
            "--port",
            "0",
            "--listen-host",
            self.listen_hosts[i],
            *self.node_args[i],
            env=self.env,
            log_file=self.root / f"{self.names[i]}.log",
            prefix=self.prefixes[i],
        )

    def start(self, i: int, *, timeout_s: float = 120.0) -> DaemonProcess:
        """(Re)start node i's daemon and wait until it serves."""
        d = self._spawn(i)
        self.daemons[i] = d
        return d.started(timeout_s)

    def start_all(self) -> None:
        ds = [self._spawn(i) for i in range(self.size)]
        self.daemons = list(ds)
        for d in ds:
            d.started()

    def join_all(self) -> None:
        """Node 0 invites everyone else (one token per node); each joins."""
        from ..api.records import InviteReply, InviteRequest, JoinedReply, JoinMeshRequest

        for i in range(1, self.size):
            name = self.names[i]
            token = self.call(0, InviteRequest(600.0, 1, name), expect=InviteReply).token
            self.call(i, JoinMeshRequest(token, name), expect=JoinedReply, timeout_s=120)

    @overload
    def call(
        self,
        i: int,
        request: object,
        *,
        expect: type[R],
        timeout_s: float | None = 120,
        on_event: Callable[[object], None] | None = None,
    ) -> R: ...
    @overload
    def call(
        self,
        i: int,
        request: object,
        *,
        timeout_s: float | None = 120,
        on_event: Callable[[object], None] | None = None,
    ) -> object: ...
    def call(
        self,
        i: int,
        request: object,
        *,
        expect: type[object] = object,
        timeout_s: float | None = 120,
        on_event: Callable[[object], None] | None = None,
    ) -> object:
        """One API request to node i (blocking); events go to `on_event`. With `expect`, the
        reply is of that type (see `nexusd.api.client.call`)."""

        async def forward(event: object) -> None:
            if on_event is not None:
                on_event(event)

        sock = self.daemon(i).socket
        return trio.run(
            lambda: call(sock, request, expect=expect, timeout_s=timeout_s, on_event=forward)
        )

    def host(self, i: int, spec: str) -> None:
        from ..api.records import HostRequest

        self.call(i, HostRequest(spec), timeout_s=600)

    def wait_hosts(self, i: int, count: int, model: str = "", timeout_s: float = 60) -> object:
        from ..api.records import PeersReply, PeersRequest

        reply = self.call(
            i, PeersRequest(count, model, timeout_s), expect=PeersReply, timeout_s=timeout_s + 10
        )
        hosting = sum(
            1
            for p in reply.peers
            if p.hosted and (not model or any(h.startswith(model + ":") for h in p.hosted))
        )
        if hosting < count:
            raise ClusterError(
                f"{self.names[i]} sees {hosting} hosts of {model or 'any model'} "
                f"after {timeout_s}s, expected {count}"
            )
        return reply

    def stop_all(self) -> dict[str, int]:
        """Stop every daemon (graceful first); also reaps ones that already exited. All are
        signalled before any is waited for, so they wind down side by side.

        Returns:
            The exit code of each daemon that was still running, by node name.
        """
        started = [
            (name, d) for name, d in zip(self.names, self.daemons, strict=True) if d is not None
        ]
        running = {name for name, d in started if d.proc.poll() is None}
        for _, d in started:
            d.send_signal(signal.SIGTERM)
        codes = {name: d.stop(None) for name, d in started}
        return {name: code for name, code in codes.items() if name in running}


@contextlib.contextmanager
def local_cluster(
    root: Path,
    size: int,
    *,
    models_dir: Path,
    env: dict[str, str] | None = None,
    names: Sequence[str] | None = None,
    prefixes: Sequence[Sequence[str]] | None = None,
    listen_hosts: Sequence[str] | None = None,
) -> Iterator[LocalCluster]:
    """A started, joined cluster; every daemon is stopped on exit."""
    cluster = LocalCluster(
        root,
        size,
        models_dir=models_dir,
        env=env,
        names=names,
        prefixes=prefixes,
        listen_hosts=listen_hosts,
    )
    try:
        cluster.init()
        cluster.start_all()
        cluster.join_all()
        yield cluster
    finally:
        cluster.stop_all()


def even_spans(n_atoms: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) cuts of n atoms into `parts` near-equal spans."""
    parts = max(1, min(parts, n_atoms))
    bounds = [round(i * n_atoms / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
