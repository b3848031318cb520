"""Steps one exec channel has in flight on a host (`SpanHost.serve`, issue #15).

A host serves a channel's steps side by side (a forwarding host sends every session's steps
to the next host on one channel, and they must reach that host's batcher together); each
step in flight holds its payload, so the channel is not read on while the steps in flight
reach either bound below.
"""

from __future__ import annotations

import trio

# Steps of one channel in flight hold their payloads: beyond the first, at most this many
# bytes (one frame at the transport's default limit), so serving a channel's steps side
# by side holds no more memory than about two frames, as reading them in turn did.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024


class InFlight:
    """How many steps, and how many payload bytes, one channel has in flight; `admit` waits
    (the channel is not read meanwhile) until a step fits both bounds. A step is always
    admitted when none is in flight, whatever its size (the transport bounded its frame)."""

    def __init__(self, *, steps: int, budget_bytes: int) -> None:
        if steps < 1 or budget_bytes < 0:
            raise ValueError(
                f"in-flight bounds: steps >= 1, bytes >= 0, got {steps}, {budget_bytes}"
            )
        self._steps = steps
        self._budget = budget_bytes
        self.count = 0
        self.bytes = 0
        self._changed = trio.Event()

    async def admit(self, size: int) -> None:
        while self.count and (self.count >= self._steps or self.bytes + size > self._budget):
            if self._changed.is_set():
                self._changed = trio.Event()
            await self._changed.wait()
        self.count += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        self._changed.set()
