"""Run every benchmark in sequence; save their JSON and print a markdown table (docs/architecture.md §9).

Rule 1: each bench runs as its own `python -m bench.NAME` subprocess (its own torch
threads, logging and processes), under a deadline; one that fails or times out is recorded
as an error with the tail of its stderr, and the others still run.
Rule 2: the results go to `bench/results/latest.json` (one object: when, where, each
bench's JSON); stdout gets the markdown table: figure, target, measured, how far, command.
Rule 3: benches not present in this tree (e.g. `hop` before it lands) are skipped and
listed as such, never faked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "latest.json"
ORDER = (
    "route",
    "hop",
    "wake",
    "generate",
    "concurrency",
    "embed",
    "failover",
    "converge",
    "placement",
    "train",
    "compress",
    "distill_embed",
    "slow_link",
    "http",
)
FULL_TIMEOUT_S = 420.0
TIMEOUTS_S = {  # train: five clusters' worth of runs; distill_embed: two students' training
    "train": 900.0,
    "placement": 900.0,
    "distill_embed": 1200.0,
}
SMOKE_TIMEOUT_S = 180.0

Doc = dict[str, object]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure of a bench and its target."""

    bench: str
    figure: str
    target: str
    measured: Callable[[Doc], str]
    how_far: Callable[[Doc], str]


def _get(doc: Doc, *path: str) -> object:
    cur: object = doc
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _num(doc: Doc, *path: str) -> float | None:
    v = _get(doc, *path)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def _rows(doc: Doc, key: str) -> list[object]:
    rows = _get(doc, key)
    return rows if isinstance(rows, list) else []


def _hop_ratio(doc: Doc, key: str = "direct_nosig_over_tcp") -> float | None:
    """A 1.5 KB hop over raw TCP. Default: the exec path daemons use (direct channel, frames
    authenticated by the channel, header + tensor in one write); "direct_over_tcp" is the
    same with a per-message Ed25519 envelope, what a libp2p-stream hop pays on top."""
    for r in _rows(doc, "results"):
        if isinstance(r, dict) and r.get("size_bytes") == 1536 and key in r:
            return float(r[key])
    return None


def _route_ms(doc: Doc) -> float | None:
    for r in _rows(doc, "sizes"):
        if isinstance(r, dict) and r.get("hosts") == 1000:
            return float(r["latency_median_ms"])
    return None


def _kv_held(doc: Doc) -> float | None:
    """Pool bytes held over bytes used at the default page size (the first measured)."""
    rows = _rows(doc, "kv_memory")
    if rows and isinstance(rows[0], dict):
        return float(rows[0]["held_over_used"])
    return None


def _of_target(v: float | None, target: float, *, higher_is_better: bool) -> str:
    if v is None:
        return "n/a"
    ok = v >= target if higher_is_better else v <= target
    return f"{v / target:.2f}x of target {'✓' if ok else '✗'}"


