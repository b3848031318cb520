"""Benchmark: greedy generation over a local mesh of daemons vs one process (docs/architecture.md §9 "generate").

Rule 1: prints exactly one JSON object on stdout (logs go to stderr and the daemons' log
files); the one-process baseline is measured in the same run, interleaved round by round
with the mesh runs, because these shared machines vary 10-40 % from run to run.
Rule 2: every daemon started is stopped whatever happens (`local_cluster`), and every wait
is bounded (cluster calls carry deadlines; rounds and tokens are fixed counts).
Rule 3: figures are medians over `--repeat` rounds after one warm-up round each side;
the mesh's tokens must equal the one-process tokens, and the JSON says whether they did.

Setup: `--nodes` daemons on 127.0.0.1 joined by invite; Nexus 1.1's atoms split evenly
over them, node 0 (the origin) hosting the first span; the baseline is
`atoms.generation.generate` over the same model with one torch thread, like the daemons.
Per-hop overhead per token = (job elapsed - summed hop compute) / tokens / hops.
`--verify-overhead`: a second mesh of the same layout runs alongside with spot-check
verification off (`[exec] verify_rate = 0`, `verify_first_steps = 0`); rounds interleave
one process, the mesh without checks and the mesh with the default checks, and the JSON's
"verify" block gives both tokens/s and the overhead (target: under 10 %).
`--mode relay|forward` runs the mesh in that `[exec] forward_mode` (default: the config's
default); `--mode both` runs a relay mesh and a forward mesh of the same layout, rounds
interleaved, and the JSON's "modes" block compares them (tokens must be identical).
`--host-argmax-both`: a second mesh of the same layout and mode runs with `[exec]
host_argmax = false` (the origin gets the LM head's logits and takes the argmax itself);
rounds interleave, and the JSON's "host_argmax" block compares it with the main mesh
(host_argmax on, the default): tokens/s, their ratio per round, and the bytes the last hop
sent the origin (tokens must be identical).
`--inline-both`: the same with `[exec] inline_step_max_ms = 0` on the second mesh (every
step computed on a worker thread, as before issue #15's inline steps; exec/batching.py Rule
5); the JSON's "inline" block compares the main mesh (inline on, the default) with it.

The cluster helpers here are shared with `bench.failover` and `bench.embed`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

from nexusd.api.records import GenerateReply, GenerateRequest
from nexusd.config import ExecConfig
from nexusd.harness.cluster import LocalCluster
from nexusd.harness.demo import PROMPT, default_models_dir
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

# The untrained Nexus 1.1 blocks: the same compute as the shipped model, and a generation
# that runs its full length (the trained model may stop early at [SEP]); speed, not text.
BENCH_MODEL = "nexus-1.1-random"

TARGET_RATIO = 0.9  # mesh tokens/s over one-process tokens/s (issue #15)
VERIFY_TARGET = 0.10  # tokens/s lost to spot checks at the default rate
NO_VERIFY_ENV = {"NEXUSD_EXEC__VERIFY_RATE": "0", "NEXUSD_EXEC__VERIFY_FIRST_STEPS": "0"}
NO_HOST_ARGMAX_ENV = {"NEXUSD_EXEC__HOST_ARGMAX": "false"}
NO_INLINE_ENV = {"NEXUSD_EXEC__INLINE_STEP_MAX_MS": "0"}
# --host-argmax-both / --inline-both: the JSON block and the second mesh's environment
COMPARED = {"host_argmax": NO_HOST_ARGMAX_ENV, "inline": NO_INLINE_ENV}
MODES = ("default", "relay", "forward", "both")


def mode_env(mode: str) -> dict[str, str]:
    """The daemons' environment for an `[exec] forward_mode` (none for the default)."""
    return {} if mode == "default" else {"NEXUSD_EXEC__FORWARD_MODE": mode}


# ---- generation -------------------------------------------------------------------------------


