"""Benchmark: round trip of a signed activation per hop, libp2p vs direct vs raw TCP (docs/architecture.md §9).

Rule 1: prints exactly one JSON object on stdout (logs go to stderr); every figure comes
with the raw-TCP baseline measured in the same run, interleaved round by round, because
these shared machines vary 10-40 % from run to run.
Rule 2: two OS processes: this one is the origin, `--serve` (spawned here) echoes. Every
wait is bounded: a deadline for the whole run, a time budget and a round count per size.
Rule 3: a "signed" round trip is what an exec hop costs: the origin seals the activation
as `ExecChannel` does (`seal_large`: envelope + payload, two frames), the echo side opens
it (`open_large`: signature, digest, replay check) and seals it again for the way back,
and the origin opens the answer. "Unsigned" sends the bare payload as one frame.
"direct_nosig" is the exec message as `ExecChannel` sends it on a direct channel: no
envelope signature (the channel authenticates every frame), header record and payload
sealed as one frame, header decoded on each side: the hop the daemons pay.
"<via>_signing_ms" is signed minus unsigned: signatures, envelopes and the second frame.

Transports: "tcp" is plain trio TCP with the same 4-byte length prefix and no crypto;
"direct" is `mesh.transport.direct` (X25519 + ChaCha20-Poly1305 over TCP); "libp2p" is
`mesh.transport.libp2p` (Noise + Yamux).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from mesh.hlc import HybridClock
from mesh.identity import EnvelopeVerifier, NodeKey, seal_large
from mesh.transport.base import Stream, TransportConfig
from mesh.transport.direct import (
    DirectStream,
    FrameReader,
    connect_direct,
    open_direct_listener,
)
from mesh.transport.libp2p import open_libp2p_transport
from mesh.wire import decode, encode, record

ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench.hop` runs from
DOMAIN = "nexus/act/1"  # the exec protocol's domain
RAW = "/nexus/bench/hop/raw/1"
FRAMED = "/nexus/bench/hop/framed/1"
SIGNED = "/nexus/bench/hop/signed/1"
ORIGIN_SEED, ECHO_SEED = b"o" * 32, b"e" * 32  # fixed: both processes know both ids
KINDS = ("tcp", "direct_unsigned", "direct_nosig", "direct", "libp2p_unsigned", "libp2p")
TARGET_RATIO = 2.0  # exec hop for a 1.5 KB activation within 2x of raw TCP (issue #15)
TARGET_SIZE = 1536
BLOCK = 10  # timed rounds per kind before rotating to the next
READY = "hop-echo-ready "
_HEADER = struct.Struct(">I")
CONFIG = TransportConfig(read_timeout_s=30.0, write_timeout_s=30.0, connect_timeout_s=10.0)


@record("bench.hop.step")
@dataclass(frozen=True, slots=True)
class HopStep:
    """Same fields and size as `nexusd.exec.wire.Step` (without importing torch)."""

    session_id: bytes
    step_id: int
    position: int
    causal: bool
    dtype: str
    shape: tuple[int, ...]
    codec: str
    pad_mask: bytes


class FramedStream(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def receive(self, *, timeout_s: float | None = None) -> bytes: ...
    async def aclose(self) -> None: ...


class TcpStream:
    """The baseline: length-prefixed frames on a trio socket, the same read loop as direct."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self._sock = sock
        self._reader = FrameReader(sock)

    async def send(self, payload: bytes) -> None:
        await self._sock.send_all(_HEADER.pack(len(payload)) + payload)

    async def receive(self, *, timeout_s: float | None = None) -> bytes:
        with trio.fail_after(CONFIG.read_timeout_s if timeout_s is None else timeout_s):
            return await self._reader.read_frame(CONFIG.max_frame_bytes)

    async def aclose(self) -> None:
        await self._sock.aclose()


class Framed:
    """Exec-shaped messages without signatures, as `ExecChannel` sends them on a direct
    channel: header record and payload sealed as one frame (`DirectStream.send_message`)."""

    @staticmethod
    async def send(stream: DirectStream, header: bytes, payload: bytes) -> None:
        await stream.send_message(header, payload)

    @staticmethod
    async def receive(stream: DirectStream) -> tuple[bytes, bytes]:
        header, payload = await stream.receive_message(max_header_bytes=1 << 20)
        decode(header, HopStep)  # validated as the exec protocol would
        return header, payload


