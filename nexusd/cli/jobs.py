"""Job commands: generate, embed, classify, jobs, result, cancel, host."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..api.records import (
    SEED_LIMIT,
    CancelRequest,
    ClassifyReply,
    ClassifyRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    HopReport,
    HostRequest,
    JobsReply,
    JobsRequest,
    OkReply,
    ProgressEvent,
    ResultRequest,
    TokenEvent,
    vectors_of,
)
from ..config import Config
from ..errors import ApiError
from ..paths import NodePaths
from .base import CommandSpec, call_daemon
from .fitting import fit_flags, fit_to_budget
from .output import emit, route_table, table, wire_summary


def _job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--job-id", default="", help="idempotency key: resubmitting returns the stored result"
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="print the route and per-hop timings"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up waiting after S seconds (the job keeps running; see `nexusd result`)",
    )


async def _print_event(event: object) -> None:
    if isinstance(event, TokenEvent):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif isinstance(event, ProgressEvent):
        sys.stderr.write(f"\r{event.message}: {event.done}/{event.total}")
        if event.done == event.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _quiet(_event: object) -> None:
    return None


# ---- generate ------------------------------------------------------------------------------


def seed_value(text: str) -> int:
    """argparse type of --seed: an integer in 0..2**63-1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**63-1, got {text}")
    return value


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="nexus-1.1", help="model id (default: nexus-1.1)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="new tokens at most (default 64; generation also stops at the end-of-sequence token)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument(
        "--seed",
        type=seed_value,
        default=None,
        help="sampling seed, 0..2**63-1 (reproducible output)",
    )
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument(
        "--codec",
        default="raw",
        choices=("raw", "fp16", "bf16", "int8", "auto"),
        help="wire codec for activations (default raw: exact; auto: per hop, the codec "
        "within [exec] slow_link_codec that the link's measured RTT and bandwidth make "
        "fastest on links below slow_link_bytes_per_s, raw when it saves little)",
    )
    _job_flags(p)