def local_generation(
    model: object, prompt_ids: list[int], tokens: int
) -> tuple[tuple[int, ...], float]:
    """Greedy tokens and seconds of one in-process generation (prefill + decode steps)."""
    from atoms.generation import GenerationParams, generate

    t0 = time.perf_counter()
    done = generate(model, prompt_ids, GenerationParams(max_new_tokens=tokens))
    return done.token_ids, time.perf_counter() - t0


def mesh_generation(
    cluster: LocalCluster, tokens: int, origin: int = 0
) -> tuple[GenerateReply, float]:
    """One generation job from `origin`; the reply and the client's wall seconds."""
    t0 = time.perf_counter()
    req = GenerateRequest(prompt=PROMPT, model=BENCH_MODEL, max_new_tokens=tokens)
    reply = cluster.call(origin, req, expect=GenerateReply, timeout_s=CALL_TIMEOUT_S)
    wall = time.perf_counter() - t0
    return reply, wall


def hop_costs(reply: GenerateReply) -> dict[str, float]:
    """Per-token, per-hop costs of one job from its route report (seconds)."""
    tokens = max(1, len(reply.token_ids))
    hops = max(1, len(reply.route))
    compute = sum(h.compute_s for h in reply.route)
    queue = sum(h.queue_s for h in reply.route)
    transfer = sum(h.transfer_s for h in reply.route)
    per = tokens * hops
    return {
        "overhead": (reply.elapsed_s - compute) / per,
        "queue": queue / per,
        "transfer": transfer / per,
        "origin": (reply.elapsed_s - compute - queue - transfer) / per,
        "compute_per_token": compute / tokens,
    }


