"""libp2p transport: the shared conformance suite on real hosts on 127.0.0.1, plus checks
only a real network can make (Noise-only, PeerID derivation, RTT measurement)."""

from __future__ import annotations

import logging
import statistics
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.pubsub.gossipsub import GossipSub

from mesh.errors import OversizeMessage, TransportBroken
from mesh.transport.base import Transport, TransportConfig, local_ipv4_addresses
from mesh.transport.libp2p import (
    Libp2pStream,
    _swarm,
    node_id_of,
    open_libp2p_transport,
    peer_id_of,
    plaintext_dial_accepted,
)

from ..unit import transport_conformance as conformance

pytestmark = pytest.mark.e2e


def seed(index: int) -> bytes:
    return bytes([0xA0 + index]) * 32


@asynccontextmanager
async def open_node(index: int, config: TransportConfig) -> AsyncIterator[Transport]:
    async with open_libp2p_transport(seed(index), 0, config) as transport:
        yield transport


@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: conformance.Check) -> None:
    await check(open_node)


async def test_plaintext_only_dialer_is_refused() -> None:
    async with open_libp2p_transport(seed(0), 0, conformance.CONFIG) as node:
        assert node.listen_addrs()[0].startswith("/ip4/127.0.0.1/tcp/")
        assert not await plaintext_dial_accepted(node.listen_addrs()[0])
        assert node.connected_peers() == frozenset()


async def test_peer_id_is_derived_from_the_seed() -> None:
    async with open_libp2p_transport(seed(0), 0, conformance.CONFIG) as node:
        pid = node.listen_addrs()[0].rsplit("/p2p/", 1)[1]
        assert pid.startswith("12D3KooW")
        assert pid == peer_id_of(node.node_id)
        assert node_id_of(pid) == node.node_id
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_of(b"short")
    with pytest.raises(ValueError, match="Ed25519 PeerID"):
        node_id_of("not-a-peer-id")


class FloodingNetStream:
    """A stand-in for a libp2p net stream whose peer announces `announced` bytes and then
    has an endless body ready: counts what the reader takes from it."""

    def __init__(self, announced: int) -> None:
        self._prefix = struct.pack(">I", announced)
        self.taken = 0
        self.largest_read = 0
        self.was_reset = False

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        assert n is not None and n > 0, "the reader must never ask for everything"
        chunk, self._prefix = (self._prefix + b"\0" * n)[:n], self._prefix[n:]
        self.taken += len(chunk)
        self.largest_read = max(self.largest_read, n)
        return chunk

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        self.was_reset = True

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_receive_refuses_on_the_length_prefix_and_reads_at_most_the_limit() -> None:
    """A 64 MiB frame announced where 16 KiB is allowed: the stream takes no more than one
    16 KiB frame could be (here the header and a little body), is reset, and raises."""
    config = TransportConfig(max_frame_bytes=64 * 1024 * 1024)
    net = FloodingNetStream(64 * 1024 * 1024)
    stream = Libp2pStream(net, b"\1" * 32, "/nexus/join/1", config, lambda: False)  # type: ignore[arg-type]
    with pytest.raises(OversizeMessage, match="67108864 bytes announced, over the limit of 16384"):
        await stream.receive(max_bytes=16 * 1024)
    assert net.was_reset and net.taken <= 16 * 1024 + 4 and net.largest_read <= 16 * 1024 + 4
    with pytest.raises(TransportBroken):  # the stream is done
        await stream.receive()


async def test_receive_reads_big_frames_in_frame_sized_reads() -> None:
    """Without a per-call limit a legitimate 8 MiB frame still arrives whole, read in
    pieces sized by what the frame needs (never an unbounded read)."""
    config = TransportConfig(max_frame_bytes=64 * 1024 * 1024)
    net = FloodingNetStream(8 * 1024 * 1024)
    stream = Libp2pStream(net, b"\1" * 32, "/nexus/exec/1.0.0", config, lambda: False)  # type: ignore[arg-type]
    assert await stream.receive() == bytes(8 * 1024 * 1024)
    assert net.taken <= 8 * 1024 * 1024 + 4 + 64 * 1024


