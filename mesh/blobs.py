"""Fetch a blob by digest from peers, in pieces: the generic half of moving files over the mesh.

Rule 1: the mesh knows blobs only as (32-byte digest, size, bytes): what a digest names and
how the bytes are stored is the caller's (`BlobSource` to serve, `PieceSink` to receive).
Rule 2: every read from a peer is bounded (a request record of known size, a piece of at
most `PIECE_BYTES`) and has a deadline per piece; a peer that answers out of protocol is a
`PeerProtocolError`, one that is slow or gone is dropped from this download.
Rule 3: a download is resumable (the sink keeps the pieces it stored; only the others are
asked for), spread over several peers at once (one worker per peer pulling pieces from a
shared queue), and verified as a whole by the sink before it is committed. Bytes that do
not verify are discarded; the peer that sent them is named to `on_bad_peer` (when several
peers contributed, each is re-tried alone so that only a guilty one is named).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import MeshError, PeerProtocolError
from mesh.transport.base import Stream
from mesh.wire import Limits, decode, encode, record

log = structlog.get_logger(__name__)

PIECE_BYTES = 1 << 20  # one piece = one frame; also the at-rest chunk size of weight files
MAX_REQUEST_BYTES = 256
_REQUEST_LIMITS = Limits(max_bytes=MAX_REQUEST_BYTES, max_depth=2, max_items=8)
MAX_PEERS = 4  # peers one download pulls from at once


class BlobUnavailable(MeshError):
    """No peer could supply a verified copy of the blob."""


@record("blob_request")
@dataclass(frozen=True, slots=True)
class BlobRequest:
    """Ask for `length` bytes of the blob `digest` from `offset` (length 0: size only)."""

    digest: bytes
    offset: int
    length: int

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError(f"blob digest: expected 32 bytes, got {len(self.digest)}")
        if not (0 <= self.offset < 1 << 48 and 0 <= self.length <= PIECE_BYTES):
            raise ValueError(f"blob range: offset {self.offset}, length {self.length}")


@record("blob_reply")
@dataclass(frozen=True, slots=True)
class BlobReply:
    """The answer before the bytes: "ok" (then one frame of the bytes, unless length 0),
    "not_found" or "bad_range"; `size` is the whole blob's size (0 unless ok)."""

    status: str
    size: int

    def __post_init__(self) -> None:
        if self.status not in ("ok", "not_found", "bad_range"):
            raise ValueError(f"blob status: expected ok/not_found/bad_range, got {self.status!r}")
        if not 0 <= self.size < 1 << 48:
            raise ValueError(f"blob size: expected 0..2^48, got {self.size}")


class BlobSource(Protocol):
    """A blob this node can serve: its size and a bounded read."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class PieceSink(Protocol):
    """Where a download's pieces go (piece i holds bytes [i*PIECE_BYTES, ...))."""

    def stored(self) -> set[int]: ...  # pieces kept from an earlier, interrupted download
    def write(self, index: int, data: bytes) -> None: ...
    def verify(self) -> bool: ...  # the assembled content hashes to the digest
    def discard(self) -> None: ...  # drop every piece
    def commit(self) -> None: ...  # the verified content becomes the file


