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
`--host-argmax-both`: a second mesh of the same layout runs with `[exec] host_argmax =
false` (the origin gets every stream's logits and takes the argmax itself); each round
runs both meshes in turn, and the JSON's "host_argmax" block compares them (tokens/s on
over off, concurrent and one at a time; every stream's tokens must be the same on both).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from collections.abc import Iterator
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


class _Rounds:
    """One mesh's rounds (one at a time, then together) and what they measured."""

    def __init__(self, cluster: LocalCluster, streams: int) -> None:
        self.sock = cluster.daemon(0).socket
        self.alone_tps: list[float] = []
        self.conc_tps: list[float] = []
        self.identical = True
        self.streams_ok = [True] * streams
        self.failovers = 0
        self.tokens: list[tuple[int, ...]] = []  # each stream's tokens, first round alone
        self.profiles: dict[str, list[dict[str, float]]] = {
            "one_at_a_time": [],
            "concurrent": [],
        }

    def warm_up(self, texts: list[str]) -> None:
        one_at_a_time(self.sock, texts[:2], 2)  # streams, sessions, pools
        together(self.sock, texts[:2], 2)

    def round(self, texts: list[str], tokens: int) -> None:
        alone, alone_s = one_at_a_time(self.sock, texts, tokens)
        conc, conc_s = together(self.sock, texts, tokens)
        self.alone_tps.append(sum(len(r.token_ids) for r in alone) / alone_s)
        self.conc_tps.append(sum(len(r.token_ids) for r in conc) / conc_s)
        self.tokens = self.tokens or [r.token_ids for r in alone]
        for i, (a, c) in enumerate(zip(alone, conc, strict=True)):
            same = a.token_ids == c.token_ids == self.tokens[i]
            self.streams_ok[i] &= same
            self.identical &= same
        self.failovers += sum(len(r.failovers) for r in (*alone, *conc))
        self.profiles["one_at_a_time"].append(per_token_costs(alone))
        self.profiles["concurrent"].append(per_token_costs(conc))


def mesh_rounds(
    clusters: list[LocalCluster], texts: list[str], tokens: int, repeat: int
) -> list[_Rounds]:
    """`repeat` rounds on every cluster, interleaved: round k runs each cluster in turn."""
    meshes = [_Rounds(c, len(texts)) for c in clusters]
    for m in meshes:
        m.warm_up(texts)
    for _ in range(repeat):
        for m in meshes:
            m.round(texts, tokens)
    return meshes


def mesh_figures(m: _Rounds) -> dict[str, object]:
    alone_tps, conc_tps, profiles = m.alone_tps, m.conc_tps, m.profiles
    identical, streams_ok, failovers = m.identical, m.streams_ok, m.failovers
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


def argmax_figures(on: _Rounds, off: _Rounds) -> dict[str, object]:
    """host_argmax on (the main mesh) over off, concurrent and one at a time."""
    conc = [a / b for a, b in zip(on.conc_tps, off.conc_tps, strict=True)]
    alone = [a / b for a, b in zip(on.alone_tps, off.alone_tps, strict=True)]
    return {
        "off_concurrent_tokens_per_s": rounded(median(off.conc_tps), 2),
        "off_one_at_a_time_tokens_per_s": rounded(median(off.alone_tps), 2),
        "concurrent_on_over_off": rounded(median(on.conc_tps) / median(off.conc_tps), 3),
        "concurrent_on_over_off_rounds": [rounded(r, 3) for r in conc],
        "one_at_a_time_on_over_off": rounded(median(on.alone_tps) / median(off.alone_tps), 3),
        "one_at_a_time_on_over_off_rounds": [rounded(r, 3) for r in alone],
        "tokens_identical_on_off": on.tokens == off.tokens and off.identical,
        "off_ms_per_token_per_stream": mesh_figures(off)["ms_per_token_per_stream"],
        "failovers_off": off.failovers,
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
    argmax_both: bool = False,
    cuts: tuple[int, ...] = (),
) -> dict[str, object]:
    torch.set_num_threads(1)  # like the daemons
    registry = ModelRegistry(models_dir)
    info = registry.info(BENCH_MODEL)
    texts = prompts(streams)
    tok = registry.tokenizer(BENCH_MODEL)
    prompt_ids = [tok.encode_prompt(t) for t in texts]
    layout = even_layout(BENCH_MODEL, info.n_atoms, nodes)
    if cuts:
        bounds = (0, *cuts, info.n_atoms)
        if len(cuts) != nodes - 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(
                f"--cuts: expected {nodes - 1} increasing atoms in (0, {info.n_atoms}), got {cuts}"
            )
        layout = [[f"{BENCH_MODEL}:{a}-{b}"] for a, b in itertools.pairwise(bounds)]
    t0 = time.perf_counter()
    env = {} if window_ms is None else {"NEXUSD_EXEC__BATCH_WINDOW_MS": str(window_ms)}
    wait = [(BENCH_MODEL, nodes)]
    with contextlib.ExitStack() as stack:
        clusters = [
            stack.enter_context(
                hosted_mesh(root / "mesh", layout, models_dir=models_dir, wait=wait, env=env)
            )
        ]
        if argmax_both:
            off_env = {**env, "NEXUSD_EXEC__HOST_ARGMAX": "false"}
            clusters.append(
                stack.enter_context(
                    hosted_mesh(
                        root / "no_argmax", layout, models_dir=models_dir, wait=wait, env=off_env
                    )
                )
            )
        setup_s = time.perf_counter() - t0
        meshes = mesh_rounds(clusters, texts, tokens, repeat)
    mesh = mesh_figures(meshes[0])
    if argmax_both:
        mesh["host_argmax"] = argmax_figures(meshes[0], meshes[1])
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


@contextlib.contextmanager
def _usage_error(p: argparse.ArgumentParser) -> Iterator[None]:
    """A ValueError about the flags (e.g. --cuts against the model) exits as usage."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith("--"):
            p.error(str(exc))
        raise


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
    p.add_argument(
        "--host-argmax-both",
        action="store_true",
        help="also run a mesh with [exec] host_argmax = false and compare (rounds interleaved)",
    )
    p.add_argument(
        "--cuts",
        default="",
        help="the layout's cut atoms, e.g. 6,10 (default: even spans by atom count)",
    )
    args = p.parse_args(argv)
    try:
        cuts = tuple(int(c) for c in args.cuts.split(",") if c)
    except ValueError:
        p.error(f"--cuts: comma-separated atom indices, got {args.cuts!r}")
    nodes, streams, tokens, repeat = args.nodes, args.streams, args.tokens, args.repeat
    if args.smoke:
        nodes, streams, tokens, repeat = 2, 3, 3, 1
    if min(nodes, streams, tokens, repeat) < 1:
        p.error("--nodes, --streams, --tokens and --repeat must be >= 1")
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root, _usage_error(p):
        doc = run(
            models_dir,
            root,
            nodes=nodes,
            streams=streams,
            tokens=tokens,
            repeat=repeat,
            window_ms=args.batch_window_ms,
            argmax_both=args.host_argmax_both,
            cuts=cuts,
        )
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
