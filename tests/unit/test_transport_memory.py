"""Memory transport: the shared conformance suite plus fault injection and determinism."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from mesh.errors import TransportBroken
from mesh.transport.base import Transport, TransportConfig
from mesh.transport.memory import LinkFaults, MemoryNetwork, open_memory_transport

from . import transport_conformance as conformance


def node_id(index: int) -> bytes:
    return bytes([index + 1]) * 32


def opener(network: MemoryNetwork) -> conformance.OpenNode:
    @asynccontextmanager
    async def open_node(index: int, config: TransportConfig) -> AsyncIterator[Transport]:
        async with open_memory_transport(network, node_id(index), config) as transport:
            yield transport

    return open_node


@pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: conformance.Check, autojump_clock: trio.abc.Clock) -> None:
    await check(opener(MemoryNetwork(rng=random.Random(1))))


async def test_stream_frames_are_delayed_but_in_order(autojump_clock: trio.abc.Clock) -> None:
    network = MemoryNetwork(rng=random.Random(1), default_faults=LinkFaults(delay_s=0.5))
    async with (
        open_memory_transport(network, node_id(0)) as a,
        open_memory_transport(network, node_id(1)) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        b.set_stream_handler(conformance.ECHO, conformance.echo)
        start = trio.current_time()
        await a.connect(b.node_id, b.listen_addrs())
        assert trio.current_time() - start == pytest.approx(1.0)  # one round trip
        stream = await a.open_stream(b.node_id, conformance.ECHO)
        start = trio.current_time()
        for i in range(5):
            await stream.send(bytes([i]))
        assert [await stream.receive() for _ in range(5)] == [bytes([i]) for i in range(5)]
        assert trio.current_time() - start == pytest.approx(1.0)  # there and back


async def _pubsub_counts(
    seed: int, faults: LinkFaults, sends: int, config: TransportConfig | None = None
) -> list[bytes]:
    network = MemoryNetwork(rng=random.Random(seed), default_faults=faults)
    received: list[bytes] = []
    config = config or TransportConfig(pubsub_max_msgs_per_s=1000)
    async with (
        open_memory_transport(network, node_id(0), config) as a,
        open_memory_transport(network, node_id(1)) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        inbox = b.subscribe("t")
        await a.connect(b.node_id, b.listen_addrs())
        for i in range(sends):
            await a.publish("t", i.to_bytes(2, "big"))
        await trio.sleep(faults.delay_s + 1)
        while True:
            try:
                received.append(inbox.receive_nowait()[1])
            except trio.WouldBlock:
                return received


async def test_pubsub_drop_all_and_duplicate_all(autojump_clock: trio.abc.Clock) -> None:
    assert await _pubsub_counts(1, LinkFaults(drop_probability=1.0), 10) == []
    twice = await _pubsub_counts(1, LinkFaults(duplicate_probability=1.0), 10)
    assert sorted(twice) == sorted(i.to_bytes(2, "big") for i in range(10) for _ in range(2))


async def test_pubsub_faults_are_deterministic_per_seed(autojump_clock: trio.abc.Clock) -> None:
    faults = LinkFaults(delay_s=0.1, drop_probability=0.5, duplicate_probability=0.2)
    first = await _pubsub_counts(7, faults, 100)
    # Which hops drop or duplicate is fixed by the seed; the order of deliveries due at the
    # same virtual instant follows trio's scheduler, so compare as multisets.
    assert sorted(first) == sorted(await _pubsub_counts(7, faults, 100))
    assert 20 < len(first) < 100


async def test_subscriber_overflow_drops_and_counts(autojump_clock: trio.abc.Clock) -> None:
    network = MemoryNetwork(rng=random.Random(1))
    config = TransportConfig(subscription_buffer=2)
    async with (
        open_memory_transport(network, node_id(0)) as a,
        open_memory_transport(network, node_id(1), config) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        inbox = b.subscribe("t")
        await a.connect(b.node_id, b.listen_addrs())
        for i in range(5):
            await a.publish("t", bytes([i]))
        await trio.sleep(1)  # virtual time (autojump_clock): every delivery has happened
        assert b.pubsub_dropped == 3
        assert [inbox.receive_nowait()[1] for _ in range(2)] == [b"\x00", b"\x01"]


async def test_partition_breaks_streams_and_blocks_until_healed(
    autojump_clock: trio.abc.Clock,
) -> None:
    network = MemoryNetwork(rng=random.Random(1))
    async with (
        open_memory_transport(network, node_id(0)) as a,
        open_memory_transport(network, node_id(1)) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        b.set_stream_handler(conformance.ECHO, conformance.echo)
        await a.connect(b.node_id, b.listen_addrs())
        stream = await a.open_stream(b.node_id, conformance.ECHO)
        network.partition([{a.node_id}, {b.node_id}])
        assert not network.can_talk(a.node_id, b.node_id)
        with pytest.raises(TransportBroken, match="partitioned"):
            await stream.receive()
        assert a.connected_peers() == frozenset() == b.connected_peers()
        with pytest.raises(TransportBroken, match="partitioned"):
            await a.connect(b.node_id, b.listen_addrs())
        network.heal()
        await a.connect(b.node_id, b.listen_addrs())
        assert a.connected_peers() == frozenset({b.node_id})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="read_timeout_s"):
        TransportConfig(read_timeout_s=0)
    with pytest.raises(ValueError, match="max_publish_bytes"):
        TransportConfig(max_publish_bytes=2 * 1024 * 1024)
    with pytest.raises(ValueError, match="drop_probability"):
        LinkFaults(drop_probability=1.5)
    with pytest.raises(ValueError, match="delay_s"):
        LinkFaults(delay_s=-1)


async def test_send_deadline_when_the_reader_stalls(autojump_clock: trio.abc.Clock) -> None:
    network = MemoryNetwork(rng=random.Random(1))
    stalled = trio.Event()

    async def never_reads(stream: object) -> None:
        await stalled.wait()

    async with (
        open_memory_transport(network, node_id(0)) as a,
        open_memory_transport(network, node_id(1)) as b,
    ):
        for node in (a, b):
            node.set_admission(conformance.everyone)
        b.set_stream_handler("/stall", never_reads)
        await a.connect(b.node_id, b.listen_addrs())
        stream = await a.open_stream(b.node_id, "/stall")
        await stream.send(b"x" * (9 * 1024 * 1024))  # fits the 16 MiB window
        with pytest.raises(TransportBroken, match="deadline"):
            await stream.send(b"y" * (9 * 1024 * 1024))
        with pytest.raises(TransportBroken):
            await stream.send(b"z")  # a half-sent frame leaves the stream unusable
        stalled.set()


async def test_pubsub_rate_guard_like_gossipsub(autojump_clock: trio.abc.Clock) -> None:
    strict = TransportConfig(pubsub_max_msgs_per_s=4)
    received = await _pubsub_counts(1, LinkFaults(), 6, config=strict)
    assert sorted(received) == [i.to_bytes(2, "big") for i in range(4)]
