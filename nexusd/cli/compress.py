"""`nexusd compress`: build a quantised and/or pruned model from one this node has.

It runs locally (no daemon, no mesh), like `import-model`: load the model, prune and
quantise it with `atoms.compress`, measure it against the original on the shipped corpus's
validation text, and add it to the models directory under a new id; its manifest records
the figures (`compress.*` config keys), and `nexusd host NEW` serves it like any model.
"""

from __future__ import annotations

import argparse

from ..config import Config
from ..paths import NodePaths
from .base import CommandSpec
from .models import _models_dir
from .output import emit, table


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model to compress (e.g. minilm, nexus-1.1)")
    p.add_argument(
        "--quant",
        choices=("int8", "int4", "none"),
        default="int8",
        help="weight-only quantisation of Linear layers and tables (default int8)",
    )
    p.add_argument(
        "--group",
        type=int,
        choices=(32, 64, 128),
        default=32,
        help="int4 values per (scale, minimum) pair (default 32)",
    )
    p.add_argument(
        "--prune-heads",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="fraction of attention heads removed per block (default 0)",
    )
    p.add_argument(
        "--prune-ffn",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="fraction of feed-forward neurons removed per block (default 0)",
    )
    p.add_argument(
        "--int4-budget",
        type=float,
        default=0.2,
        metavar="R",
        help="int4: weight bytes allowed as a fraction of the original's; the least "
        "accurate atoms are kept int8 within it (default 0.2)",
    )
    p.add_argument("--id", dest="new_id", help="id of the new model (default MODEL-QUANT[-pruned])")


def _default_id(args: argparse.Namespace) -> str:
    parts = [args.model]
    if args.quant != "none":
        parts.append(args.quant)
    if args.prune_heads or args.prune_ffn:
        parts.append(f"p{round(args.prune_heads * 100)}-{round(args.prune_ffn * 100)}")
    return "-".join(parts)


def _run(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> int:
    from atoms.compress import CompressSettings, compress

    from ..model_files import node_registry

    registry = node_registry(_models_dir(cfg, paths), paths, own=not cfg.atoms.models_dir)
    settings = CompressSettings(
        model_id=args.new_id or _default_id(args),
        quant=None if args.quant == "none" else args.quant,
        group=args.group,
        prune_heads=args.prune_heads,
        prune_ffn=args.prune_ffn,
        int4_budget=args.int4_budget,
    )
    model = registry.load_model(args.model)
    derived, figs = compress(model, settings)
    folder = registry.save(derived)
    from .mesh_models import settle_new_model

    published = settle_new_model(cfg, paths, settings.model_id, folder)
    data = {
        "id": settings.model_id,
        "source": args.model,
        "folder": str(folder),
        "bytes": figs.bytes,
        "ref_bytes": figs.ref_bytes,
        "params": figs.params,
        "ref_params": figs.ref_params,
        "ms": figs.ms,
        "ref_ms": figs.ref_ms,
        "cosine": figs.cosine,
        "cosine_min": figs.cosine_min,
        "perplexity": figs.perplexity,
        "ref_perplexity": figs.ref_perplexity,
        "atoms": [
            {
                "index": a.index,
                "spec": derived.atoms[a.index].spec.uid,
                "bytes": a.bytes,
                "params": a.params,
                "ms": a.ms,
                "cosine": a.cosine,
            }
            for a in figs.atoms
        ],
    }

    def human() -> str:
        rows = [
            [
                str(a.index),
                derived.atoms[a.index].spec.kind.value,
                str(a.bytes),
                str(a.params),
                f"{a.ms:.2f}",
                f"{a.cosine:.5f}",
            ]
            for a in figs.atoms
        ]
        ppl = (
            ""
            if figs.perplexity is None
            else (f", perplexity {figs.perplexity:.3f} (original {figs.ref_perplexity:.3f})")
        )
        return (
            table(["atom", "kind", "bytes", "params", "ms", "cosine"], rows) + "\n"
            f"{settings.model_id}: {figs.bytes / figs.ref_bytes:.3f}x the bytes, "
            f"{figs.ref_ms / figs.ms:.2f}x the speed, output cosine {figs.cosine:.5f}"
            f"{ppl}; saved in {folder}{published}; serve with `nexusd host {settings.model_id}`"
        )

    emit(args, data, human)
    return 0


COMPRESS_COMMANDS = (
    CommandSpec(
        "compress",
        "build a quantised and/or pruned copy of a model, with its measured "
        "size, speed and accuracy",
        _flags,
        _run,
    ),
)
