"""Smoke test of `python -m bench.route`: runs in-process and prints one JSON object."""

from __future__ import annotations

import json

import pytest

from bench import route


def test_bench_route_smoke_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert route.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc["bench"] == "route"
    assert doc["smoke"] is True
    assert [s["hosts"] for s in doc["sizes"]] == [3, 10]
    assert doc["calibration_ms"] > 0
    for size in doc["sizes"]:
        assert size["graph_edges"] >= size["hosts"]  # every host can be entered
        assert 0 < size["latency_median_ms"] <= size["latency_p90_ms"]
        assert 0 < size["batch_median_ms"] <= size["batch_p90_ms"]
        assert size["route_hops"] >= 1
        assert size["route_est_total_s"] > 0


def test_bench_route_reports_the_ratio_to_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert route.main(["--hosts", "1000", "--atoms", "4", "--repeat", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["target_1000_hosts_ms"] == 50.0
    assert doc["ratio_to_target"] == pytest.approx(
        doc["sizes"][0]["latency_median_ms"] / 50.0, abs=1e-3
    )