def run(
    models_dir: Path,
    root: Path,
    *,
    nodes: int,
    tokens: int,
    repeat: int,
    verify_overhead: bool = False,
    mode: str = "default",
    compare: str = "",
) -> dict[str, object]:
    """The measurement (see the module docstring); returns the JSON document."""
    torch.set_num_threads(1)  # like the daemons (node.torch_threads = 1)
    registry = ModelRegistry(models_dir)
    info = registry.info(BENCH_MODEL)
    model = registry.load_model(BENCH_MODEL)
    prompt_ids = registry.tokenizer(BENCH_MODEL).encode_prompt(PROMPT)  # as the engine does
    layout = even_layout(BENCH_MODEL, info.n_atoms, nodes)
    wait = [(BENCH_MODEL, nodes)]
    t_setup = time.perf_counter()
    with contextlib.ExitStack() as stack:
        main_env = mode_env("relay" if mode == "both" else mode)
        cluster = stack.enter_context(
            hosted_mesh(root / "mesh", layout, models_dir=models_dir, wait=wait, env=main_env)
        )
        forward = None
        if mode == "both":
            forward = stack.enter_context(
                hosted_mesh(
                    root / "forward",
                    layout,
                    models_dir=models_dir,
                    wait=wait,
                    env=mode_env("forward"),
                )
            )
        unchecked = None
        if verify_overhead:
            unchecked = stack.enter_context(
                hosted_mesh(
                    root / "unchecked", layout, models_dir=models_dir, wait=wait, env=NO_VERIFY_ENV
                )
            )
        compared_mesh = None  # the mesh with the compared feature off
        if compare:
            compared_mesh = stack.enter_context(
                hosted_mesh(
                    root / f"no_{compare}",
                    layout,
                    models_dir=models_dir,
                    wait=wait,
                    env={**main_env, **COMPARED[compare]},
                )
            )
        setup_s = time.perf_counter() - t_setup
        ref, _ = local_generation(model, prompt_ids, tokens)  # warm-up, and the reference
        for c in (cluster, unchecked, forward, compared_mesh):
            if c is not None:
                mesh_generation(c, min(tokens, 4))  # warm-up: streams, sessions, caches
        local_s: list[float] = []
        replies: list[tuple[GenerateReply, float]] = []
        bare: list[GenerateReply] = []
        forwarded: list[GenerateReply] = []
        compared: list[GenerateReply] = []
        identical = True
        for _ in range(repeat):
            ids, secs = local_generation(model, prompt_ids, tokens)
            identical &= ids == ref
            local_s.append(secs)
            if unchecked is not None:
                plain, _ = mesh_generation(unchecked, tokens)
                identical &= plain.token_ids == ref
                bare.append(plain)
            if forward is not None:
                fwd, _ = mesh_generation(forward, tokens)
                identical &= fwd.token_ids == ref
                forwarded.append(fwd)
            if compared_mesh is not None:
                other, _ = mesh_generation(compared_mesh, tokens)
                identical &= other.token_ids == ref
                compared.append(other)
            reply, wall = mesh_generation(cluster, tokens)
            identical &= reply.token_ids == ref
            replies.append((reply, wall))
    doc = summarise(
        replies,
        local_s,
        tokens=tokens,
        nodes=nodes,
        identical=identical,
        setup_s=setup_s,
        prompt_tokens=len(prompt_ids),
        layout=layout,
    )
    doc["forward_mode"] = "relay" if mode == "both" else mode
    if forwarded:
        relay_tps = median([len(r.token_ids) / r.elapsed_s for r, _ in replies])
        fwd_tps = median([len(r.token_ids) / r.elapsed_s for r in forwarded])
        fwd_costs = [hop_costs(r) for r in forwarded]
        doc["modes"] = {
            "relay_tokens_per_s": rounded(relay_tps, 2),
            "forward_tokens_per_s": rounded(fwd_tps, 2),
            "forward_over_relay": rounded(fwd_tps / relay_tps, 3),
            "forward_ratio_to_one_process": rounded(
                fwd_tps / float(str(doc["one_process_tokens_per_s"])), 3
            ),
            "forward_per_hop_overhead_ms_per_token": rounded(
                median([c["overhead"] for c in fwd_costs]) * 1e3, 3
            ),
            "failovers_forward": sum(len(r.failovers) for r in forwarded),
            # bytes the origin sent each hop in the last forward run: 0 past the first remote
            # hop when activations went host to host
            "forward_origin_bytes_out": [h.bytes_out for h in forwarded[-1].route],
            "relay_origin_bytes_out": [h.bytes_out for h in replies[-1][0].route],
        }
    if compared:
        doc[compare] = compare_block([r for r, _ in replies], compared)
    if bare:
        on = median([len(r.token_ids) / r.elapsed_s for r, _ in replies])
        off = median([len(r.token_ids) / r.elapsed_s for r in bare])
        doc["verify"] = {
            "rate": ExecConfig().verify_rate,
            "first_steps": ExecConfig().verify_first_steps,
            "tokens_per_s_checked": rounded(on, 2),
            "tokens_per_s_unchecked": rounded(off, 2),
            "overhead": rounded(1 - on / off, 3),
            "target_overhead": VERIFY_TARGET,
            "failovers_unchecked": sum(len(r.failovers) for r in bare),
        }
    return doc


def compare_block(on: list[GenerateReply], off: list[GenerateReply]) -> dict[str, object]:
    """A feature on (the main mesh) vs off, round by round (`--host-argmax-both`,
    `--inline-both`)."""
    on_tps = [len(r.token_ids) / r.elapsed_s for r in on]
    off_tps = [len(r.token_ids) / r.elapsed_s for r in off]
    return {
        "on_tokens_per_s": rounded(median(on_tps), 2),
        "off_tokens_per_s": rounded(median(off_tps), 2),
        "on_over_off": rounded(median(on_tps) / median(off_tps), 3),
        "on_over_off_rounds": [rounded(a / b, 3) for a, b in zip(on_tps, off_tps, strict=True)],
        "on_per_hop_origin_ms_per_token": rounded(
            median([hop_costs(r)["origin"] for r in on]) * 1e3, 3
        ),
        "off_per_hop_origin_ms_per_token": rounded(
            median([hop_costs(r)["origin"] for r in off]) * 1e3, 3
        ),
        # bytes the LM head's hop sent the origin over the last job (prefill and spot-checked
        # steps are full logits either way)
        "on_last_hop_bytes_in": on[-1].route[-1].bytes_in,
        "off_last_hop_bytes_in": off[-1].route[-1].bytes_in,
        "failovers_off": sum(len(r.failovers) for r in off),
    }


