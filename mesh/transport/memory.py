"""An in-process network for tests and simulations, with injectable faults.

Rule 1: same interface and semantics as `libp2p.py` (both pass the conformance suite): frame
limits, deadlines, admission, `open_to_all` protocols, pubsub that skips our own messages.
Rule 2: all randomness comes from the `random.Random` given to `MemoryNetwork`, and all time
from trio's clock, so under `MockClock`/`autojump_clock` a seed fixes which hops are dropped
or duplicated and when each arrives; the order of deliveries due at the same virtual instant
follows trio's scheduler (deterministic once Hypothesis is imported).
Rule 3: stream frames are reliable and in order (like TCP) but delayed by the link's
`delay_s`; a partition or disconnect breaks streams (`TransportBroken`) and loses frames
in flight.
Rule 4: pubsub floods hop by hop to connected peers subscribed to the topic, with a bounded
seen-cache and the per-(forwarder, topic) rate guard of gossipsub. Each hop may be dropped,
delayed or duplicated per the link's `LinkFaults`; a duplicate models a replay, so it bypasses
the seen-cache and reaches the application again (our replay protection must catch it), but
is not forwarded.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from mesh.errors import ClosedError, OversizeMessage, TransportBroken
from mesh.transport.base import (
    StreamHandler,
    Subscribers,
    TransportConfig,
    check_node_id,
    serve_stream,
)

log = structlog.get_logger(__name__)

_WINDOW_BYTES = 16 * 1024 * 1024  # per-direction buffer, like Yamux's maximum window
_SEEN_CAPACITY = 8192


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """Faults on the directed link from one node to another.

    Attributes:
        delay_s: One-way latency for stream frames, connects and pubsub hops.
        drop_probability: Chance that one pubsub hop is lost (streams stay reliable).
        duplicate_probability: Chance that one pubsub hop is delivered twice.
    """

    delay_s: float = 0.0
    drop_probability: float = 0.0
    duplicate_probability: float = 0.0

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and math.isfinite(self.delay_s)):
            raise ValueError(f"delay_s: expected a finite number >= 0, got {self.delay_s}")
        for name in ("drop_probability", "duplicate_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected 0..1, got {value}")


NO_FAULTS = LinkFaults()


class MemoryNetwork:
    """The hub all memory transports of one trio run attach to.

    Args:
        rng: The only source of randomness (drops, duplicates).
        default_faults: Faults of every link without its own setting.
    """

    def __init__(self, *, rng: random.Random, default_faults: LinkFaults = NO_FAULTS) -> None:
        self.rng = rng
        self._default = default_faults
        self._faults: dict[tuple[bytes, bytes], LinkFaults] = {}
        self._nodes: dict[bytes, MemoryTransport] = {}
        self._incarnations: dict[bytes, int] = {}
        self._group_of: dict[bytes, int] | None = None

    def set_link_faults(
        self, src: bytes, dst: bytes, faults: LinkFaults, *, both_ways: bool = True
    ) -> None:
        """Set the faults of the link `src -> dst` (and `dst -> src` if `both_ways`)."""
        self._faults[(src, dst)] = faults
        if both_ways:
            self._faults[(dst, src)] = faults

    def faults(self, src: bytes, dst: bytes) -> LinkFaults:
        """The faults on the link `src -> dst`."""
        return self._faults.get((src, dst), self._default)

    def partition(self, groups: Iterable[Iterable[bytes]]) -> None:
        """Split the network: nodes in different groups cannot talk.

        Nodes not named in any group form one more group together. Connections across
        groups break at once (their streams raise `TransportBroken`).
        """
        group_of: dict[bytes, int] = {}
        for index, group in enumerate(groups):
            for node_id in group:
                if node_id in group_of:
                    raise ValueError(f"node {node_id.hex()[:8]} is in two partition groups")
                group_of[node_id] = index
        self._group_of = group_of
        for node in list(self._nodes.values()):
            for peer in list(node._links):
                if not self.can_talk(node.node_id, peer):
                    node._drop_link(peer, "network partitioned")
        log.info("network_partitioned", groups=len(set(group_of.values())) + 1)

    def heal(self) -> None:
        """Remove the partition (connections are not restored; nodes must reconnect)."""
        self._group_of = None
        log.info("network_healed")

    def can_talk(self, a: bytes, b: bytes) -> bool:
        """Whether `a` and `b` are on the same side of the current partition."""
        if self._group_of is None:
            return True
        return self._group_of.get(a, -1) == self._group_of.get(b, -1)

    def _register(self, node: MemoryTransport) -> str:
        if node.node_id in self._nodes:
            raise ValueError(f"node {node.node_id.hex()[:8]} is already on this network")
        self._nodes[node.node_id] = node
        incarnation = self._incarnations.get(node.node_id, 0) + 1
        self._incarnations[node.node_id] = incarnation
        # A new incarnation is like a restart on a new port: old addresses stop working.
        return f"/memory/{node.node_id.hex()}/{incarnation}"

    def _unregister(self, node: MemoryTransport) -> None:
        if self._nodes.get(node.node_id) is node:
            del self._nodes[node.node_id]

    def _lookup(self, node_id: bytes, addrs: list[str]) -> MemoryTransport | None:
        node = self._nodes.get(node_id)
        if node is None or node._addr not in addrs:
            return None
        return node

    def __repr__(self) -> str:
        return (
            f"MemoryNetwork(nodes={len(self._nodes)}, links_with_faults={len(self._faults)}, "
            f"partitioned={self._group_of is not None})"
        )


class _Pipe:
    """One direction of a stream: a bounded queue of (deliver_at, frame)."""

    def __init__(self) -> None:
        self._queue: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self._last_at = -math.inf
        self._lot = trio.lowlevel.ParkingLot()
        self.broken: str | None = None
        self.writer_closed = False
        self.reader_closed = False

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self._queue.clear()
        self._bytes = 0
        self._lot.unpark_all()

    async def put(self, payload: bytes, delay_s: float) -> None:
        while self.broken is None and self._queue and self._bytes + len(payload) > _WINDOW_BYTES:
            await self._lot.park()
        if self.broken is not None:
            raise TransportBroken(self.broken)
        if self.reader_closed:
            await trio.lowlevel.checkpoint()
            return  # like a half-closed Yamux stream: accepted, never read
        self._last_at = max(trio.current_time() + delay_s, self._last_at)
        self._queue.append((self._last_at, payload))
        self._bytes += len(payload)
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def get(self, limit: int) -> bytes:
        """The next frame once due; a frame over `limit` is refused before it is taken
        (the memory analogue of refusing on the length prefix)."""
        while True:
            if self.broken is not None:
                raise TransportBroken(self.broken)
            if self._queue:
                deliver_at, payload = self._queue[0]
                if len(payload) > limit:
                    raise OversizeMessage(
                        f"frame of {len(payload)} bytes announced, over the limit of {limit}"
                    )
                if trio.current_time() >= deliver_at:
                    self._queue.popleft()
                    self._bytes -= len(payload)
                    self._lot.unpark_all()
                    await trio.lowlevel.checkpoint()
                    return payload
                with trio.move_on_at(deliver_at):
                    await self._lot.park()
            elif self.writer_closed:
                raise TransportBroken("peer closed the stream")
            else:
                await self._lot.park()

    def close_writer(self) -> None:
        self.writer_closed = True
        self._lot.unpark_all()


class MemoryStream:
    """A `Stream` between two memory transports."""

    def __init__(
        self,
        owner: MemoryTransport,
        remote_id: bytes,
        protocol: str,
        outgoing: _Pipe,
        incoming: _Pipe,
    ) -> None:
        self.remote_id = remote_id
        self.protocol = protocol
        self._owner = owner
        self._config = owner._config
        self._out = outgoing
        self._in = incoming
        self._closed = False
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()

    def _check_usable(self) -> None:
        if self._closed or self._owner._closed:
            raise ClosedError(f"stream {self.protocol} to {self.remote_id.hex()[:8]} is closed")

    async def send(self, payload: bytes) -> None:
        """Send one frame within the write deadline (see `base.Stream.send`)."""
        if len(payload) > self._config.max_frame_bytes:
            raise OversizeMessage(
                f"frame of {len(payload)} bytes, over the limit of {self._config.max_frame_bytes}"
            )
        self._check_usable()
        delay_s = self._owner._network.faults(self._owner.node_id, self.remote_id).delay_s
        async with self._send_lock:
            try:
                with trio.fail_after(self._config.write_timeout_s):
                    await self._out.put(bytes(payload), delay_s)
            except trio.TooSlowError as exc:
                self._reset("write deadline passed")
                peer = self.remote_id.hex()[:8]
                raise TransportBroken(f"send to {peer}: deadline passed") from exc

    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Receive one frame within the deadline (see `base.Stream.receive`)."""
        self._check_usable()
        deadline = self._config.read_timeout_s if timeout_s is None else timeout_s
        limit = self._config.max_frame_bytes
        if max_bytes is not None:
            limit = max(0, min(max_bytes, limit))
        async with self._receive_lock:
            try:
                with trio.fail_after(deadline):
                    return await self._in.get(limit)
            except trio.TooSlowError as exc:
                raise TransportBroken(
                    f"receive from {self.remote_id.hex()[:8]}: deadline passed"
                ) from exc
            except OversizeMessage:
                self._reset("peer sent an oversize frame")
                raise

    async def aclose(self) -> None:
        """Close our side (the peer's reads end once it drained what we sent). Idempotent."""
        if not self._closed:
            self._closed = True
            self._out.close_writer()
            self._in.reader_closed = True
        await trio.lowlevel.checkpoint()

    def _finished(self) -> bool:
        return self._closed or self._in.broken is not None

    def _reset(self, reason: str) -> None:
        self._out.break_(reason)
        self._in.break_(reason)

    async def _abort(self) -> None:
        self._reset("stream reset by peer")
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return (
            f"MemoryStream(remote={self.remote_id.hex()[:8]}, protocol={self.protocol!r}, "
            f"closed={self._closed}, broken={self._in.broken is not None})"
        )


