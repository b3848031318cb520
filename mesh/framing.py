"""Framing: a 4-byte big-endian length, then the payload. Sans-IO: bytes in, frames out.

Every stream of the mesh (`mesh.transport`) and the local API socket carries whole frames;
records (`mesh.wire`) and tensors travel inside them.
"""

from __future__ import annotations

import struct

from .errors import OversizeMessage

_HEADER = struct.Struct(">I")
MAX_FRAME_LIMIT = 2**32 - 1


def frame(payload: bytes, *, max_frame_bytes: int) -> bytes:
    """Prefix a payload with its 4-byte big-endian length.

    Raises:
        OversizeMessage: the payload is longer than `max_frame_bytes`.
    """
    if len(payload) > min(max_frame_bytes, MAX_FRAME_LIMIT):
        raise OversizeMessage(f"frame of {len(payload)} bytes, over the limit of {max_frame_bytes}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Split a byte stream into length-prefixed frames.

    Two ways to use it: `feed(data)` returns every frame the bytes complete, each bounded by
    `max_frame_bytes`; or `push(data)` then `next_frame(max_bytes)` pulls one frame at a time
    under a per-call limit (a join request may be 16 KiB on a stream whose frames may be
    64 MiB), which is how the transports' `receive(max_bytes=...)` works.

    Error handling: an oversize length raises `OversizeMessage` as soon as its 4-byte
    header is buffered, before any of the body is awaited. The decoder is then broken: the
    stream must be closed, and every later call raises the same error again. Frames that
    completed earlier in a failing `feed` call are dropped with the stream.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        if not 0 <= max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(
                f"max_frame_bytes: expected 0..{MAX_FRAME_LIMIT}, got {max_frame_bytes}"
            )
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._error: OversizeMessage | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received that are not yet part of a complete frame (header included)."""
        return len(self._buf)

    def limit(self, max_bytes: int | None = None) -> int:
        """The frame limit of one call: `max_bytes`, never above `max_frame_bytes`."""
        return self._max if max_bytes is None else max(0, min(max_bytes, self._max))

    def wanted_bytes(self, max_bytes: int | None = None) -> int:
        """How many more bytes the next frame needs (header first): what a reader may read
        without holding more than one frame of at most `limit(max_bytes)` bytes.

        Raises:
            OversizeMessage: the buffered header announces a frame over the limit.
        """
        if self._error is not None:
            raise self._error
        if len(self._buf) < _HEADER.size:
            return _HEADER.size - len(self._buf)
        return _HEADER.size + self._announced(max_bytes) - len(self._buf)

    def push(self, data: bytes) -> None:
        """Buffer received bytes (see `next_frame`)."""
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_frame(self, max_bytes: int | None = None) -> bytes | None:
        """The next complete frame, or None until more bytes are pushed.

        Raises:
            OversizeMessage: the next header announces a frame over `limit(max_bytes)`.
        """
        if self._error is not None:
            raise self._error
        if len(self._buf) < _HEADER.size:
            return None
        end = _HEADER.size + self._announced(max_bytes)
        if end > len(self._buf):
            return None
        payload = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return payload

    def _announced(self, max_bytes: int | None) -> int:
        (length,) = _HEADER.unpack_from(self._buf)
        limit = self.limit(max_bytes)
        if length > limit:
            self._buf.clear()
            self._error = OversizeMessage(
                f"frame of {length} bytes announced, over the limit of {limit}"
            )
            raise self._error
        return int(length)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames they complete, in order.

        Raises:
            OversizeMessage: a header announces a frame over `max_frame_bytes`.
        """
        self.push(data)
        frames: list[bytes] = []
        while (payload := self.next_frame()) is not None:
            frames.append(payload)
        return frames

    def __repr__(self) -> str:
        state = "broken" if self._error else "ok"
        return f"FrameDecoder(max_frame_bytes={self._max}, pending_bytes={len(self._buf)}, {state})"