def summarise(
    replies: list[tuple[GenerateReply, float]],
    local_s: list[float],
    *,
    tokens: int,
    nodes: int,
    identical: bool,
    setup_s: float,
    prompt_tokens: int,
    layout: list[list[str]],
) -> dict[str, object]:
    local_tps = median([tokens / s for s in local_s])
    mesh_tps = median([len(r.token_ids) / r.elapsed_s for r, _ in replies])
    client_tps = median([len(r.token_ids) / w for r, w in replies])
    costs = [hop_costs(r) for r, _ in replies]
    last = replies[-1][0]
    return {
        "bench": "generate",
        "model": BENCH_MODEL,
        "nodes": nodes,
        "layout": [s for specs in layout for s in specs],
        "new_tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "repeat": len(replies),
        "tokens_identical": identical,
        "one_process_tokens_per_s": rounded(local_tps, 2),
        "mesh_tokens_per_s": rounded(mesh_tps, 2),
        "mesh_client_tokens_per_s": rounded(client_tps, 2),
        "ratio": rounded(mesh_tps / local_tps, 3),
        "client_ratio": rounded(client_tps / local_tps, 3),
        "target_ratio": TARGET_RATIO,
        "one_process_ms_per_token": rounded(1e3 / local_tps, 3),
        "mesh_ms_per_token": rounded(1e3 / mesh_tps, 3),
        "hops": len(last.route),
        "per_hop_overhead_ms_per_token": rounded(median([c["overhead"] for c in costs]) * 1e3, 3),
        "per_hop_queue_ms_per_token": rounded(median([c["queue"] for c in costs]) * 1e3, 3),
        "per_hop_transfer_ms_per_token": rounded(median([c["transfer"] for c in costs]) * 1e3, 3),
        "per_hop_origin_ms_per_token": rounded(median([c["origin"] for c in costs]) * 1e3, 3),
        "mesh_compute_ms_per_token": rounded(
            median([c["compute_per_token"] for c in costs]) * 1e3, 3
        ),
        "route": [
            {
                "name": h.name,
                "atoms": f"{h.start}-{h.end}",
                "steps": h.steps,
                "compute_ms": rounded(h.compute_s * 1e3, 2),
                "queue_ms": rounded(h.queue_s * 1e3, 2),
                "transfer_ms": rounded(h.transfer_s * 1e3, 2),
            }
            for h in last.route
        ],
        "failovers": sum(len(r.failovers) for r, _ in replies),
        "setup_s": rounded(setup_s, 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": rounded(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeat", type=int, default=3, help="rounds (each: one process + mesh)")
    p.add_argument(
        "--verify-overhead",
        action="store_true",
        help="also run a mesh without spot checks and report the checks' overhead",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="default",
        help="[exec] forward_mode of the mesh; 'both': a relay and a forward mesh, compared",
    )
    p.add_argument(
        "--host-argmax-both",
        action="store_true",
        help="also run a mesh with [exec] host_argmax = false and compare (rounds interleaved)",
    )
    p.add_argument(
        "--inline-both",
        action="store_true",
        help="also run a mesh with [exec] inline_step_max_ms = 0 and compare (rounds interleaved)",
    )
    args = p.parse_args(argv)
    nodes, tokens, repeat = args.nodes, args.tokens, args.repeat
    if args.smoke:
        nodes, tokens, repeat = 2, 4, 1
    if nodes < 1 or tokens < 1 or repeat < 1:
        p.error(f"--nodes, --tokens and --repeat must be >= 1, got {nodes}, {tokens}, {repeat}")
    if args.host_argmax_both and args.inline_both:
        p.error("--host-argmax-both and --inline-both: one comparison at a time")
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root:
        doc = run(
            models_dir,
            root,
            nodes=nodes,
            tokens=tokens,
            repeat=repeat,
            verify_overhead=args.verify_overhead,
            mode=args.mode,
            compare="host_argmax"
            if args.host_argmax_both
            else "inline"
            if args.inline_both
            else "",
        )
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