ROWS = (
    Row(
        "placement",
        "swarm tokens/s, 3 daemons --auto vs the best manual layout (same memory budget)",
        "≥ 0.9x",
        lambda d: (
            f"{_fmt(_num(d, 'ratio'), 'x')} ({_fmt(_num(d, 'auto_tokens_per_s'), '', 1)} vs "
            f"{_fmt(_num(d, 'best_manual_tokens_per_s'), '', 1)} tok/s, best manual: "
            f"{_get(d, 'best_manual')})"
        ),
        lambda d: _of_target(_num(d, "ratio"), 0.9, higher_is_better=True),
    ),
    Row(
        "concurrency",
        "8 concurrent generations vs one at a time, 3 daemons (aggregate tokens/s)",
        "≥ 3x",
        lambda d: (
            f"{_fmt(_num(d, 'ratio'), 'x')} ({_fmt(_num(d, 'concurrent_tokens_per_s'), '', 1)} "
            f"vs {_fmt(_num(d, 'one_at_a_time_tokens_per_s'), '', 1)} tok/s; "
            f"identical: {_get(d, 'tokens_identical')})"
        ),
        lambda d: _of_target(_num(d, "ratio"), 3.0, higher_is_better=True),
    ),
    Row(
        "concurrency",
        "KV pool bytes held / bytes used, 8 sessions of mixed lengths",
        "≤ 1.2x",
        lambda d: f"{_fmt(_kv_held(d), 'x')}",
        lambda d: _of_target(_kv_held(d), 1.2, higher_is_better=False),
    ),
    Row(
        "route",
        "route planning, 1000 hosts (median)",
        "≤ 50 ms",
        lambda d: _fmt(_route_ms(d), " ms", 1),
        lambda d: _of_target(_num(d, "ratio_to_target"), 1.0, higher_is_better=False),
    ),
    Row(
        "hop",
        "exec hop (direct channel), 1.5 KB, vs raw TCP",
        "≤ 2x",
        lambda d: (
            f"{_fmt(_hop_ratio(d), 'x')} (with a per-message signature: "
            f"{_fmt(_hop_ratio(d, 'direct_over_tcp'), 'x')}; libp2p stream, signed: "
            f"{_fmt(_hop_ratio(d, 'libp2p_over_tcp'), 'x')})"
        ),
        lambda d: _of_target(_hop_ratio(d), 2.0, higher_is_better=False),
    ),
    Row(
        "wake",
        "decode of a 1.5 KB activation after 15 ms asleep vs hot (what each hop pays here)",
        "(no target: the machine's floor)",
        lambda d: (
            f"{_fmt(_num(d, 'decode_cold_over_hot'), 'x')} "
            f"({_fmt(_num(d, 'decode_after_sleep_ms', '15', 'first_us'), ' us', 0)} vs "
            f"{_fmt(_num(d, 'decode_after_sleep_ms', '0', 'first_us'), ' us', 1)}); TCP round "
            f"trip {_fmt(_num(d, 'tcp_after_sleep_ms', '15', 'rtt_us'), ' us', 0)} vs "
            f"{_fmt(_num(d, 'tcp_after_sleep_ms', '0', 'rtt_us'), ' us', 0)}"
        ),
        lambda d: "—",
    ),
    Row(
        "generate",
        "tokens/s, 3-daemon mesh vs one process",
        "≥ 0.9x",
        lambda d: (
            f"{_fmt(_num(d, 'ratio'), 'x')} ({_fmt(_num(d, 'mesh_tokens_per_s'), '', 1)} vs "
            f"{_fmt(_num(d, 'one_process_tokens_per_s'), '', 1)} tok/s, {_get(d, 'nodes')} daemons; "
            f"identical: {_get(d, 'tokens_identical')})"
        ),
        lambda d: _of_target(_num(d, "ratio"), 0.9, higher_is_better=True),
    ),
    Row(
        "generate",
        "overhead per hop per token",
        "(Petals: ~6-7 ms per server)",
        lambda d: (
            f"{_fmt(_num(d, 'per_hop_overhead_ms_per_token'), ' ms')} (transfer "
            f"{_fmt(_num(d, 'per_hop_transfer_ms_per_token'), ' ms')})"
        ),
        lambda d: "-",
    ),
    Row(
        "embed",
        "sentences/s, mesh (2 hosts) vs one process",
        "-",
        lambda d: (
            f"{_fmt(_num(d, 'ratio_vs_one_process'), 'x')} ({_fmt(_num(d, 'mesh_texts_per_s'), '', 1)} vs "
            f"{_fmt(_num(d, 'one_process_texts_per_s'), '', 1)}/s; min cos {_get(d, 'min_cosine_vs_one_process')})"
        ),
        lambda d: "-",
    ),
    Row(
        "embed",
        "2 pinned single-core hosts vs 1 single-core process",
        "≥ 1.6x",
        lambda d: (
            f"{_fmt(_num(d, 'speedup_pinned'), 'x')} (best micro-batch {_get(d, 'best_micro_batch')}: "
            f"{_fmt(_num(d, 'best_speedup_pinned'), 'x')}; pinned: {_get(d, 'pinned')})"
        ),
        lambda d: _of_target(_num(d, "speedup_pinned"), 1.6, higher_is_better=True),
    ),
    Row(
        "failover",
        "added latency / (2 steps + replay), worst run",
        "< 1",
        lambda d: (
            f"{_fmt(_num(d, 'added_over_budget_worst'))} (added {_fmt(_num(d, 'added_s_median'), ' s', 3)}, "
            f"step {_fmt(_num(d, 'step_ms'), ' ms', 1)}; identical: {_get(d, 'identical')})"
        ),
        lambda d: _of_target(_num(d, "added_over_budget_worst"), 1.0, higher_is_better=False),
    ),
    Row(
        "converge",
        "3 daemons: new advert seen by all (median)",
        "-",
        lambda d: (
            f"{_fmt(_num(d, 'real', 'all_seen_ms_median'), ' ms', 1)} (API round trip "
            f"{_fmt(_num(d, 'real', 'api_round_trip_ms'), ' ms')})"
        ),
        lambda d: "-",
    ),
    Row(
        "converge",
        "50 simulated nodes: change / partition heal (virtual)",
        "-",
        lambda d: (
            f"{_fmt(_num(d, 'sim', 'converged_virtual_s_median'), ' s', 3)} / "
            f"{_fmt(_num(d, 'sim', 'heal', 'heal_virtual_s'), ' s', 2)} "
            f"({_fmt(_num(d, 'sim', 'cpu_s'), ' s CPU', 1)}, {_get(d, 'sim', 'nodes')} nodes)"
        ),
        lambda d: "-",
    ),
    Row(
        "train",
        "training tokens/s, 3-daemon mesh vs one process",
        "≥ 0.7x",
        lambda d: (
            f"{_fmt(_num(d, 'ratio'), 'x')} ({_fmt(_num(d, 'mesh_tokens_per_s'), '', 1)} vs "
            f"{_fmt(_num(d, 'one_process_tokens_per_s'), '', 1)} tok/s, 1F1B; GPipe "
            f"{_fmt(_num(d, 'ratio_gpipe'), 'x')}; losses match: {_get(d, 'losses_match')})"
        ),
        lambda d: _of_target(_num(d, "ratio"), 0.7, higher_is_better=True),
    ),
    Row(
        "train",
        "training, 2 pinned single-core hosts vs 1 single-core process",
        "≥ 1.5x",
        lambda d: (
            f"{_fmt(_num(d, 'speedup_pinned'), 'x')} (best cut {_get(d, 'best_cut')}; "
            f"{_cut_speedups(d)}; pinned: {_get(d, 'pinned')}; other processes used "
            f"{_fmt(_num(d, 'pinned_cuts', str(_get(d, 'best_cut')), 'others_cores'))} cores)"
        ),
        lambda d: _of_target(_num(d, "speedup_pinned"), 1.5, higher_is_better=True),
    ),
    Row(
        "train",
        "pipeline bubble (idle share) vs GPipe formula (p-1)/(m+p-1)",
        "-",
        lambda d: _bubbles(d),
        lambda d: "-",
    ),
    Row(
        "train",
        "bf16 autocast vs fp32 tokens/s, one process",
        "-",
        lambda d: (
            f"{_fmt(_num(d, 'precision', 'bf16_over_fp32'), 'x')} (val loss after "
            f"{_get(d, 'settings', 'steps')} steps: fp32 {_get(d, 'precision', 'fp32', 'val_loss_after')}, "
            f"bf16 {_get(d, 'precision', 'bf16', 'val_loss_after')}, from "
            f"{_get(d, 'precision', 'fp32', 'val_loss_before')})"
        ),
        lambda d: "-",
    ),
    Row(
        "compress",
        "MiniLM int8 weight-only: embedding cosine, weight bytes",
        "≥ 0.999, ≤ 0.35x",
        lambda d: _compress(d, "int8"),
        lambda d: _met(d, "int8_cosine_0.999_bytes_0.35"),
    ),
    Row(
        "compress",
        "MiniLM 4-bit (int4 g32, GPTQ; int8 atoms within budget)",
        "≥ 0.99, ≤ 0.2x",
        lambda d: _compress(d, "int4"),
        lambda d: _met(d, "int4_cosine_0.99_bytes_0.2"),
    ),
    Row(
        "compress",
        "MiniLM 25 % heads + FFN neurons pruned: cosine, speed",
        "≥ 0.98, ≥ 1.2x",
        lambda d: _compress(d, "prune_25"),
        lambda d: f"cosine {_met(d, 'prune_cosine_0.98')}, speed {_met(d, 'prune_speedup_1.2')}",
    ),
    Row(
        "compress",
        "Nexus 1.1 int8: perplexity vs fp32",
        "≤ 1.02x",
        lambda d: (
            f"{_fmt(_num(d, 'nexus', 'int8', 'perplexity_ratio'), 'x', 4)} "
            f"({_get(d, 'nexus', 'int8', 'perplexity')} vs {_get(d, 'nexus', 'int8', 'ref_perplexity')}, "
            f"{_get(d, 'nexus', 'model')})"
        ),
        lambda d: _met(d, "nexus_int8_perplexity_2pct"),
    ),
    Row(
        "distill_embed",
        "MiniLM 3-layer student distilled: cosine to the teacher, speed",
        "≥ 0.95, ≥ 1.8x",
        lambda d: _distilled(d, "s3"),
        lambda d: _met(d, "s3_cosine_0.95_speed_1.8"),
    ),
    Row(
        "distill_embed",
        "MiniLM pruned 25 % heads + FFN, distilled: cosine to the teacher",
        "≥ 0.98",
        lambda d: _distilled(d, "pruned"),
        lambda d: _met(d, "pruned_cosine_0.98"),
    ),
    Row(
        "slow_link",
        "MiniLM embeddings/s over a 10 Mbit/s tbf link, --codec auto vs raw",
        "≥ 2x",
        lambda d: (
            f"{_fmt(_num(d, 'auto_over_raw'), 'x')} ({_fmt(_num(d, 'auto_sentences_per_s'), '', 1)}"
            f" vs {_fmt(_num(d, 'raw_sentences_per_s'), '', 1)} sentences/s; hop codec "
            f"{_get(d, 'auto_hop_codec')}, cosine to raw min {_get(d, 'auto_cosine_to_raw_min')})"
        ),
        lambda d: _of_target(_num(d, "auto_over_raw"), 2.0, higher_is_better=True),
    ),
    Row(
        "http",
        "HTTP API: 16-token completion latency vs the Unix socket",
        "≤ 1.1x",
        lambda d: (
            f"{_fmt(_num(d, 'latency_ratio'), 'x', 3)} ({_get(d, 'http_ms')} vs "
            f"{_get(d, 'socket_ms')} ms; streamed {_get(d, 'http_stream_tokens_per_s')} vs "
            f"{_get(d, 'socket_stream_tokens_per_s')} tok/s over the socket; "
            f"same tokens: {_get(d, 'same_tokens')})"
        ),
        lambda d: _of_target(_num(d, "latency_ratio"), 1.1, higher_is_better=False),
    ),
)


