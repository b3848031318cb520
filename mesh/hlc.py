"""Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", OPODIS 2014).

A timestamp is (wall_ms, counter): `wall_ms` is the largest physical time (ms) seen so
far, `counter` orders events inside one millisecond. It packs into one int,
`wall_ms << 16 | counter`, whose integer order equals the timestamp order.

Rule 1: the clock never reads time itself; callers pass `wall_s` (sans-IO, testable).
Rule 2: `now` and `observe` are strictly monotonic: every returned timestamp is greater
than every timestamp returned before.
Rule 3: `observe` refuses a remote timestamp more than `max_drift_s` ahead of local wall
time (`FutureMessage`) and leaves the clock untouched when it does, so a peer cannot
drag our clock into the future.
Rule 4: a counter overflow (65536 events in one ms) moves `wall_ms` one ms forward
instead of wrapping; logical time then runs at most a few ms ahead of physical time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import FutureMessage
from mesh.wire import record

COUNTER_BITS = 16
COUNTER_MAX = (1 << COUNTER_BITS) - 1
WALL_MS_LIMIT = 1 << 47  # packed value stays below 2**63: a signed int64 on the wire


@record("hlc")
@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """One HLC reading. Ordered by (wall_ms, counter), like its packed int."""

    wall_ms: int
    counter: int

    def __post_init__(self) -> None:
        if not 0 <= self.wall_ms < WALL_MS_LIMIT:
            raise ValueError(f"hlc wall_ms: expected 0..2**47-1, got {self.wall_ms}")
        if not 0 <= self.counter <= COUNTER_MAX:
            raise ValueError(f"hlc counter: expected 0..{COUNTER_MAX}, got {self.counter}")

    def pack(self) -> int:
        """Return `wall_ms << 16 | counter` (a non-negative int below 2**63)."""
        return self.wall_ms << COUNTER_BITS | self.counter

    @classmethod
    def unpack(cls, v: int) -> Timestamp:
        """Inverse of `pack`.

        Raises:
            ValueError: `v` is not an int in 0..2**63-1.
        """
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 63:
            raise ValueError(f"packed hlc: expected an int in 0..2**63-1, got {v!r:.30}")
        return cls(v >> COUNTER_BITS, v & COUNTER_MAX)

    @property
    def wall_s(self) -> float:
        """Physical part in seconds."""
        return self.wall_ms / 1000.0


def wall_ms_of(wall_s: float) -> int:
    """Convert a wall time in seconds to whole ms (ValueError if negative or not finite)."""
    if not math.isfinite(wall_s) or wall_s < 0:
        raise ValueError(f"wall time: expected finite seconds >= 0, got {wall_s!r}")
    return math.floor(wall_s * 1000)


def _bump(wall_ms: int, counter: int) -> Timestamp:
    """(wall_ms, counter + 1), carrying into wall_ms instead of overflowing (Rule 4)."""
    if counter >= COUNTER_MAX:
        return Timestamp(wall_ms + 1, 0)
    return Timestamp(wall_ms, counter + 1)


class HybridClock:
    """The local hybrid logical clock of one node.

    Args:
        max_drift_s: how far ahead of our wall time a remote timestamp may be.
    """

    __slots__ = ("_last", "_max_drift_ms", "max_drift_s")

    def __init__(self, *, max_drift_s: float) -> None:
        if not math.isfinite(max_drift_s) or max_drift_s < 0:
            raise ValueError(f"max_drift_s: expected finite >= 0, got {max_drift_s!r}")
        self.max_drift_s = max_drift_s
        self._max_drift_ms = math.ceil(max_drift_s * 1000)
        self._last = Timestamp(0, 0)

    @property
    def last(self) -> Timestamp:
        """The most recent timestamp issued or observed."""
        return self._last

    def now(self, wall_s: float) -> Timestamp:
        """Timestamp a local or send event (HLC paper, Fig. 5, "send or local event").

        Args:
            wall_s: current physical time in seconds.

        Returns:
            A timestamp greater than every earlier one.
        """
        pt = wall_ms_of(wall_s)
        last = self._last
        self._last = Timestamp(pt, 0) if pt > last.wall_ms else _bump(last.wall_ms, last.counter)
        return self._last

    def check(self, ts: Timestamp, wall_s: float) -> None:
        """Raise FutureMessage if `ts` is over max_drift_s ahead of `wall_s`; no state change."""
        pt = wall_ms_of(wall_s)
        if ts.wall_ms - pt > self._max_drift_ms:
            raise FutureMessage(
                f"timestamp {ts.wall_ms} ms is {ts.wall_ms - pt} ms ahead of local time, "
                f"over the allowed drift of {self._max_drift_ms} ms"
            )

    def observe(self, ts: Timestamp, wall_s: float) -> Timestamp:
        """Merge a remote timestamp (HLC paper, Fig. 5, "receive event of message m").

        Args:
            ts: the timestamp carried by the received message.
            wall_s: current physical time in seconds.

        Returns:
            The new local timestamp, greater than both `ts` and every earlier one.

        Raises:
            FutureMessage: `ts` is more than `max_drift_s` ahead; the clock is unchanged.
        """
        self.check(ts, wall_s)
        pt = wall_ms_of(wall_s)
        last = self._last
        wall = max(last.wall_ms, ts.wall_ms, pt)
        if wall == last.wall_ms == ts.wall_ms:
            new = _bump(wall, max(last.counter, ts.counter))
        elif wall == last.wall_ms:
            new = _bump(wall, last.counter)
        elif wall == ts.wall_ms:
            new = _bump(wall, ts.counter)
        else:
            new = Timestamp(wall, 0)
        self._last = new
        return new

    def __repr__(self) -> str:
        return (
            f"HybridClock(last=({self._last.wall_ms}, {self._last.counter}), "
            f"max_drift_s={self.max_drift_s})"
        )