def _generate(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    req = GenerateRequest(
        prompt=args.prompt,
        model=args.model,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        job_id=args.job_id,
        codec=args.codec,
    )
    streaming = not args.json
    reply = call_daemon(
        paths,
        req,
        expect=GenerateReply,
        timeout_s=args.timeout,
        on_event=_print_event if streaming else _quiet,
    )
    if args.json:
        emit(args, reply, str)
        return 0
    print()
    if args.verbose:
        print(
            f"\njob {reply.job_id}: {len(reply.token_ids)} tokens in {reply.elapsed_s:.2f}s "
            f"({reply.tokens_per_s:.1f} tok/s), stop: {reply.stop_reason}"
        )
        print(route_table(reply.route))
        if wire := wire_summary(reply.route):
            print(wire)
        for f in reply.failovers:
            print(f"failover: {f}")
    return 0


# ---- embed / classify ----------------------------------------------------------------------


def _texts(args: argparse.Namespace) -> tuple[str, ...]:
    texts = list(args.texts)
    if args.file == "-":
        texts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    elif args.file:
        try:
            lines = Path(args.file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiError("bad_request", f"cannot read texts from {args.file}: {exc}") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise ApiError("bad_request", "no texts: give TEXT arguments or --file FILE (- for stdin)")
    return tuple(texts)


def _embed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    p.add_argument("--file", help="read texts, one per line, from FILE (- for stdin)")
    p.add_argument("--model", default="minilm", help="model id (default: minilm)")
    p.add_argument("--micro-batch", type=int, default=32, help="texts per micro-batch (default 32)")
    p.add_argument(
        "--codec",
        default="raw",
        choices=("raw", "fp16", "bf16", "int8", "auto"),
        help="wire codec for activations (default raw: exact; auto: per hop, the codec "
        "within [exec] slow_link_codec that the link's measured RTT and bandwidth make "
        "fastest on links below slow_link_bytes_per_s, raw when it saves little)",
    )
    _job_flags(p)


def _embed(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    texts = _texts(args)
    req = EmbedRequest(
        texts=texts,
        model=args.model,
        micro_batch=args.micro_batch,
        job_id=args.job_id,
        codec=args.codec,
    )
    reply = call_daemon(
        paths, req, expect=EmbedReply, timeout_s=args.timeout, on_event=_print_event
    )
    vecs = vectors_of(reply)
    if args.json:
        data = {
            "job_id": reply.job_id,
            "model": reply.model,
            "dims": reply.dims,
            "vectors": vecs,
            "elapsed_s": reply.elapsed_s,
            "texts_per_s": reply.texts_per_s,
            "route": [_hop(h) for h in reply.route],
            "failovers": list(reply.failovers),
        }
        print(json.dumps(data))
        return 0
    for text, v in zip(texts, vecs, strict=True):
        head = ", ".join(f"{x:+.3f}" for x in v[:4])
        print(f"[{head}, …] ({reply.dims} dims)  {text[:60]}")
    print(f"{reply.count} texts in {reply.elapsed_s:.2f}s ({reply.texts_per_s:.1f}/s)")
    if wire := wire_summary(reply.route):
        print(wire)
    if args.verbose:
        print(route_table(reply.route))
    return 0


def _hop(h: HopReport) -> dict[str, object]:
    return dataclasses.asdict(h)


def _classify_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument(
        "--labels",
        default="",
        help="comma-separated labels, e.g. sports,politics "
        "(a model from `train classify` knows its own)",
    )
    p.add_argument("--file", help="read texts, one per line, from FILE (- for stdin)")
    p.add_argument("--model", default="minilm", help="model id (default: minilm)")
    p.add_argument(
        "--template",
        default="This text is about {}.",
        help="how a label becomes a sentence ({} = the label)",
    )
    _job_flags(p)


def _classify(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    texts = _texts(args)
    labels = tuple(lab.strip() for lab in args.labels.split(",") if lab.strip())
    req = ClassifyRequest(
        texts=texts,
        labels=labels,
        model=args.model,
        template=args.template,
        job_id=args.job_id,
    )
    reply = call_daemon(paths, req, expect=ClassifyReply, timeout_s=args.timeout, on_event=_quiet)
    if args.json:
        emit(args, reply, str)
        return 0
    for text, label, scores in zip(texts, reply.predicted, reply.scores, strict=True):
        print(f"{label:<14} {max(scores):.2f}  {text[:70]}")
    if args.verbose:
        print(route_table(reply.route))
    return 0


# ---- jobs / result / cancel / host ---------------------------------------------------------


def _jobs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="newest N jobs (default 20)")


def _jobs(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(paths, JobsRequest(args.limit), expect=JobsReply)
    rows = [[j.job_id, j.kind, j.state, str(j.attempts), j.error[:50]] for j in reply.jobs]
    emit(args, reply, lambda: table(["job", "kind", "state", "attempts", "error"], rows))
    return 0


def _job_id_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the job id")


def _result(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(paths, ResultRequest(args.job_id), expect=object, timeout_s=None)
    emit(args, reply, lambda: getattr(reply, "text", "") or str(reply))
    return 0


def _cancel(args: argparse.Namespace, _cfg: Config, paths: NodePaths) -> int:
    reply = call_daemon(paths, CancelRequest(args.job_id), expect=OkReply)
    emit(args, {"cancelled": args.job_id}, lambda: reply.message)
    return 0


def _host_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model id, e.g. nexus-1.1 or minilm")
    p.add_argument("--atoms", metavar="A-B", help="host atoms A..B-1 only (default: all)")
    p.add_argument(
        "--auto",
        action="store_true",
        help="let the node pick the span where the swarm needs it, and move it when the "
        "swarm changes (config: atoms.placement_interval_s, atoms.rebalance_threshold)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="",
        help="precision of these atoms (default: config atoms.dtype)",
    )
    fit_flags(p)


def _host(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    fitted = fit_to_budget(args, cfg, paths)  # --max-memory: the level that fits, or nothing
    if args.auto and args.atoms:
        raise ApiError("bad_request", "--auto picks the atoms itself: give --atoms or --auto")
    spec = f"{args.model}:{args.atoms}" if args.atoms else args.model
    spec = f"{args.model}:auto" if args.auto else spec
    from .mesh_models import FetchBar

    with FetchBar(args) as bar:  # weights this node lacks are fetched from peers first
        reply = call_daemon(
            paths,
            HostRequest(spec, args.dtype),
            expect=OkReply,
            timeout_s=3600,
            on_event=bar.on_event,
        )
    emit(args, {"hosting": spec, **fitted.data}, lambda: fitted.text + reply.message)
    return 0


JOB_COMMANDS = (
    CommandSpec(
        "generate",
        "generate text across the mesh (tokens stream as produced)",
        _generate_flags,
        _generate,
    ),
    CommandSpec(
        "embed", "sentence embeddings across the mesh (micro-batched)", _embed_flags, _embed
    ),
    CommandSpec(
        "classify",
        "classify texts: zero-shot among --labels, or with a head trained "
        "by `nexusd train classify` (--model ID)",
        _classify_flags,
        _classify,
    ),
    CommandSpec("jobs", "list recent jobs and their states", _jobs_flags, _jobs),
    CommandSpec(
        "result", "print the stored result of a job (waits if it is running)", _job_id_flag, _result
    ),
    CommandSpec("cancel", "cancel a running job", _job_id_flag, _cancel),
    CommandSpec("host", "load and serve a model's atoms on this node", _host_flags, _host),
)
