"""Direct channels: an authenticated, encrypted TCP stream between two mesh nodes.

Bulk activations over libp2p cost ~10x plain TCP (Python framing in Noise + Yamux, see
docs/architecture.md §13); a direct channel is one TCP connection per stream with our own
handshake and framing. It implements `base.Stream`, so `ExecChannel` runs over it unchanged.

Handshake (SIGMA-style signed ephemeral Diffie-Hellman, 1.5 round trips plus a ready frame):
    I -> R  Hello(initiator id, protocol, eI)
    R -> I  Accept(responder id, eR, sig_R)                  sig = Ed25519 node-key signature
    I -> R  Finish(sig_I)                                    over role + transcript
    R -> I  first encrypted frame, empty ("ready": the initiator was admitted)
with transcript = b"nexus-direct-1\\0" + initiator id + responder id + eI + eR + protocol.
Session keys = BLAKE2b(key=X25519(e, e'), transcript), one per direction
(`mesh.identity.derive_session_keys`); frames are ChaCha20-Poly1305 with a per-direction
counter nonce (`mesh.identity.SessionCipher`).

Rule 1: the dialer signs nothing before the responder proved it is `expected_remote`, and
the responder admits the dialer only after verifying its signature and `is_member`; a
refusal is logged with its reason, counted, and the connection is closed. `is_member` is
the whole admission (the daemon's refuses banned and revoked peers too), and
`DirectListener.disconnect` closes a peer's open streams once it is cut off.
Rule 2: every frame is 4-byte big-endian length + ciphertext; the length is checked against
`max_frame_bytes` (+ the 16-byte tag) before any of the body is read.
Rule 3: every read and write has a deadline (`connect_timeout_s` for the whole handshake);
a passed deadline, a reset or EOF is `TransportBroken`; a frame that does not decrypt is
`DecryptionFailed` (a `PeerProtocolError`) and closes the stream for good.
Rule 4: no PyNaCl here: all cryptography lives in `mesh.identity`.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import (
    ClosedError,
    DecryptionFailed,
    MalformedMessage,
    OversizeMessage,
    PeerProtocolError,
    TransportBroken,
    UnexpectedPeer,
    UnknownSender,
)
from mesh.identity import (
    AEAD_TAG_BYTES,
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    X25519_BYTES,
    EphemeralKey,
    NodeKey,
    SessionCipher,
    derive_session_keys,
    short_id,
    verify_signature,
)
from mesh.transport.base import StreamHandler, TransportConfig, check_node_id, serve_stream
from mesh.wire import decode, encode, record

log = structlog.get_logger(__name__)

DIRECT_VERSION = 1
#: The default protocol named in the handshake (the exec protocol's direct variant).
DIRECT_PROTOCOL = "/nexus/exec-direct/1.0.0"
_DOMAIN = b"nexus-direct-1\0"
_ROLE_INITIATOR = b"initiator\0"
_ROLE_RESPONDER = b"responder\0"
_HEADER = struct.Struct(">I")
_HANDSHAKE_MAX_BYTES = 1024  # the largest handshake message is ~200 bytes
#: The largest header a `send_message` frame may carry (the exec protocol's own bound).
MAX_MESSAGE_HEADER_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024
_READ_CHUNK_MAX = 1024 * 1024
_MAX_HANDSHAKES = 64  # concurrent unauthenticated connections per listener
_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@record("d.hello")
@dataclass(frozen=True, slots=True)
class DirectHello:
    """First handshake message, initiator to responder (not yet authenticated)."""

    version: int
    initiator: bytes
    protocol: str
    ephemeral: bytes

    def __post_init__(self) -> None:
        if self.version != DIRECT_VERSION:
            raise ValueError(f"direct version: expected {DIRECT_VERSION}, got {self.version}")
        _check_lengths(self.initiator, self.ephemeral)
        if not 1 <= len(self.protocol) <= 128:
            raise ValueError(f"protocol: expected 1..128 chars, got {len(self.protocol)}")


@record("d.accept")
@dataclass(frozen=True, slots=True)
class DirectAccept:
    """Responder's reply: its id, ephemeral key and signature over the transcript."""

    responder: bytes
    ephemeral: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_lengths(self.responder, self.ephemeral, self.signature)