class Signer:
    """One side's key, clock and verifier, used the way `ExecChannel` uses them."""

    def __init__(self, key: NodeKey, peer: bytes) -> None:
        self.key = key
        self.peer = peer
        self.clock = HybridClock(max_drift_s=5)
        self.verifier = EnvelopeVerifier(
            clock=self.clock, window_s=120, max_body_bytes=1 << 16, replay_capacity=200_000
        )

    def is_peer(self, node_id: bytes) -> bool:
        return node_id == self.peer

    async def send(self, stream: FramedStream, header: bytes, payload: bytes) -> None:
        env = seal_large(self.key, DOMAIN, header, payload, clock=self.clock, now=time.time())
        await stream.send(env)
        await stream.send(payload)

    async def receive(self, stream: FramedStream) -> tuple[bytes, bytes]:
        raw = await stream.receive()
        payload = await stream.receive()
        _env, large = self.verifier.open_large(
            raw, payload, domain=DOMAIN, now=time.time(), is_known=self.is_peer
        )
        return large.header, payload


# --------------------------------------------------------------------------------------
# The echo process


async def _raw_echo(stream: FramedStream) -> None:
    while True:
        await stream.send(await stream.receive(timeout_s=3600))


def _signed_echo(signer: Signer) -> Callable[[Stream], Awaitable[None]]:
    async def echo(stream: Stream) -> None:
        while True:
            header, payload = await signer.receive(stream)
            await signer.send(stream, header, payload)

    return echo


async def serve_echo(max_s: float) -> None:
    """Echo on TCP, direct and libp2p; print the addresses; stop at stdin EOF or `max_s`."""
    key = NodeKey.from_seed(ECHO_SEED)
    origin = NodeKey.from_seed(ORIGIN_SEED).node_id
    signer = Signer(key, origin)
    signed = _signed_echo(signer)

    async def direct_handler(stream: Stream) -> None:
        if stream.protocol == SIGNED:
            await signed(stream)
        elif stream.protocol == FRAMED and isinstance(stream, DirectStream):
            while True:
                await Framed.send(stream, *await Framed.receive(stream))
        else:
            await _raw_echo(stream)

    async def tcp_handler(sock: trio.SocketStream) -> None:
        try:
            await _raw_echo(TcpStream(sock))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the origin hung up

    with trio.move_on_after(max_s):
        async with trio.open_nursery() as nursery:
            tcp = await nursery.start(partial(trio.serve_tcp, tcp_handler, 0, host="127.0.0.1"))
            tcp_port = tcp[0].socket.getsockname()[1]
            async with (
                open_direct_listener(
                    key, "127.0.0.1", 0, CONFIG, signer.is_peer, direct_handler
                ) as direct,
                open_libp2p_transport(ECHO_SEED, 0, CONFIG) as p2p,
            ):
                p2p.set_admission(signer.is_peer)
                p2p.set_stream_handler(RAW, _raw_echo)
                p2p.set_stream_handler(SIGNED, signed)
                ready = {"tcp": tcp_port, "direct": direct.port, "libp2p": p2p.listen_addrs()}
                sys.stdout.write(READY + json.dumps(ready) + "\n")
                sys.stdout.flush()
                await _wait_stdin_eof()
            nursery.cancel_scope.cancel()


async def _wait_stdin_eof() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(1024):
            pass


# --------------------------------------------------------------------------------------
# The origin


@dataclass(frozen=True, slots=True)
class Link:
    stream: FramedStream
    mode: str  # "raw", "framed" or "signed"


