"""Smoke test of bench.concurrency (2 daemons, 3 streams of 3 tokens: ~40 s on the shared
2-core machine): one JSON object, each stream's tokens equal to its run alone, the pool's
memory figure and the batched compute figure present."""

from __future__ import annotations

from pathlib import Path

from .test_bench_smoke import run_bench


def test_concurrency_smoke_streams_match_their_runs_alone(tmp_path: Path) -> None:
    doc = run_bench("concurrency", tmp_path=tmp_path)
    assert doc["streams"] == 3 and doc["tokens_identical"] is True
    assert doc["streams_identical"] == [True, True, True]
    assert doc["concurrent_tokens_per_s"] > 0 and doc["one_at_a_time_tokens_per_s"] > 0
    for kv in doc["kv_memory"]:
        assert kv["sessions"] == 3 and kv["bytes_held"] >= kv["bytes_used"] > 0
        # a session holds whole pages: at most one partly used page per session
        assert (
            kv["bytes_held"] - kv["bytes_used"] < 3 * kv["page_tokens"] * kv["kv_bytes_per_token"]
        )
    assert [b["span"] for b in doc["batch_compute"]] == doc["layout"]
    assert set(doc["ms_per_token_per_stream"]) == {"one_at_a_time", "concurrent"}
