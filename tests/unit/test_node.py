"""MeshNode over the memory transport, a few nodes, virtual clock: join, admission,
revocation, leases, frozen peers, restart from the store."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import structlog.testing
import torch
import trio
import trio.testing

from atoms.codecs import Encoded
from atoms.codecs import encode as encode_tensor
from mesh.errors import (
    AdminRequired,
    DecryptionFailed,
    JoinRefused,
    MalformedMessage,
    MeshError,
    NotAdmin,
    OversizeMessage,
    ReplayedMessage,
    TransportBroken,
    UnknownSender,
)
from mesh.hlc import HybridClock, wall_ms_of
from mesh.identity import EnvelopeVerifier, NodeKey, seal
from mesh.join import load_invite_book, save_invite_book
from mesh.liveness import BandwidthTable, RttTable
from mesh.membership import InviteBook, JoinRefusal, create_invite
from mesh.node import MeshNode
from mesh.state import (
    Advert,
    HostedSpan,
    NodeState,
    PublishedAtom,
    PublishedModel,
    Slot,
    SlotKind,
)
from mesh.sync import (
    SYNC_PROTOCOL,
    DeltaOutbox,
    chunk_entries,
    classify_rejection,
    gossip_topic,
    seal_delta,
)
from mesh.transport.base import Stream, Transport
from mesh.transport.memory import LinkFaults, MemoryNetwork, open_memory_transport
from nexusd.config import Config
from nexusd.exec.hosting import SpanHost
from nexusd.exec.session import HopPlan, JobFailed, RemoteHop, RoutedSession, StepInput
from nexusd.exec.wire import (
    EXEC_PROTOCOL,
    HOST_INBOUND,
    ORIGIN_INBOUND,
    ExecChannel,
    Signer,
    Step,
    StepResult,
    header_of,
)
from nexusd.metrics import Metrics
from nexusd.node.mesh_service import MeshService, NodeView
from nexusd.paths import resolve_paths

from ..sim.sim_fixtures import (
    FAST_CFG,
    TRANSPORT_CFG,
    SimNode,
    key_from,
    new_mesh,
    new_state,
    sim_wall,
    wait_until,
)
from .exec_fixtures import TINY, tiny_llama


class Mesh:
    """A founder plus joiners on one memory network."""

    def __init__(self, nursery: trio.Nursery, seed: int = 1, tmp: Path | None = None) -> None:
        self.nursery = nursery
        self.rng = random.Random(seed)
        self.network = MemoryNetwork(rng=random.Random(seed + 1))
        self.founder_key = key_from(self.rng)
        self.identity = new_mesh(self.founder_key, self.rng)
        self.tmp = tmp
        self.sims: list[SimNode] = []

    async def start_founder(self) -> MeshNode:
        store = self.tmp / "founder.sqlite3" if self.tmp else None
        sim = SimNode(
            self.founder_key,
            self.network,
            self.identity,
            new_state(self.identity),
            seed=0,
            store_path=store,
        )
        self.sims.append(sim)
        return await sim.start(self.nursery)

    async def add_joiner(self, key: NodeKey | None = None, name: str = "j") -> MeshNode:
        founder = self.sims[0].node
        assert founder is not None
        token = await founder.create_invite(3600, 1, "")
        sim = SimNode(key or key_from(self.rng), self.network, None, None, seed=len(self.sims))
        self.sims.append(sim)
        node = await sim.start(self.nursery)
        await node.join(token, name)
        return node

    @property
    def nodes(self) -> list[MeshNode]:
        return [s.node for s in self.sims if s.node is not None]


async def open_and_read(transport: Transport, peer: bytes, protocol: str) -> bytes:
    """Open a stream and read one frame (a refused stream raises TransportBroken)."""
    stream = await transport.open_stream(peer, protocol)
    return await stream.receive()


async def test_founder_and_two_joiners_see_each_others_adverts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="alpha")
        b = await mesh.add_joiner(name="beta")
        a.set_local_advert(
            (HostedSpan("m", 0, 2, "float32"),),
            1 << 20,
            512,
            ("fp32",),
            direct_addr="127.0.0.1:9000",
        )
        ids = {founder.node_id, a.node_id, b.node_id}
        with trio.fail_after(30):
            await wait_until(
                mesh.nodes,
                lambda: all(
                    set(n.live_adverts()) == ids
                    and n.live_adverts()[a.node_id].spans == (HostedSpan("m", 0, 2, "float32"),)
                    for n in mesh.nodes
                ),
            )
            await wait_until(mesh.nodes, lambda: len({n.fingerprint() for n in mesh.nodes}) == 1)
        assert {c.name for c in founder.members().values()} == {"alpha", "beta"}
        assert b.live_adverts()[a.node_id].direct_addr == "127.0.0.1:9000"
        for joiner in (a, b):
            assert joiner.identity is not None
            assert joiner.identity.mesh_id == mesh.identity.mesh_id
            assert joiner.identity.founder == founder.node_id
            assert joiner.identity.secret.raw == mesh.identity.secret.raw
        with trio.fail_after(30):  # full mesh of connections and measured RTTs
            await wait_until(
                mesh.nodes, lambda: all(set(n.rtts()) == ids - {n.node_id} for n in mesh.nodes)
            )
        assert founder.status().members == 2 and founder.status().is_admin
        with pytest.raises(AdminRequired):
            await a.create_invite(60, 1, "")
        nursery.cancel_scope.cancel()


async def test_reused_and_expired_invites_are_refused_with_their_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        token = await founder.create_invite(3600, 1, "")
        first = SimNode(key_from(mesh.rng), mesh.network, None, None, seed=5)
        await (await first.start(nursery)).join(token, "first")
        second = await SimNode(key_from(mesh.rng), mesh.network, None, None, seed=6).start(nursery)
        with pytest.raises(JoinRefused) as used:
            await second.join(token, "second")
        assert used.value.reason is JoinRefusal.USED_UP
        short = await founder.create_invite(10, 1, "")
        await trio.sleep(11)  # let the invite expire (virtual time)
        with pytest.raises(JoinRefused) as expired:
            await second.join(short, "second")
        assert expired.value.reason is JoinRefusal.EXPIRED
        assert second.identity is None
        assert founder.counters()["join_used_up"] == 1
        nursery.cancel_scope.cancel()


async def test_non_member_receives_nothing_and_its_messages_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        member = await mesh.add_joiner(name="m")
        outsider_key = key_from(mesh.rng)
        topic = gossip_topic(mesh.identity.mesh_id)
        async with open_memory_transport(
            mesh.network, outsider_key.node_id, TRANSPORT_CFG
        ) as outsider:
            outsider.set_admission(lambda _peer: True)
            inbox = outsider.subscribe(topic)
            await outsider.connect(founder.node_id, founder.transport.listen_addrs())
            # members-only protocols are refused and the connection closed
            with pytest.raises(TransportBroken):
                await open_and_read(outsider, founder.node_id, SYNC_PROTOCOL)
            assert outsider_key.node_id not in founder.connected()
            # its gossip (even with a stolen mesh secret) is dropped by admission
            await outsider.connect(founder.node_id, founder.transport.listen_addrs())
            clock = HybridClock(max_drift_s=5)
            fake = founder.state.entries()[:1] if founder.state else []
            with structlog.testing.capture_logs() as logs:
                forged = seal_delta(
                    outsider_key, mesh.identity.secret, tuple(fake), clock=clock, now=sim_wall()
                )
                await outsider.publish(topic, forged)
                await trio.sleep(1)  # virtual time (autojump_clock): gossip has settled
            assert any(e["event"] == "pubsub_refused" for e in logs)
            # relayed by a member, the outsider's envelope is rejected and counted
            raw = seal(outsider_key, "nexus/state/1", b"x", clock=clock, now=sim_wall())
            await member.transport.publish(topic, raw)
            with trio.fail_after(5):
                await founder.wait_for(lambda: founder.counters().get("unknown_sender", 0) >= 1)
            assert founder.state is not None
            assert all(e.author != outsider_key.node_id for e in founder.state.entries())
            assert outsider_key.node_id not in founder.members()
            # non-members may only use the join protocol: their connections are swept
            with trio.fail_after(2 * FAST_CFG.read_timeout_s + 2 * FAST_CFG.ping_interval_s):
                await founder.wait_for(lambda: outsider_key.node_id not in founder.connected())
            while True:  # drain what reached the outsider before the sweep (ciphertext)
                try:
                    inbox.receive_nowait()
                except trio.WouldBlock:
                    break
            member.set_local_advert((), 1, 1, ())  # members keep gossiping ...
            with trio.fail_after(5):
                await founder.wait_for(
                    lambda: founder.live_adverts()[member.node_id].free_kv_tokens == 1
                )
            with pytest.raises(trio.WouldBlock):  # ... and the outsider hears none of it
                inbox.receive_nowait()
        nursery.cancel_scope.cancel()


async def test_revoked_node_is_cut_off_everywhere_and_cannot_rejoin(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        c_key = key_from(mesh.rng)
        c = await mesh.add_joiner(c_key, name="c")
        with trio.fail_after(30):
            await wait_until(mesh.nodes, lambda: c.node_id in a.connected())
        await founder.revoke(c.node_id, "lost laptop")
        with trio.fail_after(30):
            await wait_until(
                mesh.nodes,
                lambda: all(
                    c.node_id not in n.connected()
                    and c.node_id not in n.members()
                    and c.node_id not in n.live_adverts()
                    for n in (founder, a)
                ),
            )
        await mesh.sims[2].stop()
        token = await founder.create_invite(3600, 1, "")
        again = await SimNode(c_key, mesh.network, None, None, seed=9).start(nursery)
        with pytest.raises(JoinRefused) as refused:
            await again.join(token, "c")
        assert refused.value.reason is JoinRefusal.REVOKED
        with trio.fail_after(2 * FAST_CFG.advert_refresh_s):  # the maintenance sweep drops it
            await founder.wait_for(lambda: c_key.node_id not in founder.connected())
        nursery.cancel_scope.cancel()


async def test_killed_node_falls_out_after_its_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        with trio.fail_after(30):
            await founder.wait_for(lambda: a.node_id in founder.live_adverts())
        mesh.sims[1].kill()
        killed_at = trio.current_time()
        with trio.fail_after(FAST_CFG.advert_lease_s + 2 * FAST_CFG.advert_refresh_s):
            await founder.wait_for(lambda: a.node_id not in founder.live_adverts())
        lease, refresh = FAST_CFG.advert_lease_s, FAST_CFG.advert_refresh_s
        assert trio.current_time() - killed_at >= lease - 1.2 * refresh  # not before the lease
        assert a.node_id in founder.members()  # still a member, just not live
        nursery.cancel_scope.cancel()


async def test_frozen_peer_is_detected_by_the_ping_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        with trio.fail_after(30):
            await founder.wait_for(lambda: a.node_id in founder.rtts())
        # freeze: everything a sends or receives now takes forever to arrive
        mesh.network.set_link_faults(a.node_id, founder.node_id, LinkFaults(delay_s=1e6))
        frozen_at = trio.current_time()
        with trio.fail_after(FAST_CFG.ping_interval_s + FAST_CFG.read_timeout_s + 1):
            await founder.wait_for(lambda: a.node_id in founder.unresponsive())
        assert a.node_id not in founder.rtts()
        assert a.node_id not in founder.connected()
        assert trio.current_time() - frozen_at >= FAST_CFG.read_timeout_s
        nursery.cancel_scope.cancel()


async def test_restarted_node_resumes_with_its_persisted_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    manifest = PublishedModel("bert", "{}", (PublishedAtom(0, "embed", bytes(32), 1),))
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery, tmp=tmp_path)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        await founder.publish_model("m", manifest)
        with trio.fail_after(30):
            await founder.wait_for(lambda: a.node_id in founder.live_adverts())
        await mesh.sims[1].stop()  # nobody left to sync from: what we see came from disk
        assert founder.state is not None
        own_advert = (founder.node_id, SlotKind.ADVERT)
        before = {e for e in founder.state.entries() if (e.author, e.slot.kind) != own_advert}
        await mesh.sims[0].stop()
        restarted = SimNode(
            mesh.founder_key,
            mesh.network,
            mesh.identity,
            new_state(mesh.identity),
            seed=42,
            store_path=tmp_path / "founder.sqlite3",
        )
        node = await restarted.start(nursery)
        assert node.state is not None
        assert before <= set(node.state.entries())
        assert a.node_id in node.live_adverts()
        assert node.models() == {"m": manifest}
        assert set(node.members()) == {a.node_id}
        nursery.cancel_scope.cancel()


async def test_misbehaving_member_is_scored_banned_and_refused(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A member whose span answers with outputs of the wrong shape: the origin's session
    blames it, the daemon's view scores it "bad_output" (not "timeout"), and past the
    threshold it is banned, cut off, and refused by every channel's admission."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        with trio.fail_after(30):
            await founder.wait_for(lambda: a.node_id in founder.rtts())
        await a.transport.publish(gossip_topic(mesh.identity.mesh_id), b"junk")
        with trio.fail_after(5):
            await founder.wait_for(lambda: founder.counters().get("malformed", 0) == 1)
        assert not founder.is_banned(a.node_id)
        serve_bad_outputs(a)
        svc = daemon_view_of(founder, tmp_path, nursery)
        view = NodeView(svc)
        with structlog.testing.capture_logs() as logs:
            for attempt in range(4):  # each bad output adds 40 (threshold 100, with decay)
                if founder.is_banned(a.node_id):
                    break
                session = RoutedSession(
                    n_atoms=6,
                    plan=partial(only_host, a.node_id),
                    make_hop=partial(exec_hop, founder),
                    report_failure=lambda h, p, _r: view.report(h, p),
                    batch=1,
                    max_len=0,
                )
                await session.open()
                with pytest.raises(JobFailed, match="no other host"):
                    await session.step(StepInput(torch.tensor([[5, 17, 42, 8, 3]]), 0, True, b""))
                assert session.failovers == [
                    f"host {a.node_id.hex()[:8]}: invalid output: 2 tokens, input had 5"
                ]
                with trio.fail_after(5):
                    await founder.wait_for(lambda n=attempt: founder.counters()["bad_output"] > n)
        assert [e["reason"] for e in logs if e["event"] == "peer_banned"] == ["bad_output"]
        assert founder.is_banned(a.node_id) and founder.penalty_s(a.node_id) > 0
        counters = founder.counters()
        assert counters["ban"] == 1 and counters["bad_output"] >= 2 and "timeout" not in counters
        assert a.node_id not in founder.connected()
        with pytest.raises(TransportBroken):  # its streams are refused while banned
            await open_and_read(a.transport, founder.node_id, SYNC_PROTOCOL)
        assert not svc.is_member(a.node_id)  # ... and so is its direct channel (same gate)
        assert founder.status().banned == 1
        nursery.cancel_scope.cancel()


def serve_bad_outputs(node: MeshNode) -> None:
    """`node` hosts a tiny Llama over the exec protocol but answers every step with logits
    for 2 tokens, whatever it was given. (Its compute is replaced, not wrapped: torch in a
    worker thread would let the autojump clock run past every deadline meanwhile.)"""
    host = SpanHost(
        [tiny_llama()],
        kv_budget_bytes=1 << 24,
        max_sessions=4,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
    )

    async def truncated(
        _peer: bytes, _sess: object, msg: Step, *_args: object
    ) -> tuple[StepResult, Encoded]:
        enc = encode_tensor(torch.zeros((1, 2, TINY.vocab_size)))
        return StepResult(
            session_id=msg.session_id,
            step_id=msg.step_id,
            tensor=header_of(enc),
            compute_s=0.001,
            queue_s=0.0,
        ), enc

    host._compute = truncated  # type: ignore[method-assign,assignment]
    signer = Signer(node.key, HybridClock(max_drift_s=5))

    async def serve(stream: Stream) -> None:
        channel = ExecChannel(stream, signer, verifier(signer), node.admits, HOST_INBOUND)
        await host.serve(channel, idle_timeout_s=1e6)  # virtual time: never idles out

    node.set_stream_handler(EXEC_PROTOCOL, serve)


def verifier(signer: Signer) -> EnvelopeVerifier:
    return EnvelopeVerifier(
        clock=signer.clock, window_s=60, max_body_bytes=1 << 20, replay_capacity=1000
    )


def daemon_view_of(node: MeshNode, tmp: Path, nursery: trio.Nursery) -> MeshService:
    """The daemon's mesh service around a running node (what `NodeView` reports through)."""
    signer = Signer(node.key, HybridClock(max_drift_s=5))
    host = SpanHost(
        [], kv_budget_bytes=1, max_sessions=1, limiter=trio.CapacityLimiter(1), metrics=Metrics()
    )
    svc = MeshService(
        Config(),
        resolve_paths(str(tmp), "", {}),
        signer,
        host,
        Metrics(),
        verifier(signer),
        "founder",
    )
    svc.node, svc._nursery = node, nursery
    return svc