async def round_trip(link: Link, signer: Signer, header: bytes, payload: bytes) -> float:
    """One hop there and back; returns seconds. Checks the echo is intact."""
    t0 = time.perf_counter()
    if link.mode == "signed":
        await signer.send(link.stream, header, payload)
        got_header, back = await signer.receive(link.stream)
        ok = got_header == header
    elif link.mode == "framed":
        assert isinstance(link.stream, DirectStream)
        await Framed.send(link.stream, header, payload)
        got_header, back = await Framed.receive(link.stream)
        ok = got_header == header
    else:
        await link.stream.send(payload)
        back = await link.stream.receive()
        ok = True
    elapsed = time.perf_counter() - t0
    if not ok or len(back) != len(payload):
        raise RuntimeError(f"echo mismatch: sent {len(payload)} bytes, got {len(back)}")
    return elapsed


def stats(samples: list[float]) -> dict[str, float]:
    """Median and nearest-rank p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {"median_ms": round(statistics.median(ordered) * 1e3, 4), "p99_ms": round(p99 * 1e3, 4)}


async def measure_size(
    links: dict[str, Link], signer: Signer, size: int, rounds: int, budget_s: float
) -> dict[str, object]:
    """Rotate through the kinds in blocks of `BLOCK` rounds; bounded in rounds and time.

    Blocks, not single rounds, because a libp2p round leaves work behind (Yamux window
    updates, pubsub heartbeats) that would land on whichever kind runs next; the first
    round of each block is untimed and absorbs it.
    """
    payload = os.urandom(size)
    header = encode(HopStep(os.urandom(16), 0, 0, True, "float32", (1, 1, size // 4), "raw", b""))
    samples: dict[str, list[float]] = {kind: [] for kind in links}
    deadline = time.perf_counter() + budget_s
    while len(samples["tcp"]) < rounds and time.perf_counter() < deadline:
        block = min(BLOCK, rounds - len(samples["tcp"]))
        for kind, link in links.items():
            await round_trip(link, signer, header, payload)  # settle, untimed
            for _ in range(block):
                samples[kind].append(await round_trip(link, signer, header, payload))
    out: dict[str, object] = {"size_bytes": size, "rounds": len(samples["tcp"])}
    out.update({kind: stats(values) for kind, values in samples.items()})
    tcp = statistics.median(samples["tcp"])
    for kind in KINDS[1:]:
        out[f"{kind}_over_tcp"] = round(statistics.median(samples[kind]) / tcp, 3)
    for via in ("direct", "libp2p"):
        signing = statistics.median(samples[via]) - statistics.median(samples[f"{via}_unsigned"])
        out[f"{via}_signing_ms"] = round(signing * 1e3, 4)
    return out


async def open_links(
    nursery: trio.Nursery, ready: dict[str, object], echo_id: bytes
) -> tuple[dict[str, Link], float]:
    """Connect every kind to the echo process; returns the links and the direct connect time."""
    key = NodeKey.from_seed(ORIGIN_SEED)
    tcp = TcpStream(await trio.open_tcp_stream("127.0.0.1", int(str(ready["tcp"]))))
    addr = ("127.0.0.1", int(str(ready["direct"])))
    t0 = time.perf_counter()
    direct_raw = await connect_direct(key, addr, echo_id, CONFIG, protocol=RAW)
    connect_s = time.perf_counter() - t0
    direct_signed = await connect_direct(key, addr, echo_id, CONFIG, protocol=SIGNED)
    direct_framed = await connect_direct(key, addr, echo_id, CONFIG, protocol=FRAMED)
    p2p_ready = trio.Event()
    holder: list[object] = []
    nursery.start_soon(_run_libp2p, ready["libp2p"], echo_id, holder, p2p_ready)
    await p2p_ready.wait()
    libp2p_raw, libp2p_signed = holder  # type: ignore[misc]
    links = {
        "tcp": Link(tcp, "raw"),
        "direct_unsigned": Link(direct_raw, "raw"),
        "direct_nosig": Link(direct_framed, "framed"),
        "direct": Link(direct_signed, "signed"),
        "libp2p_unsigned": Link(libp2p_raw, "raw"),  # type: ignore[arg-type]
        "libp2p": Link(libp2p_signed, "signed"),  # type: ignore[arg-type]
    }
    return links, connect_s


async def _run_libp2p(
    addrs: object, echo_id: bytes, holder: list[object], ready: trio.Event
) -> None:
    """Keep the origin's libp2p host running (it lives in this task) until cancelled."""
    async with open_libp2p_transport(ORIGIN_SEED, 0, CONFIG) as p2p:
        p2p.set_admission(lambda node_id: node_id == echo_id)
        await p2p.connect(echo_id, [str(a) for a in addrs])  # type: ignore[attr-defined]
        holder.append(await p2p.open_stream(echo_id, RAW))
        holder.append(await p2p.open_stream(echo_id, SIGNED))
        ready.set()
        await trio.sleep_forever()