@record("d.finish")
@dataclass(frozen=True, slots=True)
class DirectFinish:
    """Initiator's signature over the transcript."""

    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise ValueError(
                f"signature: expected {SIGNATURE_BYTES} bytes, got {len(self.signature)}"
            )


def _check_lengths(node_id: bytes, ephemeral: bytes, signature: bytes | None = None) -> None:
    if len(node_id) != NODE_ID_BYTES or len(ephemeral) != X25519_BYTES:
        raise ValueError(
            f"node id and ephemeral key: expected {NODE_ID_BYTES} and {X25519_BYTES} bytes, "
            f"got {len(node_id)} and {len(ephemeral)}"
        )
    if signature is not None and len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(signature)}")


def transcript(hello: DirectHello, responder: bytes, responder_ephemeral: bytes) -> bytes:
    """The bytes both sides sign and derive keys from (see the module docstring)."""
    return b"".join(
        (
            _DOMAIN,
            hello.initiator,
            responder,
            hello.ephemeral,
            responder_ephemeral,
            hello.protocol.encode("utf-8"),
        )
    )


@contextmanager
def _map_errors(what: str, peer: bytes) -> Iterator[None]:
    """Convert socket failures and passed deadlines into `TransportBroken`."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise TransportBroken(f"{what} with {short_id(peer)}: deadline passed") from exc
    except _SOCKET_ERRORS as exc:
        raise TransportBroken(f"{what} with {short_id(peer)}: {type(exc).__name__}: {exc}") from exc


class FrameReader:
    """Length-prefixed frames from a socket, bounded before the body is read.

    The buffer survives a cancelled read (a passed deadline), so no frame is ever torn.
    """

    __slots__ = ("_buf", "_sock")

    def __init__(self, sock: trio.SocketStream) -> None:
        self._sock = sock
        self._buf = bytearray()

    async def read_frame(self, max_bytes: int) -> bytes:
        # While the header is incomplete, read no more than one frame of `max_bytes` could
        # be: a peer announcing too much is refused holding at most that.
        await self._fill(_HEADER.size, max_bytes + _HEADER.size)
        (length,) = _HEADER.unpack_from(self._buf)
        if length > max_bytes:
            raise OversizeMessage(
                f"frame of {length} bytes announced, over the limit of {max_bytes}"
            )
        end = _HEADER.size + length
        await self._fill(end)
        with memoryview(self._buf) as view:
            frame = bytes(view[_HEADER.size : end])
        del self._buf[:end]
        return frame

    async def _fill(self, size: int, most: int = _READ_CHUNK_MAX) -> None:
        while len(self._buf) < size:
            want = min(max(size - len(self._buf), _READ_CHUNK), _READ_CHUNK_MAX, most)
            chunk = await self._sock.receive_some(want)
            if not chunk:
                raise trio.BrokenResourceError("connection closed by the peer")
            self._buf += chunk


async def _acquire(lock: trio.Lock) -> None:
    """Take `lock`; uncontended (the usual case) without a scheduling round trip."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class DirectStream:
    """A `base.Stream` over one authenticated, encrypted TCP connection.

    Build with `connect_direct` (dialer) or receive one in an `open_direct_listener`
    handler. Concurrency: one sender and one receiver at a time (each holds its own lock).
    """

    # Every frame is authenticated by the channel (signed handshake, AEAD, counters), so
    # application protocols may skip per-message signatures on it (see nexusd.exec.wire).
    channel_authenticated = True

    def __init__(
        self,
        sock: trio.SocketStream,
        reader: FrameReader,
        *,
        remote_id: bytes,
        protocol: str,
        config: TransportConfig,
        tx: SessionCipher,
        rx: SessionCipher,
    ) -> None:
        self.remote_id = remote_id
        self.protocol = protocol
        self._sock = sock
        self._reader = reader
        self._config = config
        self._tx = tx
        self._rx = rx
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._closed = False
        self._broken: str | None = None

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(
                f"direct stream {self.protocol} to {short_id(self.remote_id)} is closed"
            )
        if self._broken is not None:
            raise TransportBroken(self._broken)

    async def send(self, payload: bytes) -> None:
        """Encrypt and send one frame within the write deadline (see `base.Stream.send`)."""
        if len(payload) > self._config.max_frame_bytes:
            raise OversizeMessage(
                f"frame of {len(payload)} bytes, over the limit of {self._config.max_frame_bytes}"
            )
        self._check_usable()
        await _acquire(self._send_lock)
        try:
            self._check_usable()
            await self._send_wire(self._tx.seal_frame(payload))
        finally:
            self._send_lock.release()

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Send several frames in one write, e.g. an exec envelope and its tensor payload.

        Same frames as calling `send` for each, but the peer wakes up once instead of once
        per frame (on a loaded 2-core box a second wake-up costs ~0.1 ms per direction).

        Raises:
            As for `send`; an oversize payload raises before anything is sent.
        """
        for payload in payloads:
            if len(payload) > self._config.max_frame_bytes:
                raise OversizeMessage(
                    f"frame of {len(payload)} bytes, over the limit of "
                    f"{self._config.max_frame_bytes}"
                )
        self._check_usable()
        await _acquire(self._send_lock)
        try:
            self._check_usable()
            await self._send_wire(b"".join([self._tx.seal_frame(p) for p in payloads]))
        finally:
            self._send_lock.release()

    async def send_message(self, header: bytes, payload: bytes) -> None:
        """Send a (header, payload) message as ONE frame: 4-byte header length, header,
        payload, sealed together (one AEAD and one wake-up per message, where two frames
        cost two of each; read it with `receive_message`).

        Raises:
            OversizeMessage: `payload` over `max_frame_bytes`, or `header` over
                `MAX_MESSAGE_HEADER_BYTES` (before anything is sent).
            As for `send` otherwise.
        """
        if len(payload) > self._config.max_frame_bytes or len(header) > MAX_MESSAGE_HEADER_BYTES:
            raise OversizeMessage(
                f"message of {len(header)} + {len(payload)} bytes, over the limits of "
                f"{MAX_MESSAGE_HEADER_BYTES} + {self._config.max_frame_bytes}"
            )
        self._check_usable()
        await _acquire(self._send_lock)
        try:
            self._check_usable()
            plain = b"".join((_HEADER.pack(len(header)), header, payload))
            await self._send_wire(self._tx.seal_frame(plain))
        finally:
            self._send_lock.release()

    async def receive_message(
        self, *, timeout_s: float | None = None, max_header_bytes: int = MAX_MESSAGE_HEADER_BYTES
    ) -> tuple[bytes, bytes]:
        """Receive one `send_message` message: (header, payload).

        The frame is bounded on its length prefix by `max_frame_bytes` + `max_header_bytes`
        (+ 4 + tag) before its body is read; the header's length, inside the authenticated
        frame, is then checked against `max_header_bytes`.

        Raises:
            MalformedMessage: the header length is over `max_header_bytes` or past the end
                of the frame (stream closed).
            As for `receive` otherwise.
        """
        self._check_usable()
        deadline = self._config.read_timeout_s if timeout_s is None else timeout_s
        limit = self._config.max_frame_bytes + min(max_header_bytes, MAX_MESSAGE_HEADER_BYTES)
        await _acquire(self._receive_lock)
        try:
            self._check_usable()
            sealed = await self._receive_frame(deadline, None, limit + _HEADER.size)
        finally:
            self._receive_lock.release()
        try:
            plain = self._rx.open(sealed)
            if len(plain) < _HEADER.size:
                raise MalformedMessage(f"message frame of {len(plain)} bytes has no header length")
            (length,) = _HEADER.unpack_from(plain)
            end = _HEADER.size + length
            if length > max_header_bytes or end > len(plain):
                raise MalformedMessage(
                    f"message header of {length} bytes: over {max_header_bytes} or past the "
                    f"{len(plain)}-byte frame"
                )
        except PeerProtocolError as exc:
            await self._break(f"peer protocol error: {exc}")
            raise
        return plain[_HEADER.size : end], plain[end:]

    async def _send_wire(self, data: bytes) -> None:
        # A bare CancelScope rather than fail_after: the same deadline at a fraction of the
        # cost on the per-frame path (the hot loop of every hop).
        scope = trio.CancelScope(deadline=trio.current_time() + self._config.write_timeout_s)
        try:
            with scope:
                await self._sock.send_all(data)
        except BaseException as exc:  # cleanup, then re-raise: not a boundary
            # A frame not fully sent (failed or cancelled) has used its nonce and may be
            # torn: the stream cannot be resumed.
            await self._break(f"send to {short_id(self.remote_id)} did not complete: {exc!r}")
            if isinstance(exc, _SOCKET_ERRORS):
                raise TransportBroken(self._broken) from exc
            raise
        if scope.cancelled_caught:
            await self._break(f"send to {short_id(self.remote_id)}: deadline passed")
            raise TransportBroken(self._broken)

    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Receive and decrypt one frame within the deadline (see `base.Stream.receive`).

        Raises:
            DecryptionFailed: the frame was altered, replayed or reordered (stream closed).
            OversizeMessage: the peer announced a frame over the limit (stream closed).
            TransportBroken, ClosedError: as for `base.Stream.receive`.
        """
        self._check_usable()
        deadline = self._config.read_timeout_s if timeout_s is None else timeout_s
        await _acquire(self._receive_lock)
        try:
            self._check_usable()
            sealed = await self._receive_frame(deadline, max_bytes)
        finally:
            self._receive_lock.release()
        try:
            return self._rx.open(sealed)
        except DecryptionFailed as exc:
            await self._break(f"peer protocol error: {exc}")
            raise

    async def _receive_frame(
        self, deadline: float, max_bytes: int | None, limit: int | None = None
    ) -> bytes:
        if limit is None:
            limit = self._config.max_frame_bytes
            if max_bytes is not None:
                limit = max(0, min(max_bytes, limit))
        limit += AEAD_TAG_BYTES
        sealed = None
        try:
            with trio.CancelScope(deadline=trio.current_time() + deadline):
                sealed = await self._reader.read_frame(limit)
        except _SOCKET_ERRORS as exc:
            await self._break(f"receive from {short_id(self.remote_id)}: {exc}")
            raise TransportBroken(self._broken) from exc
        except OversizeMessage as exc:
            await self._break(f"peer protocol error: {exc}")
            raise
        if sealed is None:
            # The reader keeps partial bytes: the stream stays usable after a deadline.
            raise TransportBroken(f"receive from {short_id(self.remote_id)}: deadline passed")
        return sealed

    async def _break(self, reason: str) -> None:
        self._broken = reason
        await self._close_socket()

    async def abort(self) -> None:
        """Close at once after a peer error (used by the listener's handler boundary)."""
        self._closed = True
        await self._close_socket()

    async def aclose(self) -> None:
        """Close the stream (shielded, bounded). Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        await self._close_socket()

    async def _close_socket(self) -> None:
        await close_bounded(self._sock.aclose, self._config.close_timeout_s, ignore=_SOCKET_ERRORS)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "open")
        return (
            f"DirectStream(remote={short_id(self.remote_id)}, protocol={self.protocol!r}, {state}, "
            f"sent={self._tx.counter}, received={self._rx.counter})"
        )


def _nodelay(sock: trio.SocketStream) -> None:
    # trio already sets TCP_NODELAY on stream sockets; a hop is latency-bound, so be explicit.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


async def _send_plain(sock: trio.SocketStream, msg: object) -> None:
    data = encode(msg)
    await sock.send_all(_HEADER.pack(len(data)) + data)


async def _close_quietly(sock: trio.SocketStream) -> None:
    await close_bounded(sock.aclose, ignore=_SOCKET_ERRORS)


class _Refused(Exception):
    """The responder turns the initiator away; `reason` is logged (never sent)."""

    def __init__(self, reason: str, peer: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.peer = peer


@dataclass(frozen=True, slots=True)
class _Session:
    remote_id: bytes
    protocol: str
    tx: SessionCipher
    rx: SessionCipher


async def _initiate(
    sock: trio.SocketStream,
    reader: FrameReader,
    key: NodeKey,
    expected_remote: bytes,
    protocol: str,
    is_member: Callable[[bytes], bool] | None,
) -> _Session:
    """The dialer's side of the handshake (module docstring); runs under the caller's deadline."""
    eph = EphemeralKey.generate()
    hello = DirectHello(DIRECT_VERSION, key.node_id, protocol, eph.public)
    await _send_plain(sock, hello)
    accept = decode(await _read_reply(reader, expected_remote, _HANDSHAKE_MAX_BYTES), DirectAccept)
    if accept.responder != expected_remote:
        raise UnexpectedPeer(
            f"direct channel: expected node {short_id(expected_remote)}, "
            f"got {short_id(accept.responder)}"
        )
    script = transcript(hello, accept.responder, accept.ephemeral)
    verify_signature(accept.responder, _ROLE_RESPONDER + script, accept.signature)
    if is_member is not None and not is_member(accept.responder):
        raise UnknownSender(f"direct channel: node {short_id(accept.responder)} is not a member")
    tx_key, rx_key = derive_session_keys(eph.exchange(accept.ephemeral), script)
    await _send_plain(sock, DirectFinish(key.sign(_ROLE_INITIATOR + script)))
    rx = SessionCipher(rx_key)
    ready = rx.open(await _read_reply(reader, expected_remote, AEAD_TAG_BYTES))
    if ready:
        raise MalformedMessage(f"direct ready frame: expected empty, got {len(ready)} bytes")
    return _Session(accept.responder, protocol, SessionCipher(tx_key), rx)


async def _read_reply(reader: FrameReader, peer: bytes, max_bytes: int) -> bytes:
    """A handshake reply; the listener closes the connection when it refuses us."""
    try:
        return await reader.read_frame(max_bytes)
    except trio.BrokenResourceError:
        raise TransportBroken(
            f"direct handshake with {short_id(peer)}: closed by the peer (it did not admit "
            "us; see its log)"
        ) from None


async def _respond(
    sock: trio.SocketStream,
    reader: FrameReader,
    key: NodeKey,
    is_member: Callable[[bytes], bool],
) -> _Session:
    """The listener's side of the handshake; runs under the caller's deadline.

    The claimed initiator id is checked against `is_member` before we sign anything (no
    work for strangers), and again once its signature has proved it.
    """
    hello = decode(await reader.read_frame(_HANDSHAKE_MAX_BYTES), DirectHello)
    if hello.initiator == key.node_id:
        raise _Refused("self_dial", hello.initiator)
    if not is_member(hello.initiator):
        raise _Refused("not_member", hello.initiator)
    eph = EphemeralKey.generate()
    shared = eph.exchange(hello.ephemeral)
    script = transcript(hello, key.node_id, eph.public)
    signature = key.sign(_ROLE_RESPONDER + script)
    await _send_plain(sock, DirectAccept(key.node_id, eph.public, signature))
    finish = decode(await reader.read_frame(_HANDSHAKE_MAX_BYTES), DirectFinish)
    verify_signature(hello.initiator, _ROLE_INITIATOR + script, finish.signature)
    if not is_member(hello.initiator):  # membership may have changed during the handshake
        raise _Refused("not_member", hello.initiator)
    rx_key, tx_key = derive_session_keys(shared, script)
    tx = SessionCipher(tx_key)
    ready = tx.seal(b"")
    await sock.send_all(_HEADER.pack(len(ready)) + ready)
    return _Session(hello.initiator, hello.protocol, tx, SessionCipher(rx_key))


async def connect_direct(
    key: NodeKey,
    addr: tuple[str, int],
    expected_remote: bytes,
    config: TransportConfig,
    *,
    protocol: str = DIRECT_PROTOCOL,
    is_member: Callable[[bytes], bool] | None = None,
) -> DirectStream:
    """Dial a node's direct listener and run the handshake.

    Args:
        key: our node key (signs the transcript).
        addr: (host, port) of the remote `open_direct_listener`.
        expected_remote: the node id we mean to reach; anyone else is refused.
        config: limits and deadlines; the whole dial + handshake is bounded by
            `connect_timeout_s`.
        protocol: named in the (signed) handshake; the listener's handler sees it.
        is_member: optional membership test, applied to the authenticated remote id.

    Returns:
        An open `DirectStream` to `expected_remote`.

    Raises:
        UnexpectedPeer: the listener is another node.
        InvalidSignature, MalformedMessage, DecryptionFailed: the peer broke the handshake.
        UnknownSender: `is_member` refused the remote.
        TransportBroken: unreachable, refused by the peer, or the deadline passed.
        ValueError: `expected_remote` is not a node id, or is ours.
    """
    check_node_id(expected_remote)
    if expected_remote == key.node_id:
        raise ValueError("connect_direct: cannot connect to ourselves")
    host, port = addr
    with _map_errors("direct connect", expected_remote), trio.fail_after(config.connect_timeout_s):
        sock = await trio.open_tcp_stream(host, port)
        try:
            _nodelay(sock)
            reader = FrameReader(sock)
            session = await _initiate(sock, reader, key, expected_remote, protocol, is_member)
        except BaseException:  # cleanup, then re-raise: not a boundary
            await _close_quietly(sock)
            raise
    log.debug("direct_connected", peer=short_id(expected_remote), protocol=protocol)
    return _stream(sock, reader, session, config)


def _stream(
    sock: trio.SocketStream, reader: FrameReader, session: _Session, config: TransportConfig
) -> DirectStream:
    return DirectStream(
        sock,
        reader,
        remote_id=session.remote_id,
        protocol=session.protocol,
        config=config,
        tx=session.tx,
        rx=session.rx,
    )


class DirectListener:
    """A running direct listener. Create with `open_direct_listener`.

    Attributes:
        node_id: our node id (what dialers pass as `expected_remote`).
        host, port: where it listens (the port actually bound when 0 was asked).
        refused: connections turned away (handshake failures and non-members).
        refusals: the same, by reason ("not_member", "too_many_streams", ...).
    """

    def __init__(
        self,
        key: NodeKey,
        host: str,
        port: int,
        config: TransportConfig,
        is_member: Callable[[bytes], bool],
        handler: StreamHandler,
        max_streams_per_peer: int = 32,
    ) -> None:
        self.node_id = key.node_id
        self.host = host
        self.port = port
        self.refused = 0
        self.refusals: Counter[str] = Counter()
        self._key = key
        self._config = config
        self._is_member = is_member
        self._handler = handler
        self._handshakes = trio.CapacityLimiter(_MAX_HANDSHAKES)
        self._max_per_peer = max_streams_per_peer
        self._streams: dict[bytes, set[DirectStream]] = {}

    @property
    def addr(self) -> tuple[str, int]:
        """(host, port) for `connect_direct`."""
        return (self.host, self.port)

    async def _serve_connection(self, sock: trio.SocketStream) -> None:
        try:
            stream = await self._accept(sock)
        except Exception:  # boundary: one connection's failure must not stop the listener
            log.exception("direct_accept_failed")
            return
        if stream is None:
            return
        peer = stream.remote_id
        live = self._streams.setdefault(peer, set())
        if len(live) >= self._max_per_peer:
            self._refuse("too_many_streams", peer, f"{len(live)} open")
            await stream.abort()
            return
        live.add(stream)
        try:
            await serve_stream(self._handler, stream, stream.abort)
        finally:
            live.discard(stream)
            if not live and self._streams.get(peer) is live:
                del self._streams[peer]

    async def disconnect(self, node_id: bytes) -> int:
        """Close every stream `node_id` has open with us (a peer just banned or revoked);
        returns how many. Its next handshake is refused by `is_member`."""
        streams = list(self._streams.get(node_id, ()))
        for stream in streams:
            await stream.abort()
        if streams:
            log.info("direct_peer_cut_off", peer=short_id(node_id), streams=len(streams))
        return len(streams)

    async def _accept(self, sock: trio.SocketStream) -> DirectStream | None:
        """Run the responder's handshake; None (logged, counted) if the dialer is turned away."""
        try:
            self._handshakes.acquire_nowait()
        except trio.WouldBlock:
            self._refuse("too_many_handshakes", None, "")
            return None
        try:
            _nodelay(sock)
            reader = FrameReader(sock)
            with trio.fail_after(self._config.connect_timeout_s):
                session = await _respond(sock, reader, self._key, self._is_member)
        except _Refused as exc:
            self._refuse(exc.reason, exc.peer, "")
        except PeerProtocolError as exc:
            self._refuse("handshake_failed", None, repr(exc))
        except (trio.TooSlowError, *_SOCKET_ERRORS) as exc:
            self.refused += 1
            self.refusals["handshake_broken"] += 1
            log.debug("direct_handshake_broken", error=repr(exc))
        else:
            peer = short_id(session.remote_id)
            log.debug("direct_accepted", peer=peer, protocol=session.protocol)
            return _stream(sock, reader, session, self._config)
        finally:
            self._handshakes.release()
        return None

    def _refuse(self, reason: str, peer: bytes | None, error: str) -> None:
        self.refused += 1
        self.refusals[reason] += 1
        log.warning(
            "direct_refused",
            reason=reason,
            peer=short_id(peer) if peer else None,
            error=error or None,
        )

    def __repr__(self) -> str:
        return (
            f"DirectListener(node={short_id(self.node_id)}, addr={self.host}:{self.port}, "
            f"refused={self.refused})"
        )