def only_host(host: bytes, start: int, end: int, excluded: frozenset[bytes]) -> list[HopPlan]:
    if host in excluded:
        raise JobFailed("no other host")
    return [HopPlan(host, start, end)]


async def exec_hop(origin: MeshNode, plan: HopPlan) -> RemoteHop:
    signer = Signer(origin.key, HybridClock(max_drift_s=5))
    stream = await origin.open_stream(plan.host, EXEC_PROTOCOL)
    channel = ExecChannel(stream, signer, verifier(signer), origin.admits, ORIGIN_INBOUND)
    return RemoteHop(plan, "tiny", channel, step_timeout_s=1e6)  # virtual time (see above)


def test_rtt_table_is_an_ewma_and_timeouts_drop_the_average() -> None:
    table = RttTable(alpha=0.2)
    assert table.observe(b"p", 0.010) == pytest.approx(0.010)
    assert table.observe(b"p", 0.020) == pytest.approx(0.012)
    assert table.timed_out(b"p") == 1 and table.rtts() == {}
    table.observe(b"p", 0.005)
    assert table.timeouts == {} and table.rtts() == {b"p": 0.005}
    with pytest.raises(ValueError, match="alpha"):
        RttTable(alpha=0.0)


def test_bandwidth_table_follows_a_change_in_two_probes_and_ignores_queued_rtts() -> None:
    table = BandwidthTable()
    fast = {"size": 1_000_000, "elapsed_s": 0.011, "rtt_s": 0.001}  # 100 MB/s past 1 ms
    slow = {"size": 1_000_000, "elapsed_s": 1.001, "rtt_s": 0.001}  # 1 MB/s
    for _ in range(3):
        assert table.observe(b"p", **fast) == pytest.approx(1e8)
    assert table.observe(b"p", **slow) == pytest.approx(1e8)  # one odd probe: the median holds
    assert table.observe(b"p", **slow) == pytest.approx(1e6)  # two: the link is slow now
    # A probe queued behind the slow link inflates the RTT of the moment; the base latency
    # stays the lowest recent RTT, so the link does not look faster than it is.
    assert table.observe(b"p", size=1_000_000, elapsed_s=1.001, rtt_s=0.9) == pytest.approx(1e6)
    for _ in range(2):
        table.observe(b"p", **fast)
    assert table[b"p"] == pytest.approx(1e8) and table.probes[b"p"] == 8
    assert b"p" in table and table.get(b"q", 5.0) == 5.0
    with pytest.raises(ValueError, match="bandwidth"):
        table.observe(b"p", size=0, elapsed_s=1.0, rtt_s=None)


