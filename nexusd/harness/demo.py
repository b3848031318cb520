"""`nexusd demo`: a real local mesh on 127.0.0.1, the default models, real jobs.

Starts N daemons (separate processes, own data dirs), founds a mesh on the first, joins the
others by invite, places the atoms of Nexus 1.1 and MiniLM across them, runs a generation,
an embedding and a classification job from the first node, prints routes and per-hop
timings, checks every answer against the same model run in this one process, optionally
kills a host mid-generation to show the job finishing identically, and stops everything.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atoms.model import Model

from ..api.records import (
    ClassifyReply,
    ClassifyRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    RouteEvent,
    TokenEvent,
    vectors_of,
)
from ..cli.output import route_table
from ..model_registry import DEFAULT_EMBED_MODEL, DEFAULT_GENERATE_MODEL, ModelRegistry
from .cluster import LocalCluster, even_spans, free_port

PROMPT = "It was a truth universally acknowledged, that"
TEMPERATURE, TOP_K, SEED = 0.8, 40, 7  # sampled: readable, and reproducible by the seed
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
)
CLASSIFY = (
    ("The striker scored twice in the second half.", "sports"),
    ("The central bank raised interest rates again.", "finance"),
    ("Simmer the onions until golden, then add garlic.", "cooking"),
    ("Voters elected a new parliament after a long campaign.", "politics"),
)


@dataclass(slots=True, kw_only=True)
class DemoOptions:
    nodes: int = 3
    failover: bool = False
    max_tokens: int = 40
    keep: bool = False
    workdir: Path | None = None
    models_dir: Path | None = None


@dataclass(slots=True)
class Outcome:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))
        say(f"  {'✓' if ok else '✗'} {name}: {detail}")


def say(text: str = "") -> None:
    print(text, flush=True)


def default_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexusd" / "models"


def run_demo(opts: DemoOptions) -> int:
    """The demo; returns 0 when every check passed."""
    if opts.nodes < 2:
        say("nexusd demo: --nodes must be at least 2")
        return 2
    models_dir = opts.models_dir or default_models_dir()
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="nexusd-demo-"))
    outcome = Outcome()
    say(f"NEXUS demo: {opts.nodes} daemons on 127.0.0.1, work dir {workdir}")
    say(f"\n[1/6] models (built once, cached in {models_dir})")
    t0 = time.perf_counter()
    registry = ModelRegistry(models_dir)
    gen_info = registry.info(DEFAULT_GENERATE_MODEL)
    emb_info = registry.info(DEFAULT_EMBED_MODEL)
    say(
        f"  {gen_info.model_id}: {gen_info.n_atoms} atoms, digest {gen_info.digest[:12]}; "
        f"{emb_info.model_id}: {emb_info.n_atoms} atoms, digest {emb_info.digest[:12]} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    names = ["origin"] + [f"host{i}" for i in range(1, opts.nodes)]
    http_port = free_port()
    cluster = LocalCluster(
        workdir,
        opts.nodes,
        models_dir=models_dir,
        names=names,
        node_args=[["--http-port", str(http_port)]] + [[] for _ in range(1, opts.nodes)],
    )
    try:
        say(f"\n[2/6] starting {opts.nodes} daemons and joining them by invite")
        t0 = time.perf_counter()
        cluster.init()
        cluster.start_all()
        cluster.join_all()
        say(
            f"  mesh founded by {names[0]}; {', '.join(names[1:])} joined "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        layout = place_atoms(cluster, gen_info.n_atoms, emb_info.n_atoms, opts)
        for i, specs in layout.items():
            say(f"  {names[i]:<8} hosts {', '.join(specs)}")
        cluster.wait_hosts(0, opts.nodes, DEFAULT_GENERATE_MODEL if opts.failover else "")
        cluster.wait_hosts(0, opts.nodes - 1, DEFAULT_EMBED_MODEL)
        reference = registry.load_model(DEFAULT_GENERATE_MODEL)
        tok = registry.tokenizer(DEFAULT_GENERATE_MODEL)
        ref_tokens = reference_generation(
            reference,
            tok.encode_prompt(PROMPT),
            opts.max_tokens,
            registry.eos_token_ids(DEFAULT_GENERATE_MODEL),
        )
        demo_generate(cluster, ref_tokens, opts.max_tokens, outcome)
        demo_embed(cluster, registry, outcome)
        demo_classify(cluster, outcome)
        if opts.failover:
            demo_failover(cluster, ref_tokens, opts.max_tokens, outcome)
        url = f"http://127.0.0.1:{http_port}/"
        say(f"\n  dashboard: {url}   OpenAI-compatible API: {url}v1")
        if opts.keep:
            say("  the mesh stays up (--keep): open the dashboard; Ctrl-C stops it")
            _wait_for_interrupt(cluster)
    finally:
        say("\n[6/6] stopping the daemons (SIGTERM, graceful)")
        codes = cluster.stop_all()
        say(
            "  " + ", ".join(f"{n}: exit {c}" for n, c in codes.items())
            if codes
            else "  none running"
        )
        if not opts.keep and opts.workdir is None:
            _rmtree(workdir)
        else:
            say(f"  data dirs and logs kept in {workdir}")
    failed = [c for c in outcome.checks if not c[1]]
    say(f"\n{len(outcome.checks) - len(failed)} of {len(outcome.checks)} checks passed")
    return 1 if failed else 0


def place_atoms(
    cluster: LocalCluster, gen_atoms: int, emb_atoms: int, opts: DemoOptions
) -> dict[int, list[str]]:
    """Nexus 1.1 across every node (with --failover, a replicated tail); MiniLM on the hosts."""
    n = cluster.size
    layout: dict[int, list[str]] = {i: [] for i in range(n)}
    if opts.failover:
        cut = even_spans(gen_atoms, n)[0][1]
        layout[0].append(f"{DEFAULT_GENERATE_MODEL}:0-{cut}")
        for i in range(1, n):  # every host can serve the tail: one can die
            layout[i].append(f"{DEFAULT_GENERATE_MODEL}:{cut}-{gen_atoms}")
    else:
        for i, (a, b) in enumerate(even_spans(gen_atoms, n)):
            layout[i].append(f"{DEFAULT_GENERATE_MODEL}:{a}-{b}")
    for i, (a, b) in enumerate(even_spans(emb_atoms, n - 1), start=1):
        layout[i].append(f"{DEFAULT_EMBED_MODEL}:{a}-{b}")
    for i, specs in layout.items():
        for spec in specs:
            cluster.host(i, spec)
    return layout


def reference_generation(
    model: Model, prompt_ids: list[int], max_tokens: int, eos: tuple[int, ...]
) -> tuple[int, ...]:
    """The demo's generation in this process: the mesh's must equal it token for token."""
    from atoms.generation import GenerationParams, generate

    params = GenerationParams(
        max_new_tokens=max_tokens,
        stop_token_ids=eos,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        seed=SEED,
    )
    return generate(model, prompt_ids, params).token_ids


def demo_generate(
    cluster: LocalCluster, ref: tuple[int, ...], max_tokens: int, outcome: Outcome
) -> None:
    say(
        f"\n[3/6] generate ({DEFAULT_GENERATE_MODEL}, trained by the mesh; sampled at "
        f"temperature {TEMPERATURE}, seed {SEED}) from origin"
    )
    sys.stdout.write("  > " + PROMPT)

    def show(event: object) -> None:
        if isinstance(event, TokenEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()

    req = GenerateRequest(
        prompt=PROMPT,
        model=DEFAULT_GENERATE_MODEL,
        max_new_tokens=max_tokens,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        seed=SEED,
    )
    reply = cluster.call(0, req, expect=GenerateReply, on_event=show)
    say(
        f"\n  {len(reply.token_ids)} tokens in {reply.elapsed_s:.2f}s ({reply.tokens_per_s:.1f} tok/s)"
    )
    say(_indent(route_table(reply.route)))
    outcome.check(
        "generation equals single-process",
        reply.token_ids == ref,
        f"{len(ref)} sampled tokens compared",
    )


def demo_embed(cluster: LocalCluster, registry: ModelRegistry, outcome: Outcome) -> None:
    from atoms.embed import embed_texts

    say(
        f"\n[4/6] embed {len(SENTENCES)} sentences ({DEFAULT_EMBED_MODEL}, micro-batched) and classify"
    )
    req = EmbedRequest(texts=SENTENCES, model=DEFAULT_EMBED_MODEL, micro_batch=2)
    reply = cluster.call(0, req, expect=EmbedReply)
    got = torch.tensor(vectors_of(reply))
    ref = embed_texts(registry.load_model(DEFAULT_EMBED_MODEL), list(SENTENCES))
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    sims = got @ got.T
    best = max(
        (float(sims[i, j]), i, j)
        for i in range(len(SENTENCES))
        for j in range(i + 1, len(SENTENCES))
    )
    say(
        f"  {reply.count} x {reply.dims} in {reply.elapsed_s:.2f}s; most similar pair "
        f"({best[0]:.2f}): {SENTENCES[best[1]]!r} ~ {SENTENCES[best[2]]!r}"
    )
    say(_indent(route_table(reply.route)))
    outcome.check(
        "embeddings equal single-process",
        float(cos.min()) >= 0.9999,
        f"min cosine {float(cos.min()):.6f}",
    )


def demo_classify(cluster: LocalCluster, outcome: Outcome) -> None:
    texts = tuple(t for t, _ in CLASSIFY)
    labels = tuple(sorted({lab for _, lab in CLASSIFY}))
    say(f"\n[5/6] classify (zero-shot over the mesh) among {', '.join(labels)}")
    req = ClassifyRequest(texts=texts, labels=labels, model=DEFAULT_EMBED_MODEL)
    reply = cluster.call(0, req, expect=ClassifyReply)
    right = 0
    for (text, want), got, scores in zip(CLASSIFY, reply.predicted, reply.scores, strict=True):
        right += got == want
        say(f"  {got:<9} {max(scores):.2f}  {text}")
    outcome.check("classification", right == len(CLASSIFY), f"{right}/{len(CLASSIFY)} correct")


def demo_failover(
    cluster: LocalCluster, ref: tuple[int, ...], max_tokens: int, outcome: Outcome
) -> None:
    say("\n[5b/6] failover: kill the host serving the tail mid-generation")
    state = _FailoverWatch()

    def watch(event: object) -> None:
        if isinstance(event, RouteEvent):
            state.route = event
            hops = " -> ".join(f"{h.name}[{h.start}-{h.end - 1}]" for h in event.hops)
            say(f"\n  route ({textwrap.shorten(event.reason, 110)}): {hops}")
        elif isinstance(event, TokenEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            state.tokens += 1
            if state.tokens == max(2, len(ref) // 3) and not state.victim and state.route:
                victim_hex = state.route.hops[-1].host
                idx = next(
                    i
                    for i, d in enumerate(cluster.daemons)
                    if d is not None and _node_hex(cluster, i) == victim_hex
                )
                state.victim = cluster.names[idx]
                say(f"\n  ** killing {state.victim} (SIGKILL) after {state.tokens} tokens **")
                cluster.daemon(idx).kill()

    t0 = time.perf_counter()
    req = GenerateRequest(
        prompt=PROMPT,
        model=DEFAULT_GENERATE_MODEL,
        max_new_tokens=max_tokens,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        seed=SEED,
    )
    reply = cluster.call(0, req, expect=GenerateReply, on_event=watch)
    say(f"\n  finished in {time.perf_counter() - t0:.2f}s; failovers: {len(reply.failovers)}")
    say(_indent(route_table(reply.route)))
    outcome.check(
        "failover output identical",
        reply.token_ids == ref and bool(reply.failovers),
        f"killed {state.victim}, {len(reply.failovers)} failover(s), tokens equal: "
        f"{reply.token_ids == ref}",
    )


@dataclass(slots=True)
class _FailoverWatch:
    tokens: int = 0
    victim: str = ""
    route: RouteEvent | None = None


def _node_hex(cluster: LocalCluster, i: int) -> str:
    from mesh.identity import NodeKey

    return NodeKey.load(cluster.data_dir(i) / "node.key").node_id.hex()


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _wait_for_interrupt(cluster: LocalCluster) -> None:
    """Block until Ctrl-C or SIGTERM (or until the origin daemon exits on its own)."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # A shell starts background jobs with SIGINT ignored: take both signals explicitly.
    old_int = signal.signal(signal.SIGINT, interrupt)
    old_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.daemon(0).proc.wait()
        say("  the origin daemon exited")
    except KeyboardInterrupt:
        say("\n  interrupted")
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
