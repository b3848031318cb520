"""Closing on the way out: the shielded, bounded close every cleanup path uses.

Rule 1: a close in a `finally` or on cancellation runs shielded, so the cancellation that
got us there cannot skip it, and bounded, so a peer that never answers cannot hold it.
Rule 2: the bound is `CLOSE_TIMEOUT_S` unless the caller has a configured one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

CLOSE_TIMEOUT_S = 2.0  # a close on the way out waits at most this long (cleanup only)


async def close_bounded(
    close: Callable[[], Awaitable[object]],
    timeout_s: float = CLOSE_TIMEOUT_S,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Run `close()` shielded from outer cancellation; give up after `timeout_s` seconds.

    Args:
        close: the bound close, e.g. `stream.aclose`.
        ignore: errors a discarded resource may raise while closing (swallowed).
    """
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
        try:
            await close()
        except ignore:
            pass  # the resource is being discarded; a failed close changes nothing
