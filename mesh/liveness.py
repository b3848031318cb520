"""Liveness: per-peer ping round trips, smoothed RTTs, link bandwidth, unresponsive peers.

`RttTable` is the sans-IO core (EWMA per peer, alpha 0.2 by default); `BandwidthTable`
turns timed probe frames into a per-peer bandwidth (median of the last few); `serve_ping` and
`ping_loop` are the thin trio shell over one long-lived `/nexus/ping/1` stream per peer
(a new stream per ping would cost a multistream-select round trip, docs/architecture.md §13, pitfall 8).

Rule 1: every ping has a read deadline; a peer that does not answer in time is counted as
unresponsive and the loop ends with `TransportBroken` (a frozen peer is never detected by
the transport itself, docs/architecture.md §13, pitfall 4), so the caller can drop and redial it.
Rule 2: time comes from an injected monotonic clock (`time.perf_counter` in production,
trio's clock under a virtual clock); `PingService` whole-millisecond numbers are not used.
Rule 3: the echo is unsigned: the transport already authenticates the peer, and a ping
carries no state; a reply that is not our nonce is a peer protocol error.
Rule 4: a non-member's connection lives only as long as it is joining (`StrangerWindow`).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import ClosedError, MalformedMessage, PeerProtocolError, TransportBroken
from mesh.identity import short_id
from mesh.transport.base import Stream, Transport

log = structlog.get_logger(__name__)

PING_PROTOCOL = "/nexus/ping/1"
NONCE_BYTES = 8
AFTER_JOIN_S = 1.0  # a stranger's connection outlives its join exchange this long (the reply)
DEFAULT_ALPHA = 0.2
BANDWIDTH_WINDOW = 3  # probes whose median is the bandwidth: follows a change in 2 probes
BASE_RTT_WINDOW = 8  # probes over which the lowest smoothed RTT stands for the path latency


class RttTable:
    """Exponentially weighted moving average of round-trip times per peer.

    Args:
        alpha: weight of a new sample (0 < alpha <= 1).

    Attributes:
        timeouts: pings that passed their deadline, per peer (since last forgotten).
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"rtt alpha: expected 0 < alpha <= 1, got {alpha!r}")
        self.alpha = alpha
        self._rtt: dict[bytes, float] = {}
        self.timeouts: dict[bytes, int] = {}

    def observe(self, peer: bytes, rtt_s: float) -> float:
        """Fold one measured round trip (seconds) into the peer's average; return it."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            raise ValueError(f"rtt sample: expected finite seconds >= 0, got {rtt_s!r}")
        old = self._rtt.get(peer)
        new = rtt_s if old is None else (1.0 - self.alpha) * old + self.alpha * rtt_s
        self._rtt[peer] = new
        self.timeouts.pop(peer, None)
        return new

    def timed_out(self, peer: bytes) -> int:
        """Count a ping past its deadline; return the peer's consecutive timeouts."""
        count = self.timeouts.get(peer, 0) + 1
        self.timeouts[peer] = count
        self._rtt.pop(peer, None)  # an unresponsive peer has no meaningful RTT
        return count

    def forget(self, peer: bytes) -> None:
        """Drop the peer's average (disconnected); its timeout count is kept."""
        self._rtt.pop(peer, None)

    def rtts(self) -> dict[bytes, float]:
        """Current smoothed RTT per peer, in seconds."""
        return dict(self._rtt)

    def __repr__(self) -> str:
        return (
            f"RttTable(alpha={self.alpha}, peers={len(self._rtt)}, "
            f"unresponsive={sum(1 for c in self.timeouts.values() if c)})"
        )


