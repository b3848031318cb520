"""Mesh commands: invite, join, revoke, peers."""

from __future__ import annotations

import argparse

from ..api.records import (
    InviteReply,
    InviteRequest,
    JoinedReply,
    JoinMeshRequest,
    OkReply,
    PeersReply,
    PeersRequest,
    RevokeRequest,
)
from ..config import Config
from ..errors import ApiError
from ..paths import NodePaths
from .base import CommandSpec, call_daemon
from .output import emit, table

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """ "90s", "15m", "1h", "7d" or plain seconds -> seconds."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            return float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise ApiError(
            "bad_request", f"duration {text!r}: expected e.g. 90s, 15m, 1h, 7d"
        ) from None


def _invite_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttl", default="1h", help="how long the invite is valid (default 1h)")
    p.add_argument(
        "--uses", type=int, default=1, help="how many nodes may join with it (default 1)"
    )
    p.add_argument("--name", default="", help="name the joining node will have")


def _invite(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(
        paths, InviteRequest(parse_duration(args.ttl), args.uses, args.name), expect=InviteReply
    )
    emit(
        args,
        reply,
        lambda: "\n".join(
            [
                f"invite valid for {args.ttl}, {reply.uses} use(s); bootstrap: {', '.join(reply.bootstrap)}",
                "on the new device run:  nexusd join TOKEN   (with its daemon running)",
                reply.token,
            ]
        ),
    )
    return 0


def _join_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("token", help="the invite token printed by `nexusd invite`")
    p.add_argument("--name", default="", help="this node's name in the mesh")


def _join(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(
        paths, JoinMeshRequest(args.token, args.name), expect=JoinedReply, timeout_s=120
    )
    emit(args, reply, lambda: f"joined mesh {reply.mesh_id} ({reply.members} members)")
    return 0


def _revoke_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", help="node id (or a unique prefix of >= 8 hex chars)")
    p.add_argument("--reason", default="", help="recorded with the revocation")


def _revoke(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(paths, RevokeRequest(args.node, args.reason), expect=OkReply)
    emit(args, {"revoked": args.node}, lambda: reply.message)
    return 0


def _peers_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait-hosts",
        type=int,
        default=0,
        metavar="N",
        help="first wait until N nodes advertise atoms (of --model if given)",
    )
    p.add_argument("--model", default="", help="with --wait-hosts: count hosts of this model")
    p.add_argument("--timeout", type=float, default=30.0, help="longest wait (default 30 s)")


def _peers(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(
        paths,
        PeersRequest(args.wait_hosts, args.model, args.timeout),
        expect=PeersReply,
        timeout_s=args.timeout + 10,
    )
    emit(args, reply, lambda: f"mesh {reply.mesh_id}\n" + peers_table(reply))
    return 0


def peers_table(reply: PeersReply) -> str:
    """Members as a table: name, id, roles, advert state, connection, RTT, bandwidth, load,
    and KV pool pages in use / in all."""
    rows = [
        [
            (p.name or "?") + (" (self)" if p.is_self else ""),
            p.node_id[:12],
            ",".join(p.roles) or "-",
            p.state,
            "yes" if p.connected else "no",
            f"{p.rtt_ms:.2f}" if p.rtt_ms >= 0 else "-",
            f"{p.bandwidth_mb_per_s:.0f}" if p.bandwidth_mb_per_s >= 0 else "-",
            " ".join(p.hosted) or "-",
            f"{p.queue_depth}/{p.utilisation:.0%}",
            f"{p.kv_pages_used}/{p.kv_pages_total}" if p.kv_pages_total > 0 else "-",
            "BANNED" if p.banned else "",
        ]
        for p in reply.peers
    ]
    out = table(
        [
            *("name", "node", "roles", "state", "conn", "rtt ms", "MB/s", "hosting"),
            *("queue/busy", "KV pages", ""),
        ],
        rows,
    )
    return "\n".join([out, *bottleneck_lines(reply)])


def bottleneck_lines(reply: PeersReply) -> list[str]:
    """One line per model: the swarm's least-served span and what would fix it."""
    out = []
    for b in reply.bottlenecks:
        where = f"{b.model_id} atoms {b.start}-{b.end} of {b.n_atoms}"
        if b.tokens_per_s <= 0:
            out.append(f"bottleneck: {where}: NOBODY serves them; fix: {b.fix}")
        else:
            speed = f"{b.tokens_per_s:.1f} tokens/s"
            out.append(f"bottleneck: {where} at {speed} ({b.hosts} hosts); to raise it: {b.fix}")
    return out


def _leave_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", action="store_true", help="do it (without it, only say what would go)")


def _leave(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    """Forget the mesh (offline): the node keeps its key and jobs, and may join again."""
    from ..node.daemon import node_lock

    doomed = [
        p
        for p in (
            paths.mesh_file,
            paths.mesh_secret,
            paths.state_db,
            paths.state_db.with_name(paths.state_db.name + "-wal"),
            paths.state_db.with_name(paths.state_db.name + "-shm"),
            paths.data_dir / "invites.json",
        )
        if p.exists()
    ]
    with node_lock(paths):  # refuses while a daemon runs on this data dir
        if args.yes:
            for p in doomed:
                p.unlink()
    names = [p.name for p in doomed]
    emit(
        args,
        {"removed" if args.yes else "would_remove": names},
        lambda: (
            ("removed: " if args.yes else "would remove (add --yes): ")
            + (", ".join(names) or "nothing: this node is in no mesh")
        ),
    )
    return 0


MESH_COMMANDS = (
    CommandSpec(
        "invite", "create an invite token for a new device (admins)", _invite_flags, _invite
    ),
    CommandSpec(
        "join", "make the local daemon join a mesh with an invite token", _join_flags, _join
    ),
    CommandSpec("revoke", "revoke a member forever (admins)", _revoke_flags, _revoke),
    CommandSpec("peers", "members, their state, RTTs and what they host", _peers_flags, _peers),
    CommandSpec(
        "leave", "forget this node's mesh (daemon stopped); its key stays", _leave_flags, _leave
    ),
)
