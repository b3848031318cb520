"""init / run / status / stop / SIGTERM exercised on a real daemon subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
from pathlib import Path

import pytest

from .harness import DaemonProcess, run_cli, running

pytestmark = pytest.mark.e2e


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    data = tmp_path / "node"
    res = run_cli(["init", "--data-dir", str(data), "--name", "alpha", "--new-mesh", "--json"])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "alpha" and len(info["node_id"]) == 64 and len(info["mesh_id"]) == 32
    return data


def test_init_creates_private_files_and_refuses_overwrite(node_dir: Path) -> None:
    assert mode(node_dir) == 0o700
    assert mode(node_dir / "node.key") == 0o600
    assert mode(node_dir / "mesh.secret") == 0o600
    assert (node_dir / "config.toml").exists()
    key_before = (node_dir / "node.key").read_bytes()
    again = run_cli(["init", "--data-dir", str(node_dir)])
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert (node_dir / "node.key").read_bytes() == key_before
    forced = run_cli(["init", "--data-dir", str(node_dir), "--force"])
    assert forced.returncode == 0, forced.stderr
    assert (node_dir / "node.key").read_bytes() != key_before


def test_run_status_and_sigterm(node_dir: Path) -> None:
    with running(node_dir, "--port", "0") as daemon:
        sock = node_dir / "run" / "nexusd.sock"
        assert mode(sock) == 0o600
        res = run_cli(["status", "--data-dir", str(node_dir), "--json"])
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert status["name"] == "alpha" and status["pid"] == daemon.proc.pid
        human = run_cli(["status", "--data-dir", str(node_dir)])
        assert "alpha" in human.stdout and str(daemon.proc.pid) in human.stdout
        assert daemon.stop(signal.SIGTERM) == 0
        settled = daemon.wait_for("heap_settled", 1)  # daemon Rule 4: start-up heap frozen
        assert settled["frozen_objects"] > 10_000
        daemon.wait_for("daemon_stopped", 1)
        assert not sock.exists()


def test_stop_command(node_dir: Path) -> None:
    with running(node_dir, "--port", "0") as daemon:
        res = run_cli(["stop", "--data-dir", str(node_dir)])
        assert res.returncode == 0, res.stderr
        assert daemon.proc.wait(timeout=30) == 0


def test_second_daemon_on_same_data_dir_is_refused(node_dir: Path) -> None:
    with running(node_dir, "--port", "0") as first:
        second = DaemonProcess(node_dir, "--port", "0")
        assert second.proc.wait(timeout=60) == 1
        second.stop()
        text = " ".join(str(e) for e in second.seen)
        assert f"another nexusd (pid {first.proc.pid})" in text
        assert first.proc.poll() is None


def test_status_without_daemon_is_a_clear_error(node_dir: Path) -> None:
    res = run_cli(["status", "--data-dir", str(node_dir)])
    assert res.returncode == 1
    assert "no nexusd daemon" in res.stderr and "nexusd run" in res.stderr


def test_run_without_init_says_how(tmp_path: Path) -> None:
    res = run_cli(["run", "--data-dir", str(tmp_path / "fresh")])
    assert res.returncode == 1
    assert "run `nexusd init` first" in res.stderr


def raw_exchange(sock_path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_socket_frames_get_errors_and_daemon_keeps_serving(node_dir: Path) -> None:
    with running(node_dir, "--port", "0"):
        sock = node_dir / "run" / "nexusd.sock"
        for bad in (
            struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
            struct.pack(">I", 2) + b"\x92\x01",  # truncated array
            struct.pack(">I", 0xFFFFFFF0),  # oversize header
            struct.pack(">I", 4) + b"ab",  # closed mid-frame
        ):
            reply = raw_exchange(sock, bad)
            assert b"api.error" in reply and b"malformed" in reply, reply
        res = run_cli(["status", "--data-dir", str(node_dir), "--json"])
        assert res.returncode == 0, res.stderr


def test_env_and_flags_reach_the_daemon(node_dir: Path) -> None:
    with running(node_dir, "--port", "0", env={"NEXUSD_NODE__NAME": "from-env"}):
        status = json.loads(run_cli(["status", "--data-dir", str(node_dir), "--json"]).stdout)
        assert status["name"] == "from-env"
    assert os.environ.get("NEXUSD_NODE__NAME") is None


def test_sighup_reloads_what_it_can_and_never_stops_the_node(
    node_dir: Path, models_dir: Path
) -> None:
    """`systemctl reload` sends SIGHUP: the daemon re-reads its config, applies the log level
    and hosts a newly listed span at once, names what needs a restart, survives a broken
    file, and keeps serving; SIGTERM still stops it cleanly."""
    config = node_dir / "config.toml"
    original = config.read_text()
    env = {"NEXUSD_ATOMS__MODELS_DIR": str(models_dir)}
    with running(node_dir, "--port", "0", env=env) as daemon:
        config.write_text(
            original.replace('level = "info"', 'level = "debug"')
            .replace("host = []", 'host = ["minilm"]')
            .replace("max_sessions = 64", "max_sessions = 8")
        )
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_for("config_reloaded", 120)
        assert reloaded["log_level"] == "debug" and "minilm:0-8" in reloaded["hosted"]
        restart = daemon.wait_for("config_reload_needs_restart", 5)
        assert restart["keys"] == ["atoms.max_sessions"]
        status = json.loads(run_cli(["status", "--data-dir", str(node_dir), "--json"]).stdout)
        assert status["pid"] == daemon.proc.pid and status["hosted"] == ["minilm:0-8"]
        config.write_text("[mesh]\nno_such_key = 1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_for("config_reload_failed", 30)
        assert "unknown key mesh.no_such_key" in failed["reason"]
        config.write_text(original)  # the CLI reads it too
        assert run_cli(["status", "--data-dir", str(node_dir)]).returncode == 0
        assert daemon.stop(signal.SIGTERM) == 0