@asynccontextmanager
async def open_direct_listener(
    key: NodeKey,
    host: str,
    port: int,
    config: TransportConfig,
    is_member: Callable[[bytes], bool],
    handler: StreamHandler,
    *,
    max_streams_per_peer: int = 32,
) -> AsyncIterator[DirectListener]:
    """Listen for direct channels; `handler` runs once per admitted stream.

    Args:
        key: our node key.
        host: a literal IP address to listen on (e.g. "127.0.0.1").
        port: TCP port, or 0 for an ephemeral one (see `DirectListener.port`).
        config: limits and deadlines (`connect_timeout_s` bounds each handshake).
        is_member: admission test for the authenticated dialer's node id (give one that
            also refuses banned peers: it is the only gate of this listener).
        handler: called with each admitted `DirectStream` (its `protocol` is the one the
            dialer named); the stream is closed when it returns.
        max_streams_per_peer: streams one dialer may have open at once; more are refused.

    Error handling: a handler's exception is contained exactly as on other transports
    (`base.serve_stream`); refused and failed handshakes are logged and counted.
    Cancellation: leaving the context stops listening and closes every connection.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    if len(listeners) != 1:
        for listener in listeners:
            await listener.aclose()
        raise ValueError(
            f"direct listener: expected one address for host {host!r}, got {len(listeners)}"
        )
    bound = listeners[0].socket.getsockname()[1]
    direct = DirectListener(key, host, bound, config, is_member, handler, max_streams_per_peer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, direct, listeners, nursery)
        log.info("direct_listening", node=short_id(key.node_id), host=host, port=bound)
        try:
            yield direct
        finally:
            nursery.cancel_scope.cancel()
    log.info("direct_closed", node=short_id(key.node_id), port=bound)


async def _serve(
    direct: DirectListener, listeners: list[trio.SocketListener], nursery: trio.Nursery
) -> None:
    await trio.serve_listeners(direct._serve_connection, listeners, handler_nursery=nursery)
