"""The real network: py-libp2p 0.8.1 hosts behind the `Transport` protocol.

Rule 1: this is the only module that imports libp2p; no libp2p exception or type escapes it
(`_map_errors` converts them to `TransportBroken`).
Rule 2: Noise only, Yamux only, one connection per peer, gossipsub with StrictSign, no mDNS,
no UPnP, no auto-connector: the mesh decides whom to dial (see docs/architecture.md §13).
Rule 3: the PeerID is derived from our 32-byte Ed25519 seed, so the Noise handshake
authenticates the same key that signs application envelopes; node id == public key bytes.
Rule 4: frames are ours (`mesh.framing.frame`) over libp2p streams, with a deadline on every read
and write; `libp2p.io.utils.read_exactly` is never used (it fails over ~6.5 MB).
Rule 5: every stream handler is a boundary: nothing escapes it (an escaping exception crashes
the host or leaves a zombie connection, pitfall 2).
Rule 6: we never advertise an address nobody can dial: a host listening on 0.0.0.0
advertises the configured hosts, or else this machine's interface addresses.

Admission, what is enforced where:
- stream protocols registered here: a non-member's stream on a members-only protocol is reset
  and its connection closed (from a separate task, not from inside the handler);
- gossipsub streams: an inbound pubsub stream from a non-member is reset, so we never read its
  RPCs nor learn its subscriptions (hence never forward to it);
- gossipsub messages: a topic validator drops messages whose *author* is not a member, even
  when a member forwards them;
- the Noise handshake itself is not gated: a non-member must be able to reach the join
  protocol (`open_to_all=True`).
After a peer's membership changes while it is connected, `disconnect` and `connect` again so
gossipsub rebuilds its per-peer streams.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import multiaddr
import multiaddr.exceptions
import structlog
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as new_ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol, TSecurityOptions
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from mesh.closing import close_bounded
from mesh.errors import ClosedError, OversizeMessage, TransportBroken
from mesh.framing import FrameDecoder, frame
from mesh.transport.base import (
    StreamHandler,
    Subscribers,
    TransportConfig,
    check_node_id,
    local_ipv4_addresses,
    serve_stream,
)

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetConn, INetStream, INetwork
    from libp2p.pubsub.pb import rpc_pb2

log = structlog.get_logger(__name__)

# Gossipsub tuned for a small home mesh: heartbeat from `TransportConfig.gossip_heartbeat_s`
# (library default 120 s); eclipse protection off because every member is authenticated and
# tests run all peers on 127.0.0.1.
_GOSSIP_DEGREE = (6, 4, 12)
_UNSPECIFIED = "/ip4/0.0.0.0/"
_READ_CHUNK = 64 * 1024  # smallest read while a frame is incomplete (see Libp2pStream.receive)
_LIBP2P_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    PeerStoreError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def peer_id_of(node_id: bytes) -> str:
    """Return the base58 libp2p PeerID (`12D3KooW...`) for a 32-byte node id."""
    public = Ed25519PublicKey.from_bytes(check_node_id(node_id))
    return str(ID.from_pubkey(public).to_base58())


def node_id_of(peer_id: str) -> bytes:
    """Return the 32-byte node id inlined in a base58 Ed25519 PeerID.

    Raises:
        ValueError: not a PeerID, or not one of an inlined Ed25519 key.
    """
    try:
        return _node_id_of(ID.from_base58(peer_id))
    except (ValueError, BaseLibp2pError) as exc:
        raise ValueError(f"peer id: expected an Ed25519 PeerID, got {peer_id!r}") from exc


def _node_id_of(pid: ID) -> bytes:
    public = pid.extract_public_key()
    if public is None or public.get_type() != KeyType.Ed25519:
        raise ValueError(f"peer id {pid}: expected an inlined Ed25519 key")
    return check_node_id(public.to_bytes())


def _key_pair(seed: bytes) -> KeyPair:
    if not isinstance(seed, bytes) or len(seed) != 32:
        got = f"{len(seed)} bytes" if isinstance(seed, bytes) else type(seed).__name__
        raise ValueError(f"seed: expected 32 bytes, got {got}")
    private = Ed25519PrivateKey.new(seed)
    return KeyPair(private, private.get_public_key())


@contextmanager
def _map_errors(what: str, peer: bytes) -> Iterator[None]:
    """Convert libp2p/OS failures and passed deadlines into `TransportBroken`."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise TransportBroken(f"{what} to {peer.hex()[:8]}: deadline passed") from exc
    except _LIBP2P_ERRORS as exc:
        raise TransportBroken(f"{what} to {peer.hex()[:8]}: {type(exc).__name__}: {exc}") from exc


