"""Benchmark: 8 concurrent generations through a 3-daemon mesh vs the same 8 one at a time,
and a host's KV pool memory against the bytes its sessions really use (issue #15).

Rule 1: prints exactly one JSON object on stdout; the one-at-a-time baseline is measured in
the same run, interleaved round by round with the concurrent runs.
Rule 2: every daemon started is stopped whatever happens (`hosted_mesh`); every call has a
deadline.
Rule 3: each stream's tokens in the concurrent run must equal its own tokens run alone (the
JSON says whether they did); aggregate tokens/s = all streams' new tokens / wall seconds
of the whole set (concurrent) or of the sum of the runs (one at a time).

Setup: `--nodes` daemons on 127.0.0.1, Nexus 1.1 (random blocks: full-length generations)
split evenly, node 0 the origin of every job; `--streams` prompts of mixed lengths.
The memory figure runs in this process on `SpanHost` (the daemons' own host class) with the
whole model as one span: `--streams` sessions of mixed lengths prefill and decode, then the
pool bytes the sessions hold are compared with their tokens x KV bytes per token, and with
what the previous contiguous cache reserved (batch x max_len per session).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import trio

from atoms.codecs import encode
from nexusd.api.client import call
from nexusd.api.records import GenerateReply, GenerateRequest
from nexusd.config import ExecConfig
from nexusd.exec.hosting import SpanHost
from nexusd.exec.wire import OpenSession, Step, header_of
from nexusd.harness.cluster import LocalCluster
from nexusd.harness.demo import default_models_dir
from nexusd.metrics import Metrics
from nexusd.model_registry import ModelRegistry

from .common import (
    CALL_TIMEOUT_S,
    common_args,
    emit_json,
    even_layout,
    hosted_mesh,
    median,
    quiet_logs,
    rounded,
    work_dir,
)
from .generate import BENCH_MODEL

TARGET_RATIO = 3.0  # concurrent aggregate tokens/s over one-at-a-time
TARGET_KV_OVERHEAD = 1.2  # pool bytes held / bytes the cached tokens fill
PAGE_TOKENS = (8, 16)  # pool page sizes the memory figure is measured with
PASSAGE = (
    "It was a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed"
)
WORDS = PASSAGE.split()


def prompts(streams: int) -> list[str]:
    """Prompts of mixed lengths: 2 to 2 + 4 x (streams - 1) words."""
    return [" ".join(WORDS[: 2 + (4 * i) % (len(WORDS) - 2)]) for i in range(streams)]


async def _generate(sock: Path, prompt: str, tokens: int) -> GenerateReply:
    req = GenerateRequest(prompt=prompt, model=BENCH_MODEL, max_new_tokens=tokens)
    return await call(sock, req, expect=GenerateReply, timeout_s=CALL_TIMEOUT_S)


def one_at_a_time(sock: Path, texts: list[str], tokens: int) -> tuple[list[GenerateReply], float]:
    async def main() -> list[GenerateReply]:
        return [await _generate(sock, p, tokens) for p in texts]

    t0 = time.perf_counter()
    replies = trio.run(main)
    return replies, time.perf_counter() - t0


def together(sock: Path, texts: list[str], tokens: int) -> tuple[list[GenerateReply], float]:
    replies: list[GenerateReply | None] = [None] * len(texts)

    async def one(i: int) -> None:
        replies[i] = await _generate(sock, texts[i], tokens)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(len(texts)):
                nursery.start_soon(one, i)

    t0 = time.perf_counter()
    trio.run(main)
    wall = time.perf_counter() - t0
    return [r for r in replies if r is not None], wall


def mesh_rounds(
    cluster: LocalCluster, texts: list[str], tokens: int, repeat: int
) -> dict[str, object]:
    sock = cluster.daemon(0).socket
    one_at_a_time(sock, texts[:2], 2)  # warm-up: streams, sessions, pools
    together(sock, texts[:2], 2)
    alone_tps: list[float] = []
    conc_tps: list[float] = []
    identical = True
    streams_ok: list[bool] = [True] * len(texts)
    failovers = 0
    profiles: dict[str, list[dict[str, float]]] = {"one_at_a_time": [], "concurrent": []}
    for _ in range(repeat):
        alone, alone_s = one_at_a_time(sock, texts, tokens)
        conc, conc_s = together(sock, texts, tokens)
        alone_tps.append(sum(len(r.token_ids) for r in alone) / alone_s)
        conc_tps.append(sum(len(r.token_ids) for r in conc) / conc_s)
        for i, (a, c) in enumerate(zip(alone, conc, strict=True)):
            same = a.token_ids == c.token_ids
            streams_ok[i] &= same
            identical &= same
        failovers += sum(len(r.failovers) for r in (*alone, *conc))
        profiles["one_at_a_time"].append(per_token_costs(alone))
        profiles["concurrent"].append(per_token_costs(conc))
    a_tps, c_tps = median(alone_tps), median(conc_tps)
    return {
        "one_at_a_time_tokens_per_s": rounded(a_tps, 2),
        "concurrent_tokens_per_s": rounded(c_tps, 2),
        "ratio": rounded(c_tps / a_tps, 3),
        "ratios": [rounded(c / a, 3) for a, c in zip(alone_tps, conc_tps, strict=True)],
        "target_ratio": TARGET_RATIO,
        "tokens_identical": identical,
        "streams_identical": streams_ok,
        "failovers": failovers,
        "ms_per_token_per_stream": {
            mode: {k: rounded(median([r[k] for r in rows]), 2) for k in rows[0]}
            for mode, rows in profiles.items()
        },
    }


def per_token_costs(replies: list[GenerateReply]) -> dict[str, float]:
    """Milliseconds per token of one stream, summed over its hops, median over streams:
    the job's elapsed time, the hosts' compute (a batch's time counts for each member),
    the wait for the device (and the batch window), and the transfer (the rest)."""
    rows = []
    for r in replies:
        n = max(1, len(r.token_ids))
        rows.append(
            {
                "elapsed": r.elapsed_s / n * 1e3,
                "compute": sum(h.compute_s for h in r.route) / n * 1e3,
                "queue": sum(h.queue_s for h in r.route) / n * 1e3,
                "transfer": sum(h.transfer_s for h in r.route) / n * 1e3,
            }
        )
    return {k: median([row[k] for row in rows]) for k in rows[0]}


def batch_compute(
    registry: ModelRegistry, layout: list[list[str]], streams: int, length: int
) -> list[dict[str, object]]:
    """Per hosted span, in this process: one decode step of `streams` sessions (cached
    `length` tokens each) as one batch vs one session at a time: the compute-side bound of
    what batching can give on this machine."""
    from atoms.atom import ForwardContext
    from atoms.batched import BatchItem, run_batched
    from atoms.kv_pool import KVPool, PagedCache, PageFormat, pool_shape

    out = []
    for specs in layout:
        _, rng = specs[0].split(":")
        a, b = (int(v) for v in rng.split("-"))
        span = registry.load_span(BENCH_MODEL, a, b)
        fmt = PageFormat.of(span.kv_layouts(), 16)
        page_bytes, stripe = pool_shape([fmt])  # as a host builds it
        pages = 4 * streams * (length // 16 + 2)
        pool = KVPool(page_bytes=page_bytes, pages=pages, stripe=stripe)
        caches = [PagedCache(pool, fmt, batch=1, max_len=length + 64) for _ in range(streams)]
        ids = span.atom_list()[0].spec.in_kind.value == "ids"
        width = span.atom_list()[0].input_width() or 1

        def x_of(n: int, ids: bool = ids, width: int = width) -> torch.Tensor:
            return torch.ones((1, n), dtype=torch.long) if ids else torch.zeros((1, n, width))

        with torch.inference_mode():
            for c in caches:
                span(x_of(length), ForwardContext.for_tokens(1, length, causal=True, cache=c))
            alone, together = [], []
            for k in range(5):
                pos = length + 2 * k
                t0 = time.perf_counter()
                for c in caches:
                    ctx = ForwardContext.for_tokens(1, 1, start=pos, causal=True, cache=c)
                    span(x_of(1), ctx)
                alone.append(time.perf_counter() - t0)
                items = [BatchItem(x_of(1), pos + 1, True, None, c) for c in caches]
                t0 = time.perf_counter()
                run_batched(span, items)
                together.append(time.perf_counter() - t0)
        out.append(
            {
                "span": specs[0],
                "alone_ms": rounded(median(alone) * 1e3, 2),
                "batched_ms": rounded(median(together) * 1e3, 2),
                "speedup": rounded(median(alone) / median(together), 2),
            }
        )
    return out


def kv_memory(
    registry: ModelRegistry, prompt_ids: list[list[int]], tokens: int, page_tokens: int
) -> dict[str, object]:
    """Pool bytes held vs bytes used, `len(prompt_ids)` sessions on one in-process host."""
    span = registry.load_span(BENCH_MODEL, 0, registry.info(BENCH_MODEL).n_atoms)
    host = SpanHost(
        [span],
        kv_budget_bytes=512 << 20,
        max_sessions=64,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
        kv_page_tokens=page_tokens,
    )
    max_len = max(len(p) for p in prompt_ids) + tokens

    async def main() -> dict[str, object]:
        peer = b"b" * 32
        for i, ids in enumerate(prompt_ids):
            sid = bytes([i + 1]) * 16
            await host.open(
                peer,
                OpenSession(
                    session_id=sid, model_id=BENCH_MODEL, start=span.start, end=span.end,
                    batch=1, max_len=max_len,
                ),
            )  # fmt: skip
            x = torch.tensor([ids])
            for step_id in range(1 + tokens * i // len(prompt_ids)):  # mixed lengths
                enc = encode(x)
                pos = 0 if step_id == 0 else len(ids) + step_id - 1
                msg = Step(
                    session_id=sid, step_id=step_id, position=pos, causal=True,
                    tensor=header_of(enc), pad_mask=b"",
                )  # fmt: skip
                await host.step(peer, msg, enc.data)
                x = torch.tensor([[7]])
        sessions = list(host._sessions.values())
        used = sum(s.cache.used_bytes for s in sessions if s.cache is not None)
        held = host.kv_bytes_used
        per_token = host.kv_bytes_per_token()
        return {
            "sessions": len(sessions),
            "lengths": [s.cache.length for s in sessions if s.cache is not None],
            "page_tokens": host._page_tokens,
            "kv_bytes_per_token": per_token,
            "bytes_used": used,
            "bytes_held": held,
            "held_over_used": rounded(held / used, 3),
            "target_held_over_used": TARGET_KV_OVERHEAD,
            "contiguous_bytes_reserved": len(sessions) * max_len * per_token,
            "contiguous_over_used": rounded(len(sessions) * max_len * per_token / used, 3),
            "pool_pages_used": host.kv_pages()[0],
            "pool_pages_total": host.kv_pages()[1],
        }

    return trio.run(main)


def run(
    models_dir: Path,
    root: Path,
    *,
    nodes: int,
    streams: int,
    tokens: int,
    repeat: int,
    window_ms: float | None = None,
) -> dict[str, object]:
    torch.set_num_threads(1)  # like the daemons
    registry = ModelRegistry(models_dir)
    info = registry.info(BENCH_MODEL)
    texts = prompts(streams)
    tok = registry.tokenizer(BENCH_MODEL)
    prompt_ids = [tok.encode_prompt(t) for t in texts]
    layout = even_layout(BENCH_MODEL, info.n_atoms, nodes)
    t0 = time.perf_counter()
    env = {} if window_ms is None else {"NEXUSD_EXEC__BATCH_WINDOW_MS": str(window_ms)}
    wait = [(BENCH_MODEL, nodes)]
    with hosted_mesh(root / "mesh", layout, models_dir=models_dir, wait=wait, env=env) as cl:
        setup_s = time.perf_counter() - t0
        mesh = mesh_rounds(cl, texts, tokens, repeat)
    return {
        "bench": "concurrency",
        "model": BENCH_MODEL,
        "nodes": nodes,
        "layout": [s for specs in layout for s in specs],
        "streams": streams,
        "new_tokens": tokens,
        "prompt_tokens": [len(p) for p in prompt_ids],
        "repeat": repeat,
        "batch_window_ms": ExecConfig().batch_window_ms if window_ms is None else window_ms,
        **mesh,
        "kv_memory": [kv_memory(registry, prompt_ids, tokens, n) for n in PAGE_TOKENS],
        "batch_compute": batch_compute(registry, layout, streams, 32),
        "setup_s": rounded(setup_s, 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m bench.concurrency", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--streams", type=int, default=8, help="concurrent generations")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--repeat", type=int, default=3, help="rounds (each: one at a time + together)")
    p.add_argument(
        "--batch-window-ms", type=float, default=None, help="the daemons' [exec] batch_window_ms"
    )
    args = p.parse_args(argv)
    nodes, streams, tokens, repeat = args.nodes, args.streams, args.tokens, args.repeat
    if args.smoke:
        nodes, streams, tokens, repeat = 2, 3, 3, 1
    if min(nodes, streams, tokens, repeat) < 1:
        p.error("--nodes, --streams, --tokens and --repeat must be >= 1")
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root:
        doc = run(
            models_dir,
            root,
            nodes=nodes,
            streams=streams,
            tokens=tokens,
            repeat=repeat,
            window_ms=args.batch_window_ms,
        )
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
