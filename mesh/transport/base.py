"""The transport seam: what the mesh needs from a network, and its typed config.

Rule 1: everything above `mesh/transport/` talks to a network only through the `Transport`
and `Stream` protocols defined here; `memory.py` and `libp2p.py` are interchangeable and both
pass `tests/unit/transport_conformance.py`.
Rule 2: a stream carries whole frames (length-prefixed by `mesh.framing.frame`), never a byte
stream; a frame over `TransportConfig.max_frame_bytes` raises `OversizeMessage` on send and is
a peer protocol error on receive; `receive(max_bytes=...)` lowers the limit per call, and a
frame over it is refused on its length prefix, before its body is read.
Rule 3: every read and write has a deadline; a passed deadline, a reset or a vanished peer is
`TransportBroken`; using anything after we closed it is `ClosedError`.
Rule 4: admission is decided by the `set_admission` callback on the *authenticated* node id.
A non-member may only open streams on protocols registered with `open_to_all=True`; its
stream on any other protocol is reset and its connection closed, and its pubsub messages
(as forwarder or as author) are ignored. How long a non-member's idle connection may stay
is the node's decision (`set_connection_handler` tells it of every new connection).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from mesh.errors import ClosedError, PeerProtocolError, StreamRefused, TransportBroken

log = structlog.get_logger(__name__)

MiB = 1024 * 1024

#: Node ids are 32-byte Ed25519 verify keys (see `mesh.identity.NodeId`).
NODE_ID_BYTES = 32
_SIOCGIFADDR = 0x8915  # linux/sockios.h: get an interface's IPv4 address


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Limits and deadlines shared by every transport implementation.

    Attributes:
        max_frame_bytes: Largest payload of one stream frame (send and receive).
        read_timeout_s: Default deadline for `Stream.receive` of one whole frame.
        write_timeout_s: Deadline for `Stream.send` of one whole frame.
        connect_timeout_s: Deadline for `Transport.connect` and `Transport.open_stream`.
        max_publish_bytes: Largest pubsub payload; gossipsub 0.8.1 silently drops RPCs
            over 1 MiB, so the cap sits well below that and is checked on publish.
        subscription_buffer: Capacity of each `subscribe` channel; a full channel drops
            the message and counts it in `pubsub_dropped` instead of blocking the library.
        close_timeout_s: Grace for the shielded close when a transport context exits.
        pubsub_max_msgs_per_s: Gossipsub's spam guard: a node forwards at most this many
            messages per second per (forwarder, topic), its own publishes included; the
            rest are delivered locally but not passed on.
        gossip_heartbeat_s: Gossipsub's heartbeat (mesh maintenance, gossip emission);
            the library's default of 120 s makes a new member wait minutes for its mesh.
    """

    max_frame_bytes: int = 16 * MiB
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    max_publish_bytes: int = 512 * 1024
    subscription_buffer: int = 256
    close_timeout_s: float = 2.0
    pubsub_max_msgs_per_s: float = 10.0
    gossip_heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes: expected >= 1, got {self.max_frame_bytes}")
        for name in (
            "read_timeout_s",
            "write_timeout_s",
            "connect_timeout_s",
            "close_timeout_s",
            "pubsub_max_msgs_per_s",
            "gossip_heartbeat_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value}")
        if not 1 <= self.max_publish_bytes <= MiB - 64 * 1024:
            raise ValueError(
                f"max_publish_bytes: expected 1..{MiB - 64 * 1024}, got {self.max_publish_bytes}"
            )
        if self.subscription_buffer < 1:
            raise ValueError(f"subscription_buffer: expected >= 1, got {self.subscription_buffer}")


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 interface addresses, loopback last (Linux `SIOCGIFADDR`).

    For a node listening on 0.0.0.0: what it can advertise instead (an unspecified address
    is not dialable). Interfaces without an IPv4 address are skipped; on a system without
    the ioctl the result is empty.
    """
    found: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found.add(socket.inet_ntoa(reply[20:24]))
    return sorted(found, key=lambda a: (a.startswith("127."), a))


def check_node_id(node_id: bytes) -> bytes:
    """Return `node_id` if it is a 32-byte node id.

    Raises:
        ValueError: if it is not bytes of length 32.
    """
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_BYTES:
        got = len(node_id) if isinstance(node_id, bytes) else type(node_id).__name__
        raise ValueError(f"node id: expected {NODE_ID_BYTES} bytes, got {got}")
    return node_id


class Stream(Protocol):
    """A bidirectional, reliable, ordered stream of frames to one authenticated peer."""

    remote_id: bytes
    protocol: str

    async def send(self, payload: bytes) -> None:
        """Send one frame.

        Raises:
            OversizeMessage: payload over `max_frame_bytes` (nothing was sent).
            TransportBroken: reset, peer gone, or write deadline passed (the stream is
                unusable afterwards).
            ClosedError: we closed this stream or its transport.
        """
        ...

    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Receive one frame, waiting at most `timeout_s` (default: config read timeout).

        `max_bytes` bounds this frame (never above `max_frame_bytes`): a frame announced
        larger is refused on its length prefix, before its body is read or buffered, and
        the stream is reset. Protocols pass the size their message can have (a join request
        16 KiB, a ping 8 bytes), so nobody can make a node hold a transport-sized frame.

        Raises:
            TransportBroken: reset, peer closed or gone, or the deadline passed. A passed
                deadline leaves the stream usable (partial frames are kept).
            OversizeMessage: the peer announced a frame over the limit (stream reset).
            ClosedError: we closed this stream or its transport.
        """
        ...

    async def aclose(self) -> None:
        """Close the stream. Idempotent; never raises transport errors."""
        ...


