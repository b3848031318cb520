"""The mesh between real daemons: invites, non-members, revocation, leases, restarts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.identity import NodeKey
from mesh.membership import create_invite
from nexusd.api.records import (
    InviteReply,
    InviteRequest,
    JoinMeshRequest,
    PeersReply,
    PeersRequest,
    RevokeRequest,
    StatusReply,
    StatusRequest,
    WaitRequest,
)
from nexusd.errors import ApiError
from nexusd.harness.cluster import LocalCluster, local_cluster, run_cli

from .test_distributed import FAST

pytestmark = pytest.mark.e2e


def status(cluster: LocalCluster, i: int) -> StatusReply:
    reply = cluster.call(i, StatusRequest())
    assert isinstance(reply, StatusReply)
    return reply


def invite(cluster: LocalCluster, i: int = 0, uses: int = 1) -> str:
    reply = cluster.call(i, InviteRequest(600.0, uses))
    assert isinstance(reply, InviteReply)
    return reply.token


def join_refusal(cluster: LocalCluster, i: int, token: str) -> str:
    with pytest.raises(ApiError) as info:
        cluster.call(i, JoinMeshRequest(token))
    assert info.value.code == "refused", info.value.message
    return info.value.message


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path, 3, models_dir=models_dir, env=FAST) as c:
        yield c


def test_members_see_each_others_adverts(cluster: LocalCluster) -> None:
    ids = [status(cluster, i).node_id for i in range(3)]
    for i in range(3):
        for j in range(3):
            if i != j:
                cluster.call(i, WaitRequest("advert", ids[j], timeout_s=30))
    peers = cluster.call(1, PeersRequest())
    assert isinstance(peers, PeersReply)
    assert {p.node_id for p in peers.peers} == set(ids)
    assert {p.name for p in peers.peers if not p.is_self} >= {"node0", "node2"}
    doctor = run_cli(["doctor", "--data-dir", str(cluster.data_dir(1))], env=cluster.env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        doctor.stdout.count("[ok  ] peer:") == 2
        and "[WARN] listening: only on loopback" in doctor.stdout
    )
    shown = run_cli(["status", "--json", "--data-dir", str(cluster.data_dir(1))], env=cluster.env)
    assert {p["name"] for p in json.loads(shown.stdout)["peers"]} >= {"node0", "node1", "node2"}


def test_invites_are_single_use_and_expire(tmp_path: Path, models_dir: Path) -> None:
    cluster = LocalCluster(tmp_path, 3, models_dir=models_dir, env=FAST)
    try:
        cluster.init()
        cluster.start_all()
        token = invite(cluster, 0, uses=1)
        cluster.call(1, JoinMeshRequest(token))
        assert "used_up" in join_refusal(cluster, 2, token)
        founder = NodeKey.load(cluster.data_dir(0) / "node.key")
        mesh_id = bytes.fromhex((cluster.data_dir(0) / "mesh.toml").read_text().split('"')[1])
        addrs = tuple(status(cluster, 0).listen_addrs)
        expired, _ = create_invite(founder, mesh_id, addrs, 60, 1, "late", time.time() - 3600)
        assert "expired" in join_refusal(cluster, 2, expired)
        cluster.call(2, JoinMeshRequest(invite(cluster)))  # a fresh invite works
        cluster.call(0, WaitRequest("member", status(cluster, 2).node_id, timeout_s=30))
    finally:
        cluster.stop_all()


def test_non_member_is_disconnected_and_hears_nothing(tmp_path: Path, models_dir: Path) -> None:
    with local_cluster(tmp_path / "mesh", 2, models_dir=models_dir, env=FAST) as mesh:
        founder_addr = status(mesh, 0).listen_addrs[0]
        outsider_env = {**FAST, "NEXUSD_MESH__BOOTSTRAP": founder_addr}
        with local_cluster(
            tmp_path / "out", 1, models_dir=models_dir, env=outsider_env, names=["outsider"]
        ) as out:
            outsider = status(out, 0).node_id
            mesh.daemon(0).wait_for(
                lambda e: (
                    e.get("event") in ("stream_refused", "peer_cut_off")
                    and e.get("peer") == outsider[:8]
                ),
                30,
            )
            mesh.call(0, WaitRequest("disconnected", outsider, timeout_s=30))
            seen = out.call(0, PeersRequest())
            assert isinstance(seen, PeersReply)
            assert [p.node_id for p in seen.peers if not p.is_self] == []
            members = mesh.call(0, PeersRequest())
            assert isinstance(members, PeersReply)
            assert outsider not in {p.node_id for p in members.peers}


def test_revoked_node_is_cut_off_everywhere_and_cannot_rejoin(cluster: LocalCluster) -> None:
    victim = status(cluster, 2).node_id
    cluster.call(1, WaitRequest("member", victim, timeout_s=30))
    cluster.call(0, RevokeRequest(victim[:16], "lost laptop"))
    for i in (0, 1):
        cluster.call(i, WaitRequest("not_member", victim, timeout_s=30))
        cluster.call(i, WaitRequest("disconnected", victim, timeout_s=30))
    # Its operator resets it and tries again with a fresh invite: the mesh says no.
    cluster.daemon(2).stop()
    res = run_cli(["leave", "--yes", "--data-dir", str(cluster.data_dir(2))], env=cluster.env)
    assert res.returncode == 0 and "mesh.toml" in res.stdout, res.stderr
    cluster.start(2)
    assert "revoked" in join_refusal(cluster, 2, invite(cluster))


def test_killed_node_falls_out_and_restarted_node_resumes(cluster: LocalCluster) -> None:
    ids = [status(cluster, i).node_id for i in range(3)]
    cluster.call(0, WaitRequest("advert", ids[2], timeout_s=30))
    cluster.daemon(2).kill()  # SIGKILL: no goodbye; only the lease tells
    cluster.call(0, WaitRequest("no_advert", ids[2], timeout_s=30))
    cluster.start(2)  # same data dir: key, membership and state come back from disk
    for i in (0, 1):  # under CI load this once took over 30 s; the report shows the logs
        cluster.call(i, WaitRequest("advert", ids[2], timeout_s=60))
    peers = cluster.call(2, PeersRequest())
    assert isinstance(peers, PeersReply)
    assert {p.node_id for p in peers.peers} == set(ids)
    assert status(cluster, 2).mesh_id == status(cluster, 0).mesh_id