def test_delta_outbox_coalesces_lww_slots_and_batches_by_size() -> None:
    rng = random.Random(3)
    founder = key_from(rng)
    identity = new_mesh(founder, rng)
    state = new_state(identity)
    clock = HybridClock(max_drift_s=5)
    slot = Slot(SlotKind.ADVERT, founder.node_id)
    now = sim_wall_fixed()
    lease_ms = wall_ms_of(now) + 10_000
    writes = [
        state.local_write(
            founder, slot, Advert((), i, 0, (), (), NodeState.ONLINE, lease_ms), clock, now
        )
        for i in range(5)
    ]
    outbox = DeltaOutbox(max_bytes=4096)
    outbox.put(writes)
    assert len(outbox) == 1 and outbox.take() == (writes[-1],) and outbox.take() == ()
    entries = tuple(writes) * 40
    chunks = chunk_entries(entries, 2048)
    assert sum(chunks, ()) == entries and all(len(c) >= 1 for c in chunks) and len(chunks) > 1


def test_rejections_are_classified_and_only_misbehaviour_is_scored() -> None:
    assert classify_rejection(ReplayedMessage("x")) == ("replay", None)
    assert classify_rejection(UnknownSender("x")) == ("unknown_sender", None)
    assert classify_rejection(NotAdmin("x")) == ("forbidden_write", "forbidden_write")
    assert classify_rejection(OversizeMessage("x")) == ("oversize", "oversize")
    assert classify_rejection(DecryptionFailed("x")) == ("decryption_failed", "malformed")


