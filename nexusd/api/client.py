"""Client side of the local job API (what the CLI uses).

Rule 1: every call has a deadline; a daemon that is absent or silent gives
`DaemonUnavailable` with the socket path, never a hang.
Rule 2: the caller names the reply type it expects (`expect=GenerateReply`) and gets that
type back, or `DaemonUnavailable` saying what came instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from mesh.errors import MalformedMessage, OversizeMessage
from mesh.framing import FrameDecoder, frame
from mesh.wire import decode_any, encode

from ..errors import ApiError, DaemonUnavailable
from .records import EVENT_TYPES, MAX_REPLY_BYTES, REPLY_TYPES, ErrorReply

OnEvent = Callable[[object], Awaitable[None]]
R = TypeVar("R")


async def call(
    socket_path: Path,
    request: object,
    *,
    expect: type[R],
    timeout_s: float | None = 30.0,
    on_event: OnEvent | None = None,
) -> R:
    """Send one request, pass events to `on_event`, return the final reply.

    Args:
        expect: the reply type the request asks for (`object`: any reply).
        timeout_s: deadline for the whole exchange; None for none (long jobs show events).

    Raises:
        DaemonUnavailable: no daemon listens at `socket_path`, it did not answer in time, or
            it answered with another reply type than `expect`.
        ApiError: the daemon refused the request (its code and message).
    """
    try:
        stream = await trio.open_unix_socket(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(
            f"no nexusd daemon at {socket_path} ({exc.strerror}); start one with `nexusd run`"
        ) from None
    decoder = FrameDecoder(MAX_REPLY_BYTES)
    accepted = REPLY_TYPES + EVENT_TYPES
    deadline = trio.current_time() + timeout_s if timeout_s is not None else float("inf")
    async with stream:
        try:
            with trio.fail_at(deadline):
                await stream.send_all(frame(encode(request), max_frame_bytes=MAX_REPLY_BYTES))
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise DaemonUnavailable(f"daemon at {socket_path} closed the connection")
                    for raw in decoder.feed(data):
                        msg = decode_any(raw, accepted)
                        if isinstance(msg, EVENT_TYPES):
                            if on_event is not None:
                                await on_event(msg)
                            continue
                        if isinstance(msg, ErrorReply):
                            raise ApiError(msg.code, msg.message)
                        if not isinstance(msg, expect):
                            raise DaemonUnavailable(
                                f"daemon at {socket_path} answered {type(request).__name__} with "
                                f"{type(msg).__name__}, expected {expect.__name__}"
                            )
                        return msg
        except trio.TooSlowError:
            raise DaemonUnavailable(
                f"daemon at {socket_path} did not answer within {timeout_s} s"
            ) from None
        except (MalformedMessage, OversizeMessage) as exc:
            raise DaemonUnavailable(f"daemon at {socket_path} sent a bad reply: {exc}") from None
        except trio.BrokenResourceError as exc:
            raise DaemonUnavailable(f"connection to {socket_path} broke: {exc}") from None
