"""Smoke test of `python -m bench.hop --smoke`: two processes, one JSON object on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("tcp", "direct_unsigned", "direct_nosig", "direct", "libp2p_unsigned", "libp2p")


def test_bench_hop_smoke_prints_one_json_object() -> None:
    # A subprocess, as it is really run: the bench spawns its own echo process and must
    # leave nothing on stdout but its result (logs go to stderr).
    done = subprocess.run(
        [sys.executable, "-m", "bench.hop", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1
    doc = json.loads(done.stdout)
    assert doc["bench"] == "hop" and doc["smoke"] is True
    assert doc["sizes"] == [1536, 24576]
    assert doc["direct_connect_ms"] > 0
    assert isinstance(doc["direct_within_target"], bool)
    assert isinstance(doc["direct_unsigned_within_target"], bool)
    assert isinstance(doc["direct_nosig_within_target"], bool)
    for result in doc["results"]:
        assert 1 <= result["rounds"] <= doc["max_rounds"]
        for kind in KINDS:
            assert 0 < result[kind]["median_ms"] <= result[kind]["p99_ms"]
        for kind in KINDS[1:]:
            ratio = result[f"{kind}_over_tcp"]
            assert ratio == pytest.approx(
                result[kind]["median_ms"] / result["tcp"]["median_ms"], rel=1e-2
            )
        assert {"direct_signing_ms", "libp2p_signing_ms"} <= result.keys()
