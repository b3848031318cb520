"""Smoke tests of the mesh benches: each `--smoke` variant prints one JSON object with its keys.

The benches run as subprocesses (they start daemons, pin threads, configure logging), each
under a deadline. The generate smoke (2 daemons, 4 tokens) takes ~11-16 s; embed (plus a
pinned baseline subprocess), failover (4 daemons), converge with real daemons (3) and train
(2 daemons, 3 training jobs, 2 baseline subprocesses: ~30 s) take 12-35 s on the shared
2-core machine; the simulated convergence (~2 s) and the `bench.all` table are fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import all as bench_all

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def run_bench(name: str, *args: str, tmp_path: Path) -> dict[str, Any]:
    """`python -m bench.NAME --smoke ARGS` (daemon data in tmp_path); its one JSON object."""
    res = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke", "--workdir", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-1000:]
    doc: dict[str, Any] = json.loads(lines[0])  # Any: decoded JSON
    assert doc["bench"] == name
    assert doc["smoke"] is True
    return doc


def test_generate_smoke_matches_one_process(tmp_path: Path) -> None:
    doc = run_bench("generate", tmp_path=tmp_path)
    assert doc["tokens_identical"] is True
    assert doc["nodes"] == 2 and doc["hops"] == 2 and doc["new_tokens"] == 4
    assert doc["mesh_tokens_per_s"] > 0 and doc["one_process_tokens_per_s"] > 0
    assert doc["ratio"] == pytest.approx(
        doc["mesh_tokens_per_s"] / doc["one_process_tokens_per_s"], rel=0.01
    )
    assert doc["per_hop_overhead_ms_per_token"] >= doc["per_hop_queue_ms_per_token"] >= 0
    assert [h["steps"] for h in doc["route"]] == [4, 4]
    assert doc["failovers"] == 0


def test_embed_smoke_reports_both_baselines(tmp_path: Path) -> None:
    doc = run_bench("embed", tmp_path=tmp_path)
    assert doc["min_cosine_vs_one_process"] >= 0.9999
    assert doc["texts"] == 16 and doc["micro_batch"] == 8
    assert doc["mesh_texts_per_s"] > 0 and doc["one_process_texts_per_s"] > 0
    one = doc["by_micro_batch"]["8"]
    assert [h["name"] for h in one["hosts"]] == ["host1", "host2"]
    assert set(one["cpu_s"]) == {"origin", "host1", "host2"}
    if doc["pinned"]:
        assert doc["speedup_pinned"] == pytest.approx(
            doc["mesh_texts_per_s"] / doc["single_core_process_texts_per_s"], rel=0.01
        )


def test_failover_smoke_kills_a_host_and_output_is_identical(tmp_path: Path) -> None:
    doc = run_bench("failover", tmp_path=tmp_path)
    assert doc["identical"] is True and doc["clean_identical"] is True
    (run,) = doc["runs"]
    assert run["failovers"] >= 1 and run["victim"] in (2, 3)
    assert run["replayed_steps"] >= 2
    assert run["detect_s"] >= 0 and run["reroute_s"] > 0
    assert doc["added_over_budget_worst"] == run["added_over_budget"]


def test_converge_smoke_real_daemons(tmp_path: Path) -> None:
    doc = run_bench("converge", tmp_path=tmp_path)
    real = doc["real"]
    assert real["nodes"] == 3 and len(real["trials"]) == 1
    assert real["all_seen_ms_median"] > 0 and real["api_round_trip_ms"] > 0


def test_converge_smoke_simulation(tmp_path: Path) -> None:
    doc = run_bench("converge", "--no-real", tmp_path=tmp_path)
    sim = doc["sim"]
    assert "real" not in doc
    assert sim["nodes"] == 6 and len(sim["changes"]) == 1
    assert 0 < sim["seen_virtual_s_median"] <= sim["converged_virtual_s_median"]
    assert sim["heal"]["diverged_while_split"] is True
    assert sim["heal"]["heal_virtual_s"] > 0 and sim["cpu_s"] > 0


@pytest.mark.bench  # 1-2 min: `make test-all` runs it
def test_train_smoke_mesh_learns_like_one_process(tmp_path: Path) -> None:
    doc = run_bench("train", tmp_path=tmp_path)
    assert doc["losses_match"] is True and doc["max_loss_diff_vs_one_process"] < 1e-3
    assert doc["settings"]["tokens_per_step"] == 64 and doc["settings"]["timed_steps"] == 1
    assert doc["mesh_tokens_per_s"] > 0 and doc["one_process_tokens_per_s"] > 0
    assert doc["ratio"] == pytest.approx(
        doc["mesh_tokens_per_s"] / doc["one_process_tokens_per_s"], rel=0.01
    )
    for schedule in ("1f1b", "gpipe"):
        run = doc["by_schedule"][schedule]
        assert [h["atoms"] for h in run["hops"]] == ["0-10", "10-11"]
        assert run["stages_p"] == 2 and run["bubble_gpipe_formula"] == pytest.approx(
            1 / 3, abs=1e-3
        )
        assert set(run["bubble_measured"]) == {"origin", "host1"}
        assert all(0.0 <= v <= 1.0 for v in run["bubble_measured"].values())
        assert run["failovers"] == 0
    fp32, bf16 = doc["precision"]["fp32"], doc["precision"]["bf16"]
    assert fp32["tokens_per_s"] > 0 and bf16["tokens_per_s"] > 0
    assert fp32["val_loss_after"] != fp32["val_loss_before"]  # the steps changed the weights
    assert bf16["val_loss_after"] == pytest.approx(fp32["val_loss_after"], abs=0.05)
    cut = doc["pinned_cuts"][doc["best_cut"]]
    assert doc["speedup_pinned"] == pytest.approx(
        cut["tokens_per_s"] / cut["single_core_tokens_per_s"], rel=0.02
    )
    rows = [line for line in bench_all.table({"train": doc}).splitlines() if "bench.train" in line]
    assert len(rows) == 4 and not any("n/a" in row for row in rows)


@pytest.mark.bench  # 1-2 min: `make test-all` runs it
def test_compress_smoke_measures_every_level() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "bench.compress", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["bench"] == "compress" and doc["smoke"] is True
    runs = doc["minilm"]
    assert runs["int8"]["cosine"] >= 0.999 and runs["int8"]["bytes_ratio"] <= 0.35
    assert runs["int4"]["bytes_ratio"] <= 0.2 and runs["int4"]["atom_levels"][0] == "int4"
    assert runs["prune_25"]["params"] < runs["prune_25"]["ref_params"]
    assert runs["magnitude_50"]["bytes_ratio"] == 1.0 and runs["bf16"]["bytes_ratio"] == 0.5
    assert doc["kernels"]["fp32"] > 0 and doc["kernels"]["ours_int8"] > 0
    wire = doc["wire_codecs"]
    assert wire["minilm_embeddings"]["raw"]["cosine"] == 1.0
    assert wire["minilm_embeddings"]["int8"]["cosine"] >= 0.999
    assert wire["sizes_hidden_384"]["int8"]["bytes_ratio"] < 0.3
    rows = [
        line for line in bench_all.table({"compress": doc}).splitlines() if "bench.compress" in line
    ]
    assert len(rows) == 4


def test_all_table_has_a_row_per_figure_and_marks_errors() -> None:
    results: dict[str, dict[str, object]] = {
        "generate": {
            "ratio": 0.5,
            "nodes": 3,
            "mesh_tokens_per_s": 30.0,
            "one_process_tokens_per_s": 60.0,
            "tokens_identical": True,
            "per_hop_overhead_ms_per_token": 4.4,
            "per_hop_transfer_ms_per_token": 3.3,
        },
        "failover": {"error": "exit 1"},
        "hop": {"skipped": "not in this tree"},
    }
    text = bench_all.table(results)
    lines = text.splitlines()
    assert lines[0] == "| figure | target | measured | how far | command |"
    gen = [line for line in lines if line.startswith("| tokens/s")]
    assert gen == [gen[0]] and "0.50x (30.0 vs 60.0 tok/s, 3 daemons; identical: True)" in gen[0]
    assert "0.56x of target ✗" in gen[0] and gen[0].endswith("| `python -m bench.generate` |")
    assert any("exit 1" in line and "bench.failover" in line for line in lines)
    assert any("not in this tree" in line and "bench.hop" in line for line in lines)
    assert not any("bench.embed" in line for line in lines)  # not run: no row


def test_wake_smoke_measures_every_gap(tmp_path: Path) -> None:
    doc = run_bench("wake", tmp_path=tmp_path)
    assert doc["smoke"] is True and doc["rounds"] == 5
    gaps = {"0", "1", "5", "15"}
    assert set(doc["decode_after_sleep_ms"]) == gaps
    for figures in doc["decode_after_sleep_ms"].values():
        assert figures["first_us"] > 0 and figures["second_us"] > 0
    for key in ("tcp_after_sleep_ms", "tcp_after_spin_ms"):
        assert set(doc[key]) == gaps and all(v["rtt_us"] > 0 for v in doc[key].values())
    rows = [line for line in bench_all.table({"wake": doc}).splitlines() if "bench.wake" in line]
    assert len(rows) == 1 and "n/a" not in rows[0]