def _compress(doc: Doc, run: str) -> str:
    return (
        f"cosine {_fmt(_num(doc, 'minilm', run, 'cosine'), '', 4)}, "
        f"{_fmt(_num(doc, 'minilm', run, 'bytes_ratio'), 'x', 3)} bytes, "
        f"{_fmt(_num(doc, 'minilm', run, 'speedup'), 'x')} fp32 speed"
    )


def _distilled(doc: Doc, name: str) -> str:
    # the pruned model is judged on compress's evaluation paragraphs (bench.distill_embed)
    key = "compress_cosine" if name == "pruned" else "cosine"
    return (
        f"cosine {_fmt(_num(doc, f'{name}_distilled', f'{key}_mean'), '', 4)} "
        f"(min {_fmt(_num(doc, f'{name}_distilled', f'{key}_min'), '', 4)}; before "
        f"{_fmt(_num(doc, f'{name}_cut', f'{key}_mean'), '', 4)}), "
        f"{_fmt(_num(doc, f'{name}_distilled', 'speedup'))}x speed, linear-head accuracy "
        f"{_fmt(_num(doc, f'{name}_distilled', 'accuracy', 'linear_head'), '', 3)} vs teacher "
        f"{_fmt(_num(doc, 'teacher', 'accuracy', 'linear_head'), '', 3)}, "
        f"{_get(doc, 'settings', 'steps')} steps"
    )


