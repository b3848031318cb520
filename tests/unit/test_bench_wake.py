"""Smoke test of `python -m bench.wake --smoke`: one JSON object with every gap measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_wake_smoke_prints_one_json_object() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.wake", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1
    doc = json.loads(done.stdout)
    assert doc["bench"] == "wake" and doc["smoke"] is True and doc["rounds"] == 5
    gaps = {"0", "1", "5", "15"}
    assert set(doc["decode_after_sleep_ms"]) == gaps
    for figures in doc["decode_after_sleep_ms"].values():
        assert figures["first_us"] > 0 and figures["second_us"] > 0
    for key in ("tcp_after_sleep_ms", "tcp_after_spin_ms"):
        assert set(doc[key]) == gaps and all(v["rtt_us"] > 0 for v in doc[key].values())
    assert doc["decode_cold_over_hot"] > 0