_MessageId = tuple[bytes, int]


class MemoryTransport:
    """A `Transport` on a `MemoryNetwork`. Create with `open_memory_transport`."""

    def __init__(
        self, network: MemoryNetwork, node_id: bytes, config: TransportConfig, nursery: trio.Nursery
    ) -> None:
        self.node_id = check_node_id(node_id)
        self._network = network
        self._config = config
        self._nursery = nursery
        self._handlers: dict[str, tuple[StreamHandler, bool]] = {}
        self._is_member: Callable[[bytes], bool] = lambda _node: False
        self._on_connect: Callable[[bytes], None] = lambda _node: None
        self._links: dict[bytes, list[MemoryStream]] = {}
        self._known_addrs: dict[bytes, list[str]] = {}
        self._subscribers = Subscribers(self._config.subscription_buffer)
        self._seen: OrderedDict[_MessageId, None] = OrderedDict()
        self._rate: dict[tuple[bytes, str], deque[float]] = {}
        self._seqno = 0
        self._closed = False
        self._addr = network._register(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self.node_id.hex()[:8]} is closed")

    def _admits(self, node_id: bytes) -> bool:
        return node_id == self.node_id or self._is_member(node_id)

    def listen_addrs(self) -> list[str]:
        """Our address on the memory network (changes when the node id reattaches)."""
        return [self._addr]

    def set_admission(self, is_member: Callable[[bytes], bool]) -> None:
        """Install the membership test applied to remote node ids (default: nobody)."""
        self._is_member = is_member

    def set_connection_handler(self, on_connect: Callable[[bytes], None]) -> None:
        """See `base.Transport.set_connection_handler`."""
        self._on_connect = on_connect

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, open_to_all: bool = False
    ) -> None:
        """Serve `protocol` with `handler` (see `base.Transport.set_stream_handler`)."""
        self._check_open()
        self._handlers[protocol] = (handler, open_to_all)

    async def connect(self, node_id: bytes, addrs: list[str]) -> None:
        """Connect to `node_id` at one of `addrs` (see `base.Transport.connect`).

        Raises:
            TransportBroken: nobody listens at `addrs`, the link is partitioned, or the
                link delay exceeds `connect_timeout_s`.
            ClosedError: the transport is closed.
        """
        self._check_open()
        check_node_id(node_id)
        if node_id in self._links:
            return
        if node_id == self.node_id:
            raise ValueError("connect: cannot connect to ourselves")
        self._known_addrs[node_id] = list(addrs)
        delay_s = self._network.faults(self.node_id, node_id).delay_s
        try:
            with trio.fail_after(self._config.connect_timeout_s):
                await trio.sleep(2 * delay_s)  # one round trip for the handshake
        except trio.TooSlowError as exc:
            raise TransportBroken(f"connect to {node_id.hex()[:8]}: deadline passed") from exc
        self._check_open()
        peer = self._network._lookup(node_id, list(addrs))
        if peer is None or peer._closed:
            raise TransportBroken(f"connect to {node_id.hex()[:8]}: nobody listens at {addrs}")
        if not self._network.can_talk(self.node_id, node_id):
            raise TransportBroken(f"connect to {node_id.hex()[:8]}: network partitioned")
        if node_id not in self._links:
            self._links[node_id] = []
            peer._links[self.node_id] = []
            log.debug("peer_connected", peer=node_id.hex()[:8])
            self._on_connect(node_id)
            peer._on_connect(self.node_id)

    async def open_stream(self, node_id: bytes, protocol: str) -> MemoryStream:
        """Open a stream, connecting first if needed (see `base.Transport.open_stream`).

        Raises:
            TransportBroken: no connection, or the peer does not serve `protocol`.
            ClosedError: the transport is closed.
        """
        self._check_open()
        if node_id not in self._links:
            if node_id not in self._known_addrs:
                raise TransportBroken(f"open_stream to {node_id.hex()[:8]}: no known address")
            await self.connect(node_id, self._known_addrs[node_id])
        delay_s = self._network.faults(self.node_id, node_id).delay_s
        with trio.move_on_after(self._config.connect_timeout_s) as scope:
            await trio.sleep(2 * delay_s)  # multistream-select round trip
        self._check_open()
        peer = self._network._nodes.get(node_id)
        if scope.cancelled_caught or peer is None or node_id not in self._links:
            raise TransportBroken(f"open_stream to {node_id.hex()[:8]}: connection lost")
        if protocol not in peer._handlers:
            raise TransportBroken(
                f"open_stream to {node_id.hex()[:8]}: protocol {protocol!r} not supported"
            )
        return peer._accept(self.node_id, protocol)

    def _accept(self, opener_id: bytes, protocol: str) -> MemoryStream:
        handler, open_to_all = self._handlers[protocol]
        opener = self._network._nodes[opener_id]
        forward, backward = _Pipe(), _Pipe()
        ours = MemoryStream(self, opener_id, protocol, backward, forward)
        theirs = MemoryStream(opener, self.node_id, protocol, forward, backward)
        if not open_to_all and not self._admits(opener_id):
            log.warning(
                "stream_refused", reason="not_member", peer=opener_id.hex()[:8], protocol=protocol
            )
            ours._reset("stream refused: not a member")
            self._drop_link(opener_id, "connection closed: not a member")
            return theirs
        for node, peer_id, stream in ((self, opener_id, ours), (opener, self.node_id, theirs)):
            live = [s for s in node._links[peer_id] if not s._finished()]
            node._links[peer_id] = [*live, stream]
        self._nursery.start_soon(serve_stream, handler, ours, ours._abort)
        return theirs

    async def disconnect(self, node_id: bytes) -> None:
        """Close the connection to `node_id`, breaking its streams."""
        self._check_open()
        self._drop_link(node_id, "disconnected")
        await trio.lowlevel.checkpoint()

    def _drop_link(self, node_id: bytes, reason: str) -> None:
        for stream in self._links.pop(node_id, []):
            stream._reset(reason)
        peer = self._network._nodes.get(node_id)
        if peer is not None:
            for stream in peer._links.pop(self.node_id, []):
                stream._reset(reason)

    def connected_peers(self) -> frozenset[bytes]:
        """Node ids we have a connection to."""
        return frozenset(self._links)

    async def publish(self, topic: str, data: bytes) -> None:
        """Flood `data` on `topic` (see the module docstring for fault semantics).

        Raises:
            OversizeMessage: `data` is over `max_publish_bytes`.
            ClosedError: the transport is closed.
        """
        self._check_open()
        if len(data) > self._config.max_publish_bytes:
            raise OversizeMessage(
                f"publish on {topic!r}: {len(data)} bytes, over the limit of "
                f"{self._config.max_publish_bytes}"
            )
        self._seqno += 1
        msg_id = (self.node_id, self._seqno)
        self._remember(msg_id)
        self._flood(topic, msg_id, bytes(data), came_from=None)
        await trio.lowlevel.checkpoint()

    def _flood(self, topic: str, msg_id: _MessageId, data: bytes, came_from: bytes | None) -> None:
        if not self._within_rate(came_from or self.node_id, topic):
            forwarder = (came_from or self.node_id).hex()[:8]
            log.warning("pubsub_rate_limited", topic=topic, forwarder=forwarder)
            return
        rng = self._network.rng
        for peer_id in list(self._links):
            peer = self._network._nodes.get(peer_id)
            if peer_id == came_from or peer is None or topic not in peer._subscribers:
                continue
            faults = self._network.faults(self.node_id, peer_id)
            if rng.random() < faults.drop_probability:
                continue
            replays = [False, True] if rng.random() < faults.duplicate_probability else [False]
            for replay in replays:
                peer._nursery.start_soon(
                    peer._receive_hop, self.node_id, topic, msg_id, data, faults.delay_s, replay
                )

    async def _receive_hop(
        self,
        sender: bytes,
        topic: str,
        msg_id: _MessageId,
        data: bytes,
        delay_s: float,
        replay: bool,
    ) -> None:
        await trio.sleep(delay_s)
        if self._closed or sender not in self._links:
            return  # the connection broke while the message was in flight
        author = msg_id[0]
        if not self._admits(sender):
            log.warning("pubsub_refused", reason="forwarder_not_member", peer=sender.hex()[:8])
            return
        if not self._admits(author):
            log.warning("pubsub_refused", reason="author_not_member", peer=author.hex()[:8])
            return
        if not replay:
            if msg_id in self._seen:
                return
            self._remember(msg_id)
            self._flood(topic, msg_id, data, came_from=sender)
        if author != self.node_id:
            self._subscribers.deliver(topic, (author, data))

    def _within_rate(self, forwarder: bytes, topic: str) -> bool:
        """Gossipsub's spam guard: forward at most `pubsub_max_msgs_per_s` per second."""
        now = trio.current_time()
        stamps = self._rate.setdefault((forwarder, topic), deque())
        while stamps and stamps[0] <= now - 1.0:
            stamps.popleft()
        if len(stamps) >= self._config.pubsub_max_msgs_per_s:
            return False
        stamps.append(now)
        return True

    def _remember(self, msg_id: _MessageId) -> None:
        self._seen[msg_id] = None
        if len(self._seen) > _SEEN_CAPACITY:
            self._seen.popitem(last=False)

    def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[tuple[bytes, bytes]]:
        """Bounded channel of `(author node id, data)` from other nodes on `topic`.

        A full channel drops the message and counts it in `pubsub_dropped`; close the
        channel to stop receiving.
        """
        self._check_open()
        return self._subscribers.add(topic)

    @property
    def pubsub_dropped(self) -> int:
        return self._subscribers.dropped

    def _shutdown(self) -> None:
        self._closed = True
        for peer_id in list(self._links):
            self._drop_link(peer_id, "peer transport closed")
        self._subscribers.close()
        self._network._unregister(self)

    def __repr__(self) -> str:
        return (
            f"MemoryTransport(node={self.node_id.hex()[:8]}, closed={self._closed}, "
            f"peers={len(self._links)}, topics={self._subscribers.topics()}, "
            f"pubsub_dropped={self.pubsub_dropped})"
        )


@asynccontextmanager
async def open_memory_transport(
    network: MemoryNetwork, node_id: bytes, config: TransportConfig | None = None
) -> AsyncIterator[MemoryTransport]:
    """Attach `node_id` to `network` and yield its transport.

    Leaving the context breaks all its connections and detaches it; a later attach of the
    same node id gets a new address (like a restart on a new port).
    """
    async with trio.open_nursery() as nursery:
        transport = MemoryTransport(network, node_id, config or TransportConfig(), nursery)
        try:
            yield transport
        finally:
            transport._shutdown()
            nursery.cancel_scope.cancel()
