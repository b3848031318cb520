"""Daemon settings as deployed: the systemd reload."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_reload_sends_sighup_not_sigterm() -> None:
    """`systemctl reload` must not stop the node: SIGTERM is a clean exit, which
    Restart=on-failure does not restart."""
    for unit in ("nexusd.service", "nexusd-user.service"):
        lines = (ROOT / "systemd" / unit).read_text().splitlines()
        assert [ln for ln in lines if ln.startswith("ExecReload=")] == [
            "ExecReload=/bin/kill -HUP $MAINPID"], unit  # fmt: skip