async def test_the_auto_connector_never_runs(caplog: pytest.LogCaptureFixture) -> None:
    """libp2p's auto-connector would dial peerstore entries (target 200 connections, its
    first round ran before we could stop it): it is replaced before the swarm starts, so it
    never runs a round, not even after a disconnect or when asked; our dials are the mesh's."""
    caplog.set_level(logging.DEBUG, logger="libp2p.network.auto_connector")
    async with (
        open_libp2p_transport(seed(0), 0, conformance.CONFIG) as a,
        open_libp2p_transport(seed(1), 0, conformance.CONFIG) as b,
    ):
        a.set_admission(conformance.everyone)
        b.set_admission(conformance.everyone)
        await a.connect(b.node_id, b.listen_addrs())
        await a.disconnect(b.node_id)  # a disconnect schedules an auto-connect round
        await _swarm(a._host).auto_connector.maybe_connect()
        assert b.node_id not in a.connected_peers()
    rounds = [r.getMessage() for r in caplog.records if r.name.endswith("auto_connector")]
    assert not [m for m in rounds if "AUTO_CONNECTOR_STATE" in m or "new dials" in m], rounds


async def test_gossip_heartbeat_is_the_configured_one_and_stays_so() -> None:
    """`gossip_heartbeat_s` reaches gossipsub, and the library's "adaptive gossip" (which
    set a 1 s heartbeat to 30 s after 30 s in a two-node mesh) cannot stretch it."""
    config = TransportConfig(gossip_heartbeat_s=0.5)
    async with open_libp2p_transport(seed(0), 0, config) as node:
        router = node._pubsub.router
        assert isinstance(router, GossipSub)
        assert router.heartbeat_interval == 0.5
        router.network_health_score = 0.1  # what a 2-node mesh scores after 30 s
        router._adapt_gossip_parameters()
        assert router.heartbeat_interval == 0.5


async def test_listening_on_all_interfaces_advertises_dialable_addresses() -> None:
    async with (
        open_libp2p_transport(seed(0), 0, conformance.CONFIG, listen_host="0.0.0.0") as wild,
        open_libp2p_transport(
            seed(1), 0, conformance.CONFIG, listen_host="0.0.0.0", advertise_hosts=("127.0.0.1",)
        ) as chosen,
        open_libp2p_transport(seed(2), 0, conformance.CONFIG) as dialer,
    ):
        assert not any("/0.0.0.0/" in a for a in wild.listen_addrs() + chosen.listen_addrs())
        assert {a.split("/")[2] for a in wild.listen_addrs()} == set(local_ipv4_addresses())
        assert [a.split("/")[2] for a in chosen.listen_addrs()] == ["127.0.0.1"]
        for node in (wild, chosen, dialer):
            node.set_admission(conformance.everyone)
        loopback = [a for a in wild.listen_addrs() if a.startswith("/ip4/127.0.0.1/")]
        await dialer.connect(wild.node_id, loopback)
        await dialer.connect(chosen.node_id, chosen.listen_addrs())
        assert {wild.node_id, chosen.node_id} <= dialer.connected_peers()


@pytest.mark.slow
async def test_measure_rtt_1500_bytes() -> None:
    """Not an assertion on time: prints the median RTT for the report."""
    async with (
        open_libp2p_transport(seed(0), 0, conformance.CONFIG) as a,
        open_libp2p_transport(seed(1), 0, conformance.CONFIG) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        b.set_stream_handler(conformance.ECHO, conformance.echo)
        await a.connect(b.node_id, b.listen_addrs())
        stream = await a.open_stream(b.node_id, conformance.ECHO)
        payload = b"r" * 1500
        samples = []
        for _ in range(200):
            start = time.perf_counter()
            await stream.send(payload)
            assert await stream.receive() == payload
            samples.append(time.perf_counter() - start)
        print(f"libp2p RTT 1.5 KB median {statistics.median(samples) * 1e3:.3f} ms")
