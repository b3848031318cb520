"""`nexusd host MODEL --max-memory BYTES`: host the most accurate level that fits.

The choice is made here, before the daemon is asked to host anything (`nexusd.fit`): the
CLI reads the node's models folder, measures or builds a level only when every more
accurate one was passed over, and then hosts the chosen model id and dtype as a plain
`nexusd host` would. What was chosen, its measured accuracy cost and why the more accurate
levels were passed over are printed with the result.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..paths import NodePaths


@dataclass(slots=True)
class Fitted:
    """What `fit_to_budget` decided (empty when no budget applies)."""

    data: dict[str, object] = field(default_factory=dict)
    text: str = ""


def _bytes(text: str) -> int:
    """'150000000', '150M', '1.5G' (powers of 1024: K, M, G)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a byte count such as 150M, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a byte count >= 0, got {text!r}")
    return int(value)


def fit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        type=_bytes,
        dest="atoms.host_max_memory_bytes",
        metavar="BYTES",
        help="weight memory this model may take (150M, 1.5G): host the most accurate of "
        "fp32, bf16, int8, int4 that fits, building int8/int4 with `compress` if needed "
        "(config: atoms.host_max_memory_bytes; 0: no budget)",
    )
    p.add_argument(
        "--accuracy-floor",
        type=float,
        dest="atoms.host_accuracy_floor",
        metavar="X",
        help="with --max-memory: lowest output cosine against fp32 a level may have "
        "(config: atoms.host_accuracy_floor)",
    )


def fit_to_budget(args: argparse.Namespace, cfg: Config, paths: NodePaths) -> Fitted:
    """With a budget: set `args.model`/`args.dtype` to the chosen level (see the module).

    Raises:
        ApiError(bad_request): no level fits, or --max-memory with --dtype or --auto.
    """
    budget = cfg.atoms.host_max_memory_bytes
    if not budget:
        return Fitted()
    from ..errors import ApiError
    from ..fit import choose, levels
    from ..model_files import node_registry

    if args.dtype or getattr(args, "auto", False):
        raise ApiError("bad_request", "--max-memory picks the precision: drop --dtype/--auto")
    folder = Path(cfg.atoms.models_dir) if cfg.atoms.models_dir else paths.models_dir
    registry = node_registry(folder, paths, own=not cfg.atoms.models_dir)  # opens sealed files

    def building(mid: str) -> None:
        print(f"building {mid} (nexusd compress) to measure it …", file=sys.stderr)

    source = args.model
    choice = choose(
        levels(registry, source, budget=budget, on_build=building),
        budget,
        cfg.atoms.host_accuracy_floor,
    )
    level = choice.chosen
    args.model, args.dtype = level.model_id, level.dtype
    data: dict[str, object] = {
        "source": source,
        "level": level.name,
        "model": level.model_id,
        "dtype": level.dtype,
        "bytes": level.bytes,
        "budget": budget,
        "cosine": level.cosine,
        "perplexity": level.perplexity,
        "ref_perplexity": level.ref_perplexity,
        "passed_over": list(choice.passed),
    }
    why = "".join(f"\n  passed over {p}" for p in choice.passed)
    text = (
        f"level {level.name} of {source} ({level.model_id}, {level.bytes:,} bytes of "
        f"weights, budget {budget:,}); accuracy cost: {level.cost()}{why}\n"
    )
    return Fitted(data, text)
