"""libp2p transport: the shared conformance suite on real hosts on 127.0.0.1, plus checks
only a real network can make (Noise-only, PeerID derivation, RTT measurement)."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from mesh.transport.base import Transport, TransportConfig
from mesh.transport.libp2p import (
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