class BandwidthTable:
    """Per-peer link bandwidth from timed probes of a known size.

    A probe's time is one path latency plus size / bandwidth. The latency subtracted is the
    lowest smoothed RTT seen at the last `BASE_RTT_WINDOW` probes, not the current one: a
    probe queued behind a slow link inflates the RTT of the same moment, and subtracting
    that would make the slow link look fast. The estimate is the median of the last
    `BANDWIDTH_WINDOW` samples, so a link that changes speed is seen at its new speed after
    two probes (an EWMA keeps a large share of the old figure for many probes, in either
    direction) and one odd sample does not move it.
    """

    def __init__(self, window: int = BANDWIDTH_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"bandwidth window: expected >= 1 probes, got {window!r}")
        self.window = window
        self._per_byte: dict[bytes, deque[float]] = {}
        self._rtts: dict[bytes, deque[float]] = {}
        self._bandwidth: dict[bytes, float] = {}
        self.probes: dict[bytes, int] = {}

    def observe(self, peer: bytes, *, size: int, elapsed_s: float, rtt_s: float | None) -> float:
        """Fold one probe (`size` bytes answered after `elapsed_s`); return bytes/s."""
        if size <= 0 or not (math.isfinite(elapsed_s) and elapsed_s >= 0):
            raise ValueError(f"bandwidth probe: bad size {size!r} or time {elapsed_s!r}")
        rtts = self._rtts.setdefault(peer, deque(maxlen=BASE_RTT_WINDOW))
        if rtt_s is not None and math.isfinite(rtt_s) and rtt_s >= 0:
            rtts.append(rtt_s)
        base = min(rtts, default=0.0)
        samples = self._per_byte.setdefault(peer, deque(maxlen=self.window))
        samples.append(max(elapsed_s - base, 1e-6) / size)
        bw = 1.0 / statistics.median(samples)
        self._bandwidth[peer] = bw
        self.probes[peer] = self.probes.get(peer, 0) + 1
        return bw

    def get(self, peer: bytes, default: float) -> float:
        return self._bandwidth.get(peer, default)

    def __contains__(self, peer: object) -> bool:
        return peer in self._bandwidth

    def __getitem__(self, peer: bytes) -> float:
        return self._bandwidth[peer]

    def __repr__(self) -> str:
        return f"BandwidthTable(window={self.window}, peers={len(self._bandwidth)})"