def test_invite_book_round_trips_through_its_file(tmp_path: Path) -> None:
    key = key_from(random.Random(4))
    _, rec = create_invite(key, bytes(16), ("/memory/x/1",), 60, 2, "bob", sim_wall_fixed())
    book = InviteBook([rec])
    path = tmp_path / "invites.json"
    save_invite_book(path, book)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_invite_book(path).to_records() == book.to_records()
    path.write_text("{}")
    with pytest.raises(MalformedMessage, match="JSON list"):
        load_invite_book(path)


def sim_wall_fixed() -> float:
    return 1_800_000_000.0


async def test_a_peer_that_cannot_be_reached_is_left_out_of_routes_until_it_advertises(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A host dies while its advert is still live: the first exec stream to it fails, and
    from then on `NodeView.host_spans` (what routes and spot checks plan from) leaves it
    out, instead of every new job dialling it again; a newer advert (another lease) lets
    it back in. A session's report of a broken stream ("unreachable") marks it the same."""
    async with trio.open_nursery() as nursery:
        mesh = Mesh(nursery)
        founder = await mesh.start_founder()
        a = await mesh.add_joiner(name="a")
        a.set_local_advert((HostedSpan("m", 0, 2, "float32"),), 1 << 20, 512, ("fp32",))
        with trio.fail_after(30):  # the advert with the span (a's first may have come before)
            await founder.wait_for(
                lambda: (
                    a.node_id in founder.live_adverts()
                    and bool(founder.live_adverts()[a.node_id].spans)
                )
            )
        svc = daemon_view_of(founder, tmp_path, nursery)
        view = NodeView(svc)
        assert [h.host for h in view.host_spans("m")] == [a.node_id]
        lease = founder.live_adverts()[a.node_id].lease_expires_ms
        await mesh.sims[1].stop()
        with pytest.raises(MeshError), trio.fail_after(60):
            await svc.open_exec_stream(a.node_id)
        assert svc.unreachable == {a.node_id: lease}
        assert view.host_spans("m") == []
        svc.unreachable[a.node_id] = lease - 1  # marked under an older advert than this one
        assert [h.host for h in view.host_spans("m")] == [a.node_id]
        assert svc.unreachable == {}
        view.report(a.node_id, "unreachable")  # a session's stream to it broke
        assert svc.unreachable == {a.node_id: lease}
        assert view.host_spans("m") == []
        nursery.cancel_scope.cancel()
