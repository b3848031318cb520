"""Node commands: init, run, status, stop."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import trio

from ..api.records import (
    OkReply,
    PeersReply,
    PeersRequest,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
)
from ..config import Config
from ..node.files import init_node
from ..paths import NodePaths
from .base import CommandSpec, call_daemon, no_flags
from .output import emit, human_duration


def _init_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="a human name for this node (default: the host name)")
    p.add_argument(
        "--port",
        dest="mesh.listen_port",
        type=int,
        metavar="P",
        help="mesh listen port (0: any free port; config: mesh.listen_port)",
    )
    p.add_argument(
        "--listen-host",
        dest="mesh.listen_host",
        metavar="H",
        help="mesh listen address (config: mesh.listen_host)",
    )
    p.add_argument(
        "--new-mesh",
        action="store_true",
        help="also create a new mesh with this node as its founder and admin",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing node key / mesh (the node becomes a new node)",
    )


def _init(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    res = init_node(paths, cfg, name=args.name or "", new_mesh=args.new_mesh, force=args.force)
    emit(
        args,
        res,
        lambda: "\n".join(
            [
                f"initialised node {res.node_id[:16]}… ({res.name}) in {res.data_dir}",
                f"config: {res.config_file}",
                f"mesh:   {res.mesh_id} (founder: this node)"
                if res.mesh_id
                else "mesh:   none yet (create one with --new-mesh, or `nexusd join TOKEN`)",
            ]
        ),
    )
    return 0


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port",
        dest="mesh.listen_port",
        type=int,
        metavar="P",
        help="mesh listen port (config: mesh.listen_port)",
    )
    p.add_argument(
        "--listen-host",
        dest="mesh.listen_host",
        metavar="H",
        help="mesh listen address (config: mesh.listen_host)",
    )
    p.add_argument(
        "--metrics-port",
        dest="metrics.listen_port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics on 127.0.0.1:P (config: metrics.listen_port)",
    )
    p.add_argument(
        "--http-port",
        dest="api.http_port",
        type=int,
        metavar="P",
        help="serve the OpenAI-compatible HTTP API and the dashboard on P (config: api.http_port)",
    )
    p.add_argument(
        "--http-host",
        dest="api.http_host",
        metavar="H",
        help="HTTP API address; not loopback: a bearer token is required (config: api.http_host)",
    )


def _run(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from ..node.daemon import run_daemon  # torch and the mesh load only for the daemon itself
    from .app import reload_config  # app imports this module to list its commands

    trio.run(run_daemon, cfg, paths, lambda: reload_config(args))
    return 0


def _status(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    from .mesh import peers_table

    reply = call_daemon(paths, StatusRequest(), expect=StatusReply)
    peers = call_daemon(paths, PeersRequest(), expect=PeersReply) if reply.mesh_id else None
    data: dict[str, object] = dataclasses.asdict(reply)
    if peers is not None:
        data["peers"] = [dataclasses.asdict(p) for p in peers.peers]
        data["mesh_rejections"] = dict(peers.counters)
    emit(
        args,
        data,
        lambda: _status_text(reply) + ("\n\n" + peers_table(peers) if peers is not None else ""),
    )
    return 0


def _status_text(r: StatusReply) -> str:
    rows = [
        ("node", f"{r.node_id[:16]}… ({r.name})"),
        ("version", r.version),
        ("pid / uptime", f"{r.pid} / {human_duration(r.uptime_s)}"),
        ("mesh", r.mesh_id or "none (nexusd join TOKEN)"),
        ("listening", ", ".join(r.listen_addrs) or "-"),
        ("peers", f"{r.peers_connected} connected, {r.members} members"),
        ("hosting", ", ".join(r.hosted) or "-"),
        ("data dir", r.data_dir),
        ("socket", r.socket_path),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def _stop(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    call_daemon(paths, ShutdownRequest(), expect=OkReply)
    emit(args, {"stopping": True}, lambda: "daemon is stopping")
    return 0


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="daemons to start (default 3)")
    p.add_argument(
        "--failover",
        action="store_true",
        help="also kill a host mid-generation and show the job finishing identically",
    )
    p.add_argument("--max-tokens", type=int, default=40, help="tokens per generation (default 40)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the mesh up (the dashboard's URL is printed) until Ctrl-C, then its data dirs",
    )
    p.add_argument("--workdir", type=Path, help="where the demo's nodes live (default: a temp dir)")
    p.add_argument(
        "--models-dir",
        type=Path,
        help="where built-in models are built once (default ~/.cache/nexusd/models)",
    )


def _demo(args: argparse.Namespace, _cfg: Config, _paths: NodePaths) -> int:
    from ..harness.demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            nodes=args.nodes,
            failover=args.failover,
            max_tokens=args.max_tokens,
            keep=args.keep,
            workdir=args.workdir,
            models_dir=args.models_dir,
        )
    )


NODE_COMMANDS = (
    CommandSpec(
        "init", "create this node's key, config and optionally a new mesh", _init_flags, _init
    ),
    CommandSpec(
        "run",
        "run the daemon in the foreground (systemd supervises it)",
        _run_flags,
        _run,
        json=False,
    ),
    CommandSpec("status", "show the local daemon's status", no_flags, _status),
    CommandSpec("stop", "ask the local daemon to shut down gracefully", no_flags, _stop),
    CommandSpec(
        "demo",
        "run a real local mesh on 127.0.0.1 with real jobs, then stop it",
        _demo_flags,
        _demo,
        json=False,
    ),
)