async def _read_ready(proc: trio.Process) -> dict[str, object]:
    """The echo process's ready line (bounded in size; the caller bounds the time)."""
    assert proc.stdout is not None
    buf = b""
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk or len(buf) > 65536:
            raise RuntimeError("echo process exited or wrote no ready line (see its stderr)")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith(READY):
        raise RuntimeError(f"echo process: expected a ready line, got {line[:80]!r}")
    ready: dict[str, object] = json.loads(line[len(READY) :])
    return ready


async def run(sizes: list[int], rounds: int, budget_s: float, smoke: bool) -> dict[str, object]:
    """Spawn the echo process, measure every size, and stop the echo process."""
    root = ROOT
    echo_id = NodeKey.from_seed(ECHO_SEED).node_id
    signer = Signer(NodeKey.from_seed(ORIGIN_SEED), echo_id)
    max_s = 60 + len(sizes) * (budget_s + 30)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.hop", "--serve", "--serve-max-s", str(max_s)],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(max_s):
            with trio.fail_after(60):
                ready = await _read_ready(proc)
            async with trio.open_nursery() as nursery:
                links, connect_s = await open_links(nursery, ready, echo_id)
                results = [await measure_size(links, signer, s, rounds, budget_s) for s in sizes]
                for link in links.values():
                    await link.stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await _stop(proc)
    return _report(results, sizes, rounds, smoke, connect_s)


async def _stop(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if proc.stdin is not None:
            await proc.stdin.aclose()  # EOF: the echo process leaves its loop
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _report(
    results: list[dict[str, object]], sizes: list[int], rounds: int, smoke: bool, connect_s: float
) -> dict[str, object]:
    out: dict[str, object] = {
        "bench": "hop",
        "smoke": smoke,
        "sizes": sizes,
        "max_rounds": rounds,
        "direct_connect_ms": round(connect_s * 1e3, 3),
        "results": results,
    }
    target = [r for r in results if r["size_bytes"] == TARGET_SIZE]
    if target:
        out["target"] = f"direct hop, {TARGET_SIZE} B activation, within {TARGET_RATIO}x raw TCP"
        # "direct_nosig" is the exec path the daemons use on the direct channel (frames
        # authenticated by the channel); "direct" adds a per-message Ed25519 envelope.
        out["exec_path"] = "direct_nosig"
        out["exec_hop_within_target"] = (
            float(str(target[0]["direct_nosig_over_tcp"])) <= TARGET_RATIO
        )
        out["direct_within_target"] = float(str(target[0]["direct_over_tcp"])) <= TARGET_RATIO
        for kind in ("direct_unsigned", "direct_nosig"):
            ratio = float(str(target[0][f"{kind}_over_tcp"]))
            out[f"{kind}_within_target"] = ratio <= TARGET_RATIO
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --serve, the echo side) and print one JSON object."""
    p = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1536,24576,6291456", help="comma-separated payload bytes")
    p.add_argument("--rounds", type=int, default=300, help="most timed rounds per size")
    p.add_argument("--budget-s", type=float, default=20.0, help="most seconds per size")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few rounds, for a test")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-max-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        trio.run(serve_echo, args.serve_max_s)
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    rounds, budget_s = args.rounds, args.budget_s
    if args.smoke:
        sizes, rounds, budget_s = [TARGET_SIZE, 24576], 5, 2.0
    if not sizes or min(sizes) < 16 or rounds < 1 or budget_s <= 0:
        p.error("sizes must be >= 16 bytes, rounds >= 1 and budget-s > 0")
    doc = trio.run(run, sizes, rounds, budget_s, args.smoke)
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    from nexusd.logging import configure_logging

    configure_logging("warning", "json", sys.stderr)  # stdout carries only the JSON result
    sys.exit(main())