async def _reset_quietly(net_stream: INetStream) -> None:
    await close_bounded(net_stream.reset, ignore=_LIBP2P_ERRORS)


class Libp2pStream:
    """A framed `Stream` over one libp2p (Yamux) stream.

    Concurrency: one sender and one receiver at a time (each side holds its own lock), so
    a large frame is never interleaved with another.
    Flow control (pitfall 3): nothing drains the stream in the background. If the receiver
    stops reading with > 256 KiB in flight, Yamux fails the sender's write after 5 s (seen
    here as `TransportBroken`) and the receiver's next read runs into its own deadline.
    """

    def __init__(
        self,
        net_stream: INetStream,
        remote_id: bytes,
        protocol: str,
        config: TransportConfig,
        owner_closed: Callable[[], bool],
    ) -> None:
        self.remote_id = remote_id
        self.protocol = protocol
        self._net = net_stream
        self._config = config
        self._decoder = FrameDecoder(config.max_frame_bytes)
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._owner_closed = owner_closed
        self._closed = False
        self._broken: str | None = None

    def _check_usable(self) -> None:
        if self._closed or self._owner_closed():
            raise ClosedError(f"stream {self.protocol} to {self.remote_id.hex()[:8]} is closed")
        if self._broken is not None:
            raise TransportBroken(self._broken)

    async def send(self, payload: bytes) -> None:
        """Send one frame within the write deadline (see `base.Stream.send`)."""
        data = frame(payload, max_frame_bytes=self._config.max_frame_bytes)
        self._check_usable()
        async with self._send_lock:
            try:
                with (
                    _map_errors("send", self.remote_id),
                    trio.fail_after(self._config.write_timeout_s),
                ):
                    await self._net.write(data)
            except TransportBroken as exc:
                # A half-written frame corrupts the stream: it is unusable from here on.
                self._broken = str(exc)
                await _reset_quietly(self._net)
                raise

    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        """Receive one frame within the deadline (see `base.Stream.receive`).

        Reads are sized by what the current frame still needs (`FrameDecoder.wanted_bytes`),
        at least `_READ_CHUNK` but never more than the call's limit plus its header, so the
        bytes we hold stay within one frame of `max_bytes`; the rest stays with Yamux (which in
        py-libp2p 0.8.1 buffers even what a peer sends past its window, with a warning).
        """
        self._check_usable()
        deadline = self._config.read_timeout_s if timeout_s is None else timeout_s
        async with self._receive_lock:
            with _map_errors("receive", self.remote_id), trio.fail_after(deadline):
                while True:
                    try:
                        payload = self._decoder.next_frame(max_bytes)
                        if payload is not None:
                            return payload
                        want = self._decoder.wanted_bytes(max_bytes)
                    except OversizeMessage:
                        self._broken = "peer sent an oversize frame"
                        await _reset_quietly(self._net)
                        raise
                    floor = min(_READ_CHUNK, self._decoder.limit(max_bytes) + 4)
                    self._decoder.push(await self._read_chunk(max(want, floor)))

    async def _read_chunk(self, n: int) -> bytes:
        try:
            chunk = await self._net.read(n)
        except EOFError as exc:  # StreamEOF: the peer half-closed its side
            self._broken = f"stream {self.protocol}: peer closed it"
            raise TransportBroken(self._broken) from exc
        except _LIBP2P_ERRORS as exc:  # reset or connection lost: the stream is done
            self._broken = f"stream {self.protocol}: {type(exc).__name__}: {exc}"
            raise TransportBroken(self._broken) from exc
        if not chunk:
            self._broken = f"stream {self.protocol}: peer closed it"
            raise TransportBroken(self._broken)
        return chunk

    async def aclose(self) -> None:
        """Close the stream (shielded, bounded). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await close_bounded(self._close_or_reset, self._config.close_timeout_s)

    async def _close_or_reset(self) -> None:
        try:
            await self._net.close()
        except _LIBP2P_ERRORS:
            await _reset_quietly(self._net)

    async def _reset(self) -> None:
        self._closed = True
        await _reset_quietly(self._net)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "open")
        return (
            f"Libp2pStream(remote={self.remote_id.hex()[:8]}, protocol={self.protocol!r}, "
            f"{state}, buffered_bytes={self._decoder.pending_bytes})"
        )


class Libp2pTransport:
    """`Transport` over one libp2p host. Create with `open_libp2p_transport`."""

    def __init__(
        self,
        host: IHost,
        pubsub: Pubsub,
        nursery: trio.Nursery,
        config: TransportConfig,
        advertise_hosts: tuple[str, ...] = (),
    ) -> None:
        self.node_id = _node_id_of(host.get_id())
        self._host = host
        self._pubsub = pubsub
        self._nursery = nursery
        self._config = config
        self._is_member: Callable[[bytes], bool] = lambda _node: False
        self._on_connect: Callable[[bytes], None] = lambda _node: None
        self._advertise = advertise_hosts
        self._subscribers = Subscribers(self._config.subscription_buffer)
        self._closed = False

    def _is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self.node_id.hex()[:8]} is closed")

    def _admits(self, node_id: bytes) -> bool:
        return node_id == self.node_id or self._is_member(node_id)

    def listen_addrs(self) -> list[str]:
        """Our dialable addresses, each ending in `/p2p/<our PeerID>` (Rule 6: an address
        on 0.0.0.0 becomes one per advertised host, never 0.0.0.0 itself)."""
        out: list[str] = []
        for addr in (str(a) for a in self._host.get_addrs()):
            if not addr.startswith(_UNSPECIFIED):
                out.append(addr)
                continue
            hosts = self._advertise or tuple(local_ipv4_addresses()) or ("127.0.0.1",)
            out += [f"/ip4/{h}/{addr[len(_UNSPECIFIED) :]}" for h in hosts]
        return out

    def set_connection_handler(self, on_connect: Callable[[bytes], None]) -> None:
        """See `base.Transport.set_connection_handler` (fed by the swarm's notifee)."""
        self._on_connect = on_connect

    def _connected(self, pid: ID) -> None:
        try:
            remote = _node_id_of(pid)
        except ValueError:
            return  # not an Ed25519 peer: its streams are refused anyway
        self._on_connect(remote)

    def set_admission(self, is_member: Callable[[bytes], bool]) -> None:
        """Install the membership test (see the module docstring for where it applies).

        Until it is called no remote node is a member: only `open_to_all` protocols work.
        """
        self._is_member = is_member

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, open_to_all: bool = False
    ) -> None:
        """Serve `protocol` with `handler` (see `base.Transport.set_stream_handler`)."""
        self._check_open()

        async def on_stream(net_stream: INetStream) -> None:
            await self._serve(net_stream, protocol, handler, open_to_all)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def _serve(
        self, net_stream: INetStream, protocol: str, handler: StreamHandler, open_to_all: bool
    ) -> None:
        pid = net_stream.muxed_conn.peer_id
        try:
            remote = _node_id_of(pid)
        except ValueError:
            log.warning("stream_refused", reason="non_ed25519_peer", protocol=protocol)
            await _reset_quietly(net_stream)
            return
        if not open_to_all and not self._admits(remote):
            log.warning(
                "stream_refused", reason="not_member", peer=remote.hex()[:8], protocol=protocol
            )
            await _reset_quietly(net_stream)
            if not self._closed:  # our nursery is still open
                # Closing the connection from inside its own handler task would cancel us.
                self._nursery.start_soon(self._disconnect_quietly, pid)
            return
        stream = Libp2pStream(net_stream, remote, protocol, self._config, self._is_closed)
        await serve_stream(handler, stream, stream._reset)

    async def _disconnect_quietly(self, pid: ID) -> None:
        with trio.move_on_after(self._config.close_timeout_s):
            try:
                await self._host.disconnect(pid)
            except _LIBP2P_ERRORS as exc:
                log.debug("disconnect_failed", error=repr(exc))

    async def connect(self, node_id: bytes, addrs: list[str]) -> None:
        """Connect to `node_id` at `addrs`, forgetting stale addresses first.

        Pitfall 5: a peer restarted on a new port is otherwise dialled at its old address and
        then blocked for 60 s by the negative dial cache, so both are cleared before dialling.

        Raises:
            ValueError: an address is malformed or names another PeerID.
            TransportBroken: the dial or handshake failed or passed `connect_timeout_s`.
            ClosedError: the transport is closed.
        """
        self._check_open()
        if node_id == self.node_id:
            raise ValueError("connect: cannot connect to ourselves")
        pid = ID.from_base58(peer_id_of(node_id))
        if _swarm(self._host).get_connections(pid):
            return
        info = PeerInfo(pid, [_strip_p2p(addr, pid) for addr in addrs])
        self._host.get_peerstore().clear_addrs(pid)
        _swarm(self._host).unblock_peer(pid)
        with _map_errors("connect", node_id), trio.fail_after(self._config.connect_timeout_s):
            await self._host.connect(info)
        log.debug("peer_connected", peer=node_id.hex()[:8])

    async def open_stream(self, node_id: bytes, protocol: str) -> Libp2pStream:
        """Open a framed stream (see `base.Transport.open_stream`).

        Raises:
            TransportBroken: no connection could be made, or the protocol was refused.
            ClosedError: the transport is closed.
        """
        self._check_open()
        pid = ID.from_base58(peer_id_of(node_id))
        with _map_errors("open_stream", node_id), trio.fail_after(self._config.connect_timeout_s):
            net_stream = await self._host.new_stream(pid, [TProtocol(protocol)])
        return Libp2pStream(net_stream, node_id, protocol, self._config, self._is_closed)

    async def disconnect(self, node_id: bytes) -> None:
        """Close all connections to `node_id`."""
        self._check_open()
        pid = ID.from_base58(peer_id_of(node_id))
        with _map_errors("disconnect", node_id), trio.fail_after(self._config.connect_timeout_s):
            await self._host.disconnect(pid)

    def connected_peers(self) -> frozenset[bytes]:
        """Node ids with at least one open connection."""
        connections = _swarm(self._host).connections
        return frozenset(_node_id_of(pid) for pid, conns in connections.items() if conns)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish signed `data` on `topic` via gossipsub.

        Raises:
            OversizeMessage: `data` is over `max_publish_bytes`.
            TransportBroken: the library failed to queue it.
            ClosedError: the transport is closed.
        """
        self._check_open()
        if len(data) > self._config.max_publish_bytes:
            raise OversizeMessage(
                f"publish on {topic!r}: {len(data)} bytes, over the limit of "
                f"{self._config.max_publish_bytes}"
            )
        with _map_errors("publish", self.node_id):
            await self._pubsub.publish(topic, data)

    def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[tuple[bytes, bytes]]:
        """Return a bounded channel of `(author node id, data)` from other nodes on `topic`.

        Messages we published ourselves are not delivered. When the channel is full the
        message is dropped and counted in `pubsub_dropped`. Close the channel to stop
        receiving (the gossipsub subscription itself stays for the transport's lifetime).
        """
        self._check_open()
        if topic not in self._subscribers:
            self._pubsub.set_topic_validator(topic, self._validate_author, False)
            self._nursery.start_soon(self._pump, topic)
        return self._subscribers.add(topic)

    @property
    def pubsub_dropped(self) -> int:
        return self._subscribers.dropped

    def _validate_author(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        try:
            author = _node_id_of(ID(msg.from_id))
        except ValueError:
            return False
        if self._admits(author):
            return True
        log.warning("pubsub_refused", reason="author_not_member", peer=author.hex()[:8])
        return False

    async def _pump(self, topic: str) -> None:
        """Move one topic's messages from the library's queue (32, drops when full) to ours."""
        try:
            with _map_errors("subscribe", self.node_id):
                subscription = await self._pubsub.subscribe(topic)
        except TransportBroken as exc:
            log.error("subscribe_failed", topic=topic, error=str(exc))
            self._subscribers.close(topic)
            return
        async for msg in subscription:
            try:
                author = _node_id_of(ID(msg.from_id))
            except ValueError:
                continue  # the author validator already refused it; never deliver
            if author != self.node_id:
                self._subscribers.deliver(topic, (author, bytes(msg.data)))

    def _mark_closed(self) -> None:
        self._closed = True
        self._subscribers.close()

    def __repr__(self) -> str:
        return (
            f"Libp2pTransport(node={self.node_id.hex()[:8]}, closed={self._closed}, "
            f"peers={len(self.connected_peers())}, topics={self._subscribers.topics()}, "
            f"pubsub_dropped={self.pubsub_dropped})"
        )


def _strip_p2p(addr: str, pid: ID) -> multiaddr.Multiaddr:
    """Parse `addr`, check any `/p2p/` part names `pid`, and return it without that part."""
    try:
        maddr = multiaddr.Multiaddr(addr)
    except (ValueError, multiaddr.exceptions.Error) as exc:
        raise ValueError(f"address {addr!r}: not a multiaddr ({exc})") from exc
    base, sep, named = addr.partition("/p2p/")
    if not sep:
        return maddr
    if named != str(pid.to_base58()):
        raise ValueError(f"address {addr!r}: expected /p2p/{pid.to_base58()}, got /p2p/{named}")
    return multiaddr.Multiaddr(base)


def _swarm(host: IHost) -> Swarm:
    network = host.get_network()
    assert isinstance(network, Swarm), "new_host always builds a Swarm"
    return network


def _new_host(key_pair: KeyPair, *, plaintext_only: bool = False) -> IHost:
    security: TSecurityOptions
    if plaintext_only:
        security = {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)}
    else:
        noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        security = {TProtocol(NOISE_PROTOCOL_ID): noise}
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        # With the default of 3, every dial waits a fixed 250 ms happy-eyeballs delay.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=False,
        enable_upnp=False,
    )
    # new_host does not forward retry_config; retries are the mesh's decision, not ours.
    swarm = _swarm(host)
    swarm.retry_config = RetryConfig(max_retries=0)
    swarm.auto_connector = _NoAutoConnector(swarm)
    return host


class _NoAutoConnector(AutoConnector):
    """The swarm's auto-connector, switched off before the swarm starts.

    libp2p 0.8.1 starts one in `Swarm.run` that dials peerstore entries whenever we hold
    fewer than `low_watermark` connections (target 200 with the defaults), on a timer and
    after every disconnect, including peers we dropped for not being members. Stopping it
    after `host.run()` (what we did before) still let its first round run and log "200 new
    dials" (the peerstore was empty then, so nothing was dialled). The mesh alone decides
    whom to dial (Rule 2), so it never starts at all.
    """

    async def start(self) -> None:
        self._started = False

    async def maybe_connect(self) -> None:
        return


class _ConnectionEvents(INotifee):
    """Tells the transport of every new connection (the node times out idle strangers)."""

    def __init__(self, transport: Libp2pTransport) -> None:
        self._transport = transport

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._connected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return

    async def listen(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return

    async def listen_close(self, network: INetwork, maddr: multiaddr.Multiaddr) -> None:
        return


@asynccontextmanager
async def _running(host: IHost, listen: multiaddr.Multiaddr, close_s: float) -> AsyncIterator[None]:
    """Run `host` and always close it, shielded and bounded (pitfall 1)."""
    async with host.run([listen]):
        try:
            yield
        finally:
            await close_bounded(host.close, close_s)


@asynccontextmanager
async def open_libp2p_transport(
    seed: bytes,
    listen_port: int,
    config: TransportConfig,
    *,
    listen_host: str = "127.0.0.1",
    advertise_hosts: tuple[str, ...] = (),
) -> AsyncIterator[Libp2pTransport]:
    """Run a libp2p host for the node with Ed25519 `seed` and yield its transport.

    Args:
        seed: The node key's 32-byte Ed25519 seed; node id is its public key.
        listen_port: TCP port, or 0 for an ephemeral one (see `listen_addrs`).
        config: Limits and deadlines (and the gossipsub heartbeat).
        listen_host: IPv4 address to listen on.
        advertise_hosts: with `listen_host` 0.0.0.0, the IPv4 addresses to advertise
            instead (default: this machine's interface addresses).

    Cancellation: leaving the context closes the host (listener, connections, tasks)
    under a shield bounded by `config.close_timeout_s`.
    """
    logging.getLogger("libp2p").propagate = True  # pitfall 9: route through our logging
    host = _new_host(_key_pair(seed))
    gossip = GossipSub(
        [PROTOCOL_ID_V11],
        *_GOSSIP_DEGREE,
        heartbeat_initial_delay=0.1,
        # The library types it int; trio.sleep takes any number of seconds.
        heartbeat_interval=config.gossip_heartbeat_s,  # type: ignore[arg-type]
        eclipse_protection_enabled=False,
        # "Adaptive gossip" re-rates mesh health every 30 s and, with fewer mesh peers than
        # the degree (any home mesh under 7 nodes), sets the heartbeat to 30-60 s (measured:
        # 1 s became 30 s after 30 s with 2 nodes). Our heartbeat is a setting, not a hint.
        adaptive_gossip_enabled=False,
        max_messages_per_topic_per_second=config.pubsub_max_msgs_per_s,
    )
    pubsub = Pubsub(host, gossip, strict_signing=True)
    listen = multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")
    async with (
        _running(host, listen, config.close_timeout_s),
        background_trio_service(pubsub),
        background_trio_service(gossip),
    ):
        await pubsub.wait_until_ready()
        async with trio.open_nursery() as nursery:
            transport = Libp2pTransport(host, pubsub, nursery, config, advertise_hosts)
            _swarm(host).register_notifee(_ConnectionEvents(transport))
            _gate_pubsub_streams(host, pubsub, gossip, transport)
            log.info(
                "transport_started",
                node=transport.node_id.hex()[:8],
                addrs=transport.listen_addrs(),
            )
            try:
                yield transport
            finally:
                transport._mark_closed()
                nursery.cancel_scope.cancel()
    log.info("transport_closed", node=transport.node_id.hex()[:8])


def _gate_pubsub_streams(
    host: IHost, pubsub: Pubsub, gossip: GossipSub, transport: Libp2pTransport
) -> None:
    """Re-register gossipsub's stream handlers behind the admission check."""

    async def gated(net_stream: INetStream) -> None:
        try:
            remote = _node_id_of(net_stream.muxed_conn.peer_id)
        except ValueError:
            remote = b""
        if not remote or not transport._admits(remote):
            log.warning("pubsub_refused", reason="forwarder_not_member", peer=remote.hex()[:8])
            await _reset_quietly(net_stream)
            return
        try:
            await pubsub.stream_handler(net_stream)
        except Exception as exc:  # boundary: an escaping exception crashes the libp2p host
            log.exception("pubsub_stream_failed", peer=remote.hex()[:8], error=repr(exc))
            await _reset_quietly(net_stream)

    for protocol in gossip.get_protocols():
        host.set_stream_handler(protocol, gated)


async def plaintext_dial_accepted(addr: str, *, timeout_s: float = 5.0) -> bool:
    """Security self-test: does the node at `addr` accept a plaintext-only dialer?

    Dials with a throwaway host offering only `/plaintext/2.0.0`. A NEXUS node must refuse
    (py-libp2p's default host accepts it, see docs/architecture.md §13).

    Args:
        addr: Full multiaddr ending in `/p2p/<PeerID>`.
        timeout_s: Deadline for the whole attempt (a refusal is not a timeout).

    Returns:
        True if the connection was established, False if it was refused.
    """
    host = _new_host(new_ed25519_key_pair(), plaintext_only=True)
    base, _, named = addr.partition("/p2p/")
    pid = ID.from_base58(named)
    listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    async with _running(host, listen, 1.0):
        try:
            with trio.fail_after(timeout_s):
                await host.connect(PeerInfo(pid, [multiaddr.Multiaddr(base)]))
        except _LIBP2P_ERRORS:
            return False
        return bool(_swarm(host).get_connections(pid))