async def serve_ping(stream: Stream, *, idle_timeout_s: float) -> None:
    """Echo every frame back until the pinger closes the stream (runs per inbound stream).

    Args:
        stream: the inbound ping stream.
        idle_timeout_s: longest wait for the next ping (above the pinger's interval).

    Raises:
        MalformedMessage: a frame that is not a ping nonce.
        TransportBroken: the stream broke or stayed idle past the read deadline.
    """
    while True:
        nonce = await stream.receive(timeout_s=idle_timeout_s, max_bytes=NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise MalformedMessage(
                f"ping from {short_id(stream.remote_id)}: expected {NONCE_BYTES} bytes, "
                f"got {len(nonce)}"
            )
        await stream.send(nonce)


async def ping_loop(
    transport: Transport,
    peer: bytes,
    table: RttTable,
    *,
    interval_s: float,
    timeout_s: float,
    perf: Callable[[], float],
) -> None:
    """Ping `peer` every `interval_s` over one stream until it fails; never returns.

    The stream's own read deadline is the server-side idle limit, so the interval must stay
    below the peer's `read_timeout_s` (the node checks this in its config).

    Raises:
        TransportBroken: the stream broke, or a reply missed `timeout_s` (the peer is then
            counted in `table.timeouts`).
        MalformedMessage: the reply was not our nonce.
    Cancellation: the stream is closed on the way out.
    """
    stream = await transport.open_stream(peer, PING_PROTOCOL)
    try:
        while True:
            nonce = os.urandom(NONCE_BYTES)
            started = perf()
            await stream.send(nonce)
            try:
                reply = await stream.receive(timeout_s=timeout_s, max_bytes=NONCE_BYTES)
            except TransportBroken:
                if perf() - started >= 0.9 * timeout_s:  # the deadline, not a broken stream
                    count = table.timed_out(peer)
                    log.warning(
                        "peer_unresponsive",
                        peer=short_id(peer),
                        timeouts=count,
                        timeout_s=timeout_s,
                    )
                raise
            if reply != nonce:
                raise MalformedMessage(f"ping reply from {short_id(peer)}: nonce mismatch")
            table.observe(peer, max(0.0, perf() - started))
            await trio.sleep(interval_s)
    finally:
        await close_bounded(stream.aclose)


class PeerSessions:
    """One task per connected member: `on_start(peer)` (the initial anti-entropy), then
    `ping_loop` until the peer fails; then `on_end(peer, error)` (drop it, redial later).

    Args:
        transport: the node's transport.
        table: where RTTs and timeouts are recorded.
        interval_s, timeout_s, perf: as for `ping_loop`.
        on_start: awaited first in each session.
        on_end: awaited when a session ends by itself (not when cancelled); `error` is the
            peer's protocol error, or None for a transport failure or missed deadline.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        table: RttTable,
        interval_s: float,
        timeout_s: float,
        perf: Callable[[], float],
        on_start: Callable[[bytes], Awaitable[None]],
        on_end: Callable[[bytes, PeerProtocolError | None], Awaitable[None]],
    ) -> None:
        self._transport, self._table, self._perf = transport, table, perf
        self._interval_s, self._timeout_s = interval_s, timeout_s
        self._on_start, self._on_end = on_start, on_end
        self._scopes: dict[bytes, trio.CancelScope] = {}

    def start(self, peer: bytes, nursery: trio.Nursery) -> None:
        """Start a session for `peer` in `nursery` unless one is running."""
        if peer not in self._scopes:
            scope = self._scopes[peer] = trio.CancelScope()
            nursery.start_soon(self._run, peer, scope)

    def cancel(self, peer: bytes) -> None:
        """End the peer's session (if any) without calling `on_end`."""
        scope = self._scopes.pop(peer, None)
        if scope is not None:
            scope.cancel()
        self._table.forget(peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self._scopes

    def peers(self) -> frozenset[bytes]:
        """Peers with a running session."""
        return frozenset(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    async def _run(self, peer: bytes, scope: trio.CancelScope) -> None:
        try:
            with scope:
                error: PeerProtocolError | None = None
                try:
                    await self._on_start(peer)
                    log.info("peer_session_started", peer=short_id(peer))
                    await ping_loop(
                        self._transport,
                        peer,
                        self._table,
                        interval_s=self._interval_s,
                        timeout_s=self._timeout_s,
                        perf=self._perf,
                    )
                except (TransportBroken, ClosedError) as exc:
                    log.info("peer_session_ended", peer=short_id(peer), error=str(exc))
                except PeerProtocolError as exc:
                    error = exc
                if self._scopes.get(peer) is scope:
                    del self._scopes[peer]
                    self._table.forget(peer)
                    await self._on_end(peer, error)
        finally:
            if self._scopes.get(peer) is scope:
                del self._scopes[peer]

    def __repr__(self) -> str:
        return f"PeerSessions(peers={len(self._scopes)}, interval_s={self._interval_s})"


class StrangerWindow:
    """How long a non-member's connection may stay: `window_s` after it connected unless a
    join exchange starts, never cut while one runs, and `AFTER_JOIN_S` after the last one
    ends (accepted, it reconnects as a member; refused, it is not joining). Join is the only
    protocol open to non-members; any other stream of theirs is refused by the transport and
    its connection closed at once.

    Args:
        window_s: the join window.
        admits: whether a node id is a member in good standing (those are never timed out).
    """

    def __init__(self, window_s: float, admits: Callable[[bytes], bool]) -> None:
        self.window_s = window_s
        self._admits = admits
        self._deadline: dict[bytes, float] = {}  # stranger -> when to cut it (trio time)
        self._joining: dict[bytes, int] = {}  # join exchanges running, per peer
        self._wake = trio.Event()

    def connected(self, peer: bytes) -> None:
        """A connection exists to `peer`: start its window unless it is a member or has one."""
        if peer not in self._deadline and not self._admits(peer):
            self._deadline[peer] = trio.current_time() + self.window_s
            self._wake.set()

    def forget(self, peer: bytes) -> None:
        """`peer` is a member now (or gone)."""
        self._deadline.pop(peer, None)

    @contextmanager
    def joining(self, peer: bytes) -> Iterator[None]:
        """Hold `peer`'s connection while a join exchange with it runs; its window restarts
        when the last one ends."""
        self._joining[peer] = self._joining.get(peer, 0) + 1
        try:
            yield
        finally:
            self._joining[peer] -= 1
            if not self._joining[peer]:
                del self._joining[peer]
                if not self._admits(peer):
                    grace = min(self.window_s, AFTER_JOIN_S)
                    self._deadline[peer] = trio.current_time() + grace
                    self._wake.set()

    async def run(
        self,
        connected_peers: Callable[[], frozenset[bytes]],
        cut_off: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Await `cut_off(peer)` for every connected stranger whose window passed; never
        returns."""
        while True:
            now = trio.current_time()
            idle = {p: at for p, at in self._deadline.items() if p not in self._joining}
            for peer in [p for p, at in idle.items() if at <= now]:
                del self._deadline[peer]
                if not self._admits(peer) and peer in connected_peers():
                    log.info(
                        "stranger_disconnected",
                        peer=short_id(peer),
                        reason="not_joining",
                        window_s=self.window_s,
                    )
                    await cut_off(peer)
            with trio.move_on_at(min((at for at in idle.values() if at > now), default=math.inf)):
                await self._wake.wait()
            self._wake = trio.Event()

    def __repr__(self) -> str:
        return (
            f"StrangerWindow(window_s={self.window_s}, strangers={len(self._deadline)}, "
            f"joining={len(self._joining)})"
        )
