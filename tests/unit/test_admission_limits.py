"""What a non-member (or a member) can make a node hold: frames refused on their length
prefix, the join rate limit charged before reading, concurrent streams capped per peer and
for all strangers together, idle strangers cut after the join window; every refusal logged
with its reason and counted."""

from __future__ import annotations

import dataclasses

import pytest
import structlog.testing
import trio
import trio.testing

from mesh.errors import TransportBroken
from mesh.join import JOIN_PROTOCOL, MAX_REQUEST_BYTES
from mesh.liveness import AFTER_JOIN_S, PING_PROTOCOL
from mesh.membership import JoinRefusal, JoinReject
from mesh.transport.memory import MemoryTransport, open_memory_transport
from mesh.wire import decode

from ..sim.sim_fixtures import FAST_CFG, TRANSPORT_CFG, SimNode, key_from, new_state
from .test_node import Mesh
from .transport_conformance import round_trip


async def stranger(mesh: Mesh, nursery: trio.Nursery) -> MemoryTransport:
    """A transport of a fresh non-member on the mesh's network, connected to the founder."""
    done = trio.Event()
    ready: list[MemoryTransport] = []

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        async with open_memory_transport(
            mesh.network, key_from(mesh.rng).node_id, TRANSPORT_CFG
        ) as transport:
            transport.set_admission(lambda _peer: True)
            ready.append(transport)
            task_status.started()
            await done.wait()

    await nursery.start(run)
    founder = mesh.nodes[0]
    await ready[0].connect(founder.node_id, founder.transport.listen_addrs())
    return ready[0]


async def test_oversize_join_request_is_refused_on_its_prefix_after_the_rate_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A join request over 16 KiB is refused without being taken (the memory analogue of
    refusing on the length prefix), logged and counted; past the per-peer burst the rate
    limit answers before anything is read, even a stream that never sends a byte."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        outsider = await stranger(mesh, nursery)
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # the per-peer burst: each request is read, and refused
                stream = await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)
                await stream.send(b"\0" * (MAX_REQUEST_BYTES + 1))
                with pytest.raises(TransportBroken):  # reset on the oversize frame
                    await stream.receive()
            silent = await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)
            reply = decode(await silent.receive(), JoinReject)  # nothing was sent at all
        assert reply.reason is JoinRefusal.RATE_LIMITED
        counters = founder.counters()
        assert counters["join_oversize"] == 3 and counters["join_rate_limited"] == 1
        refused = [e for e in logs if e["event"] == "join_refused"]
        assert [e["reason"] for e in refused] == ["oversize"] * 3 + ["rate_limited"]
        assert "16384" in refused[0]["detail"]
        nursery.cancel_scope.cancel()


async def test_join_streams_of_all_strangers_share_one_capped_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Silent join streams hold a slot until the read deadline; the strangers' pool
    (`max_stranger_streams`, 16) refuses the 17th and 18th, logged and counted."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        outsiders = [await stranger(mesh, nursery) for _ in range(6)]
        with structlog.testing.capture_logs() as logs:
            for outsider in outsiders:  # 3 each: within every per-peer rate burst
                for _ in range(3):
                    await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)
            await trio.testing.wait_all_tasks_blocked()
        assert founder.counters()["too_many_stranger_streams"] == 2
        assert sum(e.get("reason") == "too_many_stranger_streams" for e in logs) == 2
        nursery.cancel_scope.cancel()


async def test_a_members_streams_per_protocol_are_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        member = await mesh.add_joiner(name="m")
        await trio.testing.wait_all_tasks_blocked()
        before = founder.counters().get("too_many_streams", 0)
        streams = [
            await member.transport.open_stream(founder.node_id, PING_PROTOCOL)
            for _ in range(FAST_CFG.max_streams_per_peer + 2)
        ]
        await trio.testing.wait_all_tasks_blocked()
        # the member's own ping session holds one slot: 32 - 1 of ours fit, 3 are refused
        assert founder.counters()["too_many_streams"] - before == 3
        assert len(streams) == 34 and member.node_id in founder.connected()
        nursery.cancel_scope.cancel()


async def test_idle_stranger_is_cut_after_the_join_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        t0 = trio.current_time()
        outsider = await stranger(mesh, nursery)
        with structlog.testing.capture_logs() as logs:
            with trio.fail_after(FAST_CFG.join_window_s + 1):
                await founder.wait_for(lambda: outsider.node_id not in founder.connected())
        assert trio.current_time() - t0 >= FAST_CFG.join_window_s
        assert founder.counters()["stranger_idle"] == 1
        assert any(
            e["event"] == "stranger_disconnected" and e["reason"] == "not_joining" for e in logs
        )
        nursery.cancel_scope.cancel()


async def test_a_stranger_is_kept_while_its_join_exchange_runs_then_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A join exchange may run up to the read deadline, longer than the window (1 s here):
    the connection stays while it runs, and is cut `AFTER_JOIN_S` after it ends."""
    cfg = dataclasses.replace(FAST_CFG, join_window_s=1.0)
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        sim = SimNode(
            mesh.founder_key, mesh.network, mesh.identity, new_state(mesh.identity), cfg=cfg
        )
        mesh.sims.append(sim)
        founder = await sim.start(nursery)
        outsider = await stranger(mesh, nursery)
        await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)  # and say nothing
        opened = trio.current_time()
        await trio.sleep(cfg.read_timeout_s - 0.5)  # virtual time: well past the window
        assert outsider.node_id in founder.connected()
        with trio.fail_after(AFTER_JOIN_S + 1):
            await founder.wait_for(lambda: outsider.node_id not in founder.connected())
        waited = trio.current_time() - opened
        assert (
            cfg.read_timeout_s + AFTER_JOIN_S <= waited <= cfg.read_timeout_s + AFTER_JOIN_S + 0.1
        )
        nursery.cancel_scope.cancel()


async def test_a_banned_peer_is_refused_on_the_join_protocol_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        outsider = await stranger(mesh, nursery)
        await founder.report(outsider.node_id, "invalid_signature", weight=1000.0)
        assert founder.is_banned(outsider.node_id)
        await outsider.connect(founder.node_id, founder.transport.listen_addrs())
        stream = await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)
        with pytest.raises(TransportBroken):  # reset unread, no reply
            await round_trip(stream, b"let me in")
        assert founder.counters()["join_banned"] == 1
        nursery.cancel_scope.cancel()