def n_pieces(size: int) -> int:
    return max(1, -(-size // PIECE_BYTES))


def piece_range(size: int, index: int) -> tuple[int, int]:
    """(offset, length) of piece `index` of a blob of `size` bytes."""
    offset = index * PIECE_BYTES
    return offset, max(0, min(PIECE_BYTES, size - offset))


# ---- serving ------------------------------------------------------------------------------


async def serve_blobs(
    stream: Stream,
    resolve: Callable[[bytes], BlobSource | None],
    *,
    idle_timeout_s: float,
) -> None:
    """Answer blob requests on `stream` until the peer closes it or idles past the timeout.

    Raises:
        PeerProtocolError: a malformed request (the caller scores the peer).
    """
    try:
        while True:
            try:
                raw = await stream.receive(timeout_s=idle_timeout_s, max_bytes=MAX_REQUEST_BYTES)
            except MeshError:
                return  # closed, gone or idle: the conversation is over
            req = decode(raw, BlobRequest, limits=_REQUEST_LIMITS)
            source = resolve(req.digest)
            if source is None:
                await stream.send(encode(BlobReply("not_found", 0)))
                continue
            if req.offset + req.length > source.size:
                await stream.send(encode(BlobReply("bad_range", 0)))
                continue
            data = b""
            if req.length:
                try:
                    data = await trio.to_thread.run_sync(source.read, req.offset, req.length)
                except Exception as exc:  # boundary: our own file failing is not the peer's fault
                    log.error(
                        "blob_source_unreadable", digest=req.digest.hex()[:12], reason=str(exc)
                    )
                    await stream.send(encode(BlobReply("not_found", 0)))
                    continue
            await stream.send(encode(BlobReply("ok", source.size)))
            if req.length:
                await stream.send(data)
    finally:
        await close_bounded(stream.aclose)


# ---- fetching -----------------------------------------------------------------------------

OpenStream = Callable[[bytes], Awaitable[Stream]]


class _NotFound(Exception):
    pass


async def ask(stream: Stream, digest: bytes, offset: int, length: int, timeout_s: float) -> bytes:
    """One request on an open blob stream; returns exactly `length` bytes.

    Raises:
        _NotFound: the peer does not have the blob (or not that range).
        PeerProtocolError: a malformed reply, or a piece of the wrong length.
        MeshError: the stream broke or the deadline passed.
    """
    await stream.send(encode(BlobRequest(digest, offset, length)))
    reply = decode(
        await stream.receive(timeout_s=timeout_s, max_bytes=MAX_REQUEST_BYTES),
        BlobReply,
        limits=_REQUEST_LIMITS,
    )
    if reply.status != "ok":
        raise _NotFound(reply.status)
    if not length:
        return reply.size.to_bytes(8, "big")
    data = await stream.receive(timeout_s=timeout_s, max_bytes=length)
    if len(data) != length:
        raise PeerProtocolError(f"blob piece: expected {length} bytes, got {len(data)}")
    return data


async def blob_size(
    open_stream: OpenStream, peer: bytes, digest: bytes, timeout_s: float
) -> int | None:
    """The size of blob `digest` at `peer`, or None when it does not have it (or fails)."""
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream(peer)
        try:
            return int.from_bytes(await ask(stream, digest, 0, 0, timeout_s), "big")
        finally:
            await close_bounded(stream.aclose)
    except (_NotFound, MeshError, trio.TooSlowError):
        return None


@dataclass(slots=True)
class _Round:
    digest: bytes
    size: int
    sink: PieceSink
    open_stream: OpenStream
    timeout_s: float
    on_piece: Callable[[int], None]
    sources: dict[int, bytes]  # piece -> peer that sent it (this round)


async def _worker(
    job: _Round, peer: bytes, todo: list[int], on_protocol_error: Callable[[bytes, str], None]
) -> None:
    """Pull pieces from `todo` and fetch them from `peer` until none is left or it fails."""
    try:
        with trio.fail_after(job.timeout_s):
            stream = await job.open_stream(peer)
    except (MeshError, trio.TooSlowError) as exc:
        log.info("blob_peer_unreachable", peer=peer.hex()[:8], reason=str(exc))
        return
    try:
        while todo:
            index = todo.pop()
            offset, length = piece_range(job.size, index)
            try:
                data = await ask(stream, job.digest, offset, length, job.timeout_s)
            except PeerProtocolError as exc:
                todo.append(index)
                on_protocol_error(peer, str(exc))
                return
            except (_NotFound, MeshError, trio.TooSlowError) as exc:
                todo.append(index)  # another peer takes it
                log.info("blob_peer_dropped", peer=peer.hex()[:8], reason=str(exc) or "timeout")
                return
            await trio.to_thread.run_sync(job.sink.write, index, data)
            job.sources[index] = peer
            job.on_piece(length)
    finally:
        await close_bounded(stream.aclose)


async def _round(job: _Round, peers: Sequence[bytes], on_bad: Callable[[bytes, str], None]) -> bool:
    """Fetch every missing piece from `peers` at once; True when none is missing after."""
    total = n_pieces(job.size)
    have = job.sink.stored()
    todo = sorted((i for i in range(total) if i not in have), reverse=True)
    async with trio.open_nursery() as nursery:
        for peer in peers[:MAX_PEERS]:
            nursery.start_soon(_worker, job, peer, todo, on_bad)
    return not todo


async def download(
    digest: bytes,
    size: int,
    sink: PieceSink,
    peers: Sequence[bytes],
    open_stream: OpenStream,
    *,
    timeout_s: float,
    on_progress: Callable[[int], None] = lambda _n: None,
    on_bad_peer: Callable[[bytes, str], Awaitable[None]],
) -> None:
    """Fetch blob `digest` of `size` bytes into `sink` from `peers` and commit it verified.

    Args:
        timeout_s: deadline for each piece (and each stream opening).
        on_progress: called with the byte count of each piece stored.
        on_bad_peer: awaited with (peer, reason) for a peer that sent bytes that do not
            verify ("bad_content") or broke the protocol ("malformed").

    Raises:
        BlobUnavailable: no peer left that could supply a verified copy.
    """
    bad: list[tuple[bytes, str]] = []

    def protocol_error(peer: bytes, detail: str) -> None:
        log.warning("blob_peer_malformed", peer=peer.hex()[:8], detail=detail)
        bad.append((peer, "malformed"))

    async def flush() -> None:
        while bad:
            await on_bad_peer(*bad.pop())

    live = list(dict.fromkeys(peers))
    resumed = bool(sink.stored())
    job = _Round(digest, size, sink, open_stream, timeout_s, on_progress, {})
    complete = await _round(job, live, protocol_error)
    await flush()
    if complete and await trio.to_thread.run_sync(sink.verify):
        await trio.to_thread.run_sync(sink.commit)
        return
    senders = set(job.sources.values())
    await trio.to_thread.run_sync(sink.discard)
    if complete:
        log.warning("blob_content_mismatch", digest=digest.hex()[:12], senders=len(senders))
        if len(senders) == 1 and not resumed:  # one sender and no older bytes: it is guilty
            guilty = senders.pop()
            await on_bad_peer(guilty, "bad_content")
            live.remove(guilty)
    for peer in sorted(live, key=lambda p: p not in senders):  # suspects first, one at a time
        job = _Round(digest, size, sink, open_stream, timeout_s, on_progress, {})
        complete = await _round(job, [peer], protocol_error)
        await flush()
        if not complete:
            await trio.to_thread.run_sync(sink.discard)
            continue
        if await trio.to_thread.run_sync(sink.verify):
            await trio.to_thread.run_sync(sink.commit)
            return
        await trio.to_thread.run_sync(sink.discard)
        log.warning("blob_content_mismatch", digest=digest.hex()[:12], peer=peer.hex()[:8])
        await on_bad_peer(peer, "bad_content")
    raise BlobUnavailable(
        f"blob {digest.hex()[:16]} ({size} bytes): no verified copy from {len(set(peers))} peer(s)"
    )