def _met(doc: Doc, key: str) -> str:
    met = _get(doc, "targets_met", key)
    return "n/a" if met is None else ("✓" if met else "✗")


def _cut_speedups(doc: Doc) -> str:
    cuts = _get(doc, "pinned_cuts")
    if not isinstance(cuts, dict):
        return "n/a"
    return ", ".join(
        f"{k}: {_fmt(_num(v, 'speedup'), 'x')}" for k, v in cuts.items() if isinstance(v, dict)
    )


def _bubbles(doc: Doc) -> str:
    """The bottleneck host's (least idle) measured share beside the formula, per run."""
    daemons = len(_rows(doc, "mesh_layout"))
    runs = [(f"{daemons} daemons {s}", _get(doc, "by_schedule", s)) for s in ("1f1b", "gpipe")]
    runs.append(
        (f"pinned {_get(doc, 'best_cut')}", _get(doc, "pinned_cuts", str(_get(doc, "best_cut"))))
    )
    parts = []
    for name, run in runs:
        if not isinstance(run, dict) or not isinstance(run.get("bubble_measured"), dict):
            continue
        idle = min(float(v) for v in run["bubble_measured"].values())
        parts.append(
            f"{name}: {idle:.2f} vs {_fmt(_num(run, 'bubble_gpipe_formula'))} "
            f"(p={run.get('stages_p')}, m={run.get('micro_batches_m')})"
        )
    return "; ".join(parts) or "n/a"


