"""Benchmark: what an idle gap costs the next piece of work on this machine (issue #15).

A mesh generation is a relay: for one stream, each daemon sleeps while the others compute
(10-15 ms a token here), wakes for its message, handles it and sleeps again; one process
never sleeps between tokens. This bench measures what waking costs, without the mesh:

- "decode": `atoms.codecs.decode` of a 1.5 KB activation (what a host does first with a
  step) after sleeping `gap` ms: the first call, the call right after it, and hot (no gap).
- "tcp": a raw TCP round trip of 1.5 KB to a second process (plain sockets, no crypto)
  after this process worked `gap` ms while the peer slept in `recv`.

Rule 1: prints exactly one JSON object on stdout. Figures are medians over `--rounds`.
Rule 2: the echo process is a child of this one, killed whatever happens; every wait is
bounded (socket timeouts, fixed round counts).
The JSON also records the machine's cpuidle driver and governor (/sys): on a VM that halts
an idle vCPU at once (e.g. `haltpoll` with `guest_halt_poll_ns` 0), waking is a VM exit.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from atoms.codecs import decode, encode

from .common import emit_json, median, rounded

GAPS_MS = (0.0, 1.0, 5.0, 15.0)
PAYLOAD = 1536
SOCKET_TIMEOUT_S = 10.0


def _sleep(ms: float) -> None:
    if ms > 0:
        time.sleep(ms / 1e3)


def _spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def decode_after(gap_ms: float, rounds: int) -> dict[str, float]:
    """Microseconds of a 1.5 KB activation's decode after sleeping `gap_ms`."""
    enc = encode(torch.randn(1, 1, PAYLOAD // 4))
    first: list[float] = []
    second: list[float] = []
    for _ in range(rounds):
        _sleep(gap_ms)
        t0 = time.perf_counter()
        decode(enc)
        t1 = time.perf_counter()
        decode(enc)
        t2 = time.perf_counter()
        first.append((t1 - t0) * 1e6)
        second.append((t2 - t1) * 1e6)
    return {
        "first_us": rounded(median(first), 1),
        "second_us": rounded(median(second), 1),
    }


def _echo(sock: socket.socket) -> None:
    """Child process: echo every message until the parent closes."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)
    finally:
        os._exit(0)


def tcp_after(
    work: Callable[[float], None], gaps: tuple[float, ...], rounds: int
) -> dict[str, dict[str, float]]:
    """Round trips of 1.5 KB over loopback TCP; before each, `work(gap)` here while the
    echo process sleeps in recv."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(SOCKET_TIMEOUT_S)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        listener.close()
        child = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
        child.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        child.settimeout(None)
        _echo(child)
    out: dict[str, dict[str, float]] = {}
    try:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SOCKET_TIMEOUT_S)
        msg = b"x" * PAYLOAD
        for gap in gaps:
            rtts = []
            for _ in range(rounds):
                work(gap)
                t0 = time.perf_counter()
                sock.sendall(msg)
                got = 0
                while got < len(msg):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("echo process closed the connection")
                    got += len(chunk)
                rtts.append((time.perf_counter() - t0) * 1e6)
            out[f"{gap:g}"] = {"rtt_us": rounded(median(rtts), 1)}
        sock.close()
    finally:
        listener.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return out


def _sysfs(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wake", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100, help="rounds per gap (median)")
    p.add_argument("--smoke", action="store_true", help="5 rounds, for a test")
    p.add_argument("--workdir", default=None, help="unused (the benches' common flag)")
    args = p.parse_args(argv)
    rounds = 5 if args.smoke else args.rounds
    if rounds < 1:
        p.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    decodes = {f"{g:g}": decode_after(g, rounds) for g in GAPS_MS}
    hot, cold = decodes["0"]["first_us"], decodes["15"]["first_us"]
    doc: dict[str, object] = {
        "bench": "wake",
        "smoke": args.smoke,
        "rounds": rounds,
        "payload_bytes": PAYLOAD,
        "cpus": os.cpu_count(),
        "cpuidle_driver": _sysfs("/sys/devices/system/cpu/cpuidle/current_driver"),
        "cpuidle_governor": _sysfs("/sys/devices/system/cpu/cpuidle/current_governor_ro")
        or _sysfs("/sys/devices/system/cpu/cpuidle/current_governor"),
        "guest_halt_poll_ns": _sysfs("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        "decode_after_sleep_ms": decodes,
        "tcp_after_sleep_ms": tcp_after(_sleep, GAPS_MS, rounds),
        "tcp_after_spin_ms": tcp_after(_spin, GAPS_MS, rounds),
        "decode_cold_over_hot": rounded(cold / hot, 2) if hot else None,
    }
    doc["took_s"] = rounded(time.perf_counter() - t0, 1)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
