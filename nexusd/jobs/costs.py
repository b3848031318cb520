"""What each hop of a job cost: per-hop totals, and the route report every reply carries.

Rule: one table for every job kind (inference steps, training operations), keyed by the
hop (host, start, end), rendered the same way (`HopReport`, sorted by atom then host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..api.records import HopReport
from ..exec.session import HopTiming, HopTotals

HopKey = tuple[bytes, int, int]  # (host, start, end)


@dataclass(slots=True)
class HopCosts:
    """Per-hop sums over a job."""

    hops: dict[HopKey, HopTotals] = field(default_factory=dict)

    def add(self, timings: Sequence[HopTiming]) -> None:
        for t in timings:
            self.hops.setdefault((t.host, t.start, t.end), HopTotals()).add(t)

    def merge(self, key: HopKey, totals: HopTotals) -> None:
        self.hops.setdefault(key, HopTotals()).merge(totals)

    def report(self, name_of: Callable[[bytes], str]) -> tuple[HopReport, ...]:
        rows = sorted(self.hops.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        return tuple(
            HopReport(
                host=h.hex(),
                name=name_of(h),
                start=s,
                end=e,
                steps=a.steps,
                compute_s=round(a.compute_s, 6),
                queue_s=round(a.queue_s, 6),
                transfer_s=round(a.transfer_s, 6),
                bytes_out=a.bytes_out,
                bytes_in=a.bytes_in,
                codec=a.codec,
                bytes_saved=a.bytes_saved,
                wire_error=round(a.wire_error, 6),
            )
            for (h, s, e), a in rows
        )