StreamHandler = Callable[[Stream], Awaitable[None]]


class Transport(Protocol):
    """Connections, framed streams and pubsub between authenticated node ids."""

    node_id: bytes

    def listen_addrs(self) -> list[str]:
        """Addresses other nodes can pass to `connect` to reach us."""
        ...

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, open_to_all: bool = False
    ) -> None:
        """Serve `protocol`: `handler` runs once per incoming stream, which is closed after.

        Error handling: an exception from `handler` is logged and resets that stream; it
        never reaches the transport.
        """
        ...

    def set_admission(self, is_member: Callable[[bytes], bool]) -> None:
        """Install the membership test applied to authenticated remote node ids."""
        ...

    def set_connection_handler(self, on_connect: Callable[[bytes], None]) -> None:
        """Call `on_connect(node_id)` (synchronously, it must not block) for every new
        connection, inbound or outbound, once the remote is authenticated."""
        ...

    async def connect(self, node_id: bytes, addrs: list[str]) -> None:
        """Ensure a connection to `node_id` at one of `addrs` (replacing stale ones)."""
        ...

    async def open_stream(self, node_id: bytes, protocol: str) -> Stream:
        """Open a stream on `protocol`, dialling known addresses if not connected."""
        ...

    async def disconnect(self, node_id: bytes) -> None:
        """Close every connection to `node_id` (no error if there is none)."""
        ...

    def connected_peers(self) -> frozenset[bytes]:
        """Node ids with an open connection."""
        ...

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish `data` on `topic` to subscribed peers (best effort, signed by us)."""
        ...

    def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[tuple[bytes, bytes]]:
        """Receive `(author node id, data)` for messages on `topic` from other nodes."""
        ...


async def serve_stream(
    handler: StreamHandler, stream: Stream, abort: Callable[[], Awaitable[None]]
) -> None:
    """Run one incoming stream's handler as a boundary, then close the stream.

    Shared by every implementation so that handler failures look the same on all of them.

    Error handling: a transport failure or our own close ends the stream quietly (DEBUG);
    a stream the handler refused unread (`StreamRefused`, logged by it) is reset, which
    also drops what the peer already sent; a peer protocol error is logged at WARNING and
    resets the stream; anything else is our bug, logged with its traceback, and resets the
    stream. Nothing propagates: an escaping exception would crash a libp2p host
    (docs/architecture.md §13, pitfall 2).
    Cancellation: `trio.Cancelled` propagates (the stream is still closed).
    """
    peer = stream.remote_id.hex()[:8]
    try:
        await handler(stream)
    except (TransportBroken, ClosedError) as exc:
        log.debug("stream_handler_ended", peer=peer, protocol=stream.protocol, reason=str(exc))
    except StreamRefused:
        await abort()
    except PeerProtocolError as exc:
        log.warning("stream_peer_misbehaved", peer=peer, protocol=stream.protocol, error=repr(exc))
        await abort()
    except Exception:  # boundary: one stream's failure must not reach the transport
        log.exception("stream_handler_failed", peer=peer, protocol=stream.protocol)
        await abort()
    finally:
        await stream.aclose()


class Subscribers:
    """Local subscribers of pubsub topics: bounded channels, never blocking the transport.

    Rule: delivery never waits: a full subscriber loses the message (counted in `dropped`
    and logged), a closed one is forgotten.
    """

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._by_topic: dict[str, list[trio.MemorySendChannel[tuple[bytes, bytes]]]] = {}
        self.dropped = 0

    def __contains__(self, topic: object) -> bool:
        return topic in self._by_topic

    def topics(self) -> list[str]:
        return sorted(self._by_topic)

    def add(self, topic: str) -> trio.MemoryReceiveChannel[tuple[bytes, bytes]]:
        send, receive = trio.open_memory_channel[tuple[bytes, bytes]](self._buffer)
        self._by_topic.setdefault(topic, []).append(send)
        return receive

    def deliver(self, topic: str, item: tuple[bytes, bytes]) -> None:
        for send in list(self._by_topic.get(topic, [])):
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                self.dropped += 1
                log.warning("pubsub_dropped", topic=topic, reason="subscriber_full")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._by_topic[topic].remove(send)

    def close(self, topic: str | None = None) -> None:
        """Close the channels of `topic` (all topics when None) and forget them."""
        topics = [topic] if topic is not None else list(self._by_topic)
        for t in topics:
            for send in self._by_topic.pop(t, []):
                send.close()
