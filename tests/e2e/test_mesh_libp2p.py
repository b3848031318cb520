"""Three in-process MeshNodes over real libp2p on 127.0.0.1: invite, join, adverts everywhere."""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import structlog.testing
import trio

from mesh.errors import MalformedMessage, PeerProtocolError, TransportBroken
from mesh.identity import MeshSecret, NodeKey
from mesh.join import JOIN_PROTOCOL
from mesh.membership import JoinReject, create_invite
from mesh.node import MeshIdentity, MeshNode, MeshNodeConfig
from mesh.state import HostedSpan, MeshState
from mesh.transport.base import TransportConfig
from mesh.transport.libp2p import _map_errors, open_libp2p_transport
from mesh.wire import decode

pytestmark = pytest.mark.e2e

CFG = MeshNodeConfig(
    advert_refresh_s=2.0,
    advert_lease_s=6.0,
    anti_entropy_interval_s=1.0,
    ping_interval_s=1.0,
    read_timeout_s=3.0,
)
TRANSPORT = TransportConfig(read_timeout_s=5.0, write_timeout_s=5.0, connect_timeout_s=3.0)


@asynccontextmanager
async def running_node(
    key: NodeKey, identity: MeshIdentity | None, seed: int
) -> AsyncIterator[MeshNode]:
    state = None
    if identity is not None:
        state = MeshState(
            mesh_id=identity.mesh_id,
            founder=identity.founder,
            max_drift_ms=5000,
            max_lease_ms=600_000,
        )
    async with open_libp2p_transport(key.seed, 0, TRANSPORT) as transport:
        node = MeshNode(
            key=key,
            transport=transport,
            identity=identity,
            state=state,
            store=None,
            cfg=CFG,
            rng=random.Random(seed),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            yield node
            nursery.cancel_scope.cancel()


async def test_three_nodes_join_by_invite_and_see_each_others_adverts() -> None:
    keys = [NodeKey.generate() for _ in range(3)]
    identity = MeshIdentity(os.urandom(16), keys[0].node_id, MeshSecret.generate())
    with trio.fail_after(10):
        async with (
            running_node(keys[0], identity, 0) as founder,
            running_node(keys[1], None, 1) as a,
            running_node(keys[2], None, 2) as b,
        ):
            await a.join(await founder.create_invite(60, 1, ""), "alpha")
            await b.join(await founder.create_invite(60, 1, ""), "beta")
            b.set_local_advert((HostedSpan("m", 0, 3, "float32"),), 1 << 20, 256, ("fp32",))
            nodes = (founder, a, b)
            ids = {k.node_id for k in keys}

            async def everyone_sees_everyone(node: MeshNode) -> None:
                await node.wait_for(
                    lambda: (
                        set(node.live_adverts()) == ids
                        and node.live_adverts()[b.node_id].spans != ()
                    )
                )

            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(everyone_sees_everyone, node)
            for node in nodes:
                assert all(
                    ad.addrs and ad.addrs[0].startswith("/ip4/127.0.0.1/tcp/")
                    for ad in node.live_adverts().values()
                )
                assert {c.name for c in node.members().values()} == {"alpha", "beta"}


async def test_join_flood_with_64_mib_prefixes_is_refused_on_the_prefix() -> None:
    """A non-member opens 16 join streams at once, each announcing a 64 MiB request and
    sending 64 KiB of it. The member refuses every one before reading a body: the first 3
    (the per-peer burst) on the length prefix (stream reset), the rest by the rate limit,
    answered before anything is read; each refusal is logged with its reason and counted."""
    founder_key, outsider_key = NodeKey.generate(), NodeKey.generate()
    identity = MeshIdentity(os.urandom(16), founder_key.node_id, MeshSecret.generate())
    body = struct.pack(">I", 64 * 1024 * 1024) + bytes(64 * 1024)
    outcomes: list[str] = []
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with (
            running_node(founder_key, identity, 0) as founder,
            open_libp2p_transport(outsider_key.seed, 0, TRANSPORT) as outsider,
        ):
            await outsider.connect(founder.node_id, founder.transport.listen_addrs())

            async def attack() -> None:
                stream = await outsider.open_stream(founder.node_id, JOIN_PROTOCOL)
                try:
                    with _map_errors("write", founder.node_id):  # raw: no client sends it
                        await stream._net.write(body)
                    reply = decode(await stream.receive(), JoinReject)
                    outcomes.append(reply.reason.value)
                except TransportBroken:
                    outcomes.append("reset")

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(attack)
            counters = founder.counters()
    assert counters["join_oversize"] == 3 and counters["join_rate_limited"] == 13
    assert sorted(outcomes) == ["rate_limited"] * 13 + ["reset"] * 3
    reasons = [e["reason"] for e in logs if e["event"] == "join_refused"]
    assert sorted(reasons) == ["oversize"] * 3 + ["rate_limited"] * 13


async def test_invite_whose_bootstrap_names_another_node_is_a_clear_refusal() -> None:
    """A token from another mesh whose bootstrap address was rewritten to a real member's
    address (with that member's /p2p/ id): refused as an invalid invite, naming the
    address problem, not a ValueError from libp2p's address handling."""
    keys = [NodeKey.generate() for _ in range(3)]
    identity = MeshIdentity(os.urandom(16), keys[0].node_id, MeshSecret.generate())
    other_admin = NodeKey.generate()
    with trio.fail_after(10):
        async with (
            running_node(keys[0], identity, 0) as member,
            running_node(keys[1], None, 1) as joiner,
        ):
            token, _record = create_invite(
                other_admin,
                os.urandom(16),
                tuple(member.transport.listen_addrs()),
                3600,
                1,
                "",
                time.time(),
            )
            with pytest.raises(
                MalformedMessage, match="bootstrap address is not valid for the invite's issuer"
            ) as refused:
                await joiner.join(token, "j")
            assert isinstance(refused.value, PeerProtocolError)  # the API says bad_request
            assert joiner.identity is None