def available(name: str) -> bool:
    return importlib.util.find_spec(f"bench.{name}") is not None


def run_one(name: str, smoke: bool, extra: list[str]) -> Doc:
    """Run `python -m bench.NAME`; its JSON, or {"error": ...}."""
    cmd = [sys.executable, "-m", f"bench.{name}", *(["--smoke"] if smoke else []), *extra]
    timeout = SMOKE_TIMEOUT_S if smoke else TIMEOUTS_S.get(name, FULL_TIMEOUT_S)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    took = round(time.perf_counter() - t0, 1)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {
            "error": f"exit {res.returncode}",
            "stderr_tail": res.stderr[-1500:],
            "took_s": took,
        }
    try:
        doc = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {
            "error": "last stdout line is not JSON",
            "stdout_tail": res.stdout[-500:],
            "took_s": took,
        }
    if not isinstance(doc, dict):
        return {"error": "output is not a JSON object", "took_s": took}
    doc["took_s"] = took
    return doc


def table(results: dict[str, Doc]) -> str:
    """Markdown: figure, target, measured, how far, and the command that measures it."""
    lines = ["| figure | target | measured | how far | command |", "|---|---|---|---|---|"]
    for row in ROWS:
        doc = results.get(row.bench)
        if doc is None:
            continue
        cmd = f"`python -m bench.{row.bench}`"
        if "error" in doc or "skipped" in doc:
            why = doc.get("error") or doc.get("skipped")
            lines.append(f"| {row.figure} | {row.target} | {why} | - | {cmd} |")
            continue
        lines.append(
            f"| {row.figure} | {row.target} | {row.measured(doc)} | {row.how_far(doc)} | {cmd} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benches, write `bench/results/latest.json`, print the table; 1 if any failed."""
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every bench in its tiny variant")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(ORDER))
    p.add_argument("--models-dir", default=None, help="passed to the mesh benches")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = p.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else ORDER) if n]
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        p.error(f"unknown benches {unknown}; known: {', '.join(ORDER)}")
    mesh_extra = ["--models-dir", args.models_dir] if args.models_dir else []
    results: dict[str, Doc] = {}
    for name in names:
        if not available(name):
            results[name] = {"skipped": "not in this tree"}
            continue
        meshes = ("generate", "concurrency", "embed", "failover", "converge", "placement", "train")
        extra = mesh_extra if name in meshes else []
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, args.smoke, extra)
    doc = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "benches": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(results))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
