"""Helpers shared by the mesh benchmarks: flags, JSON output, work dirs, a hosted mesh.

Rule 1: a bench prints exactly one JSON object on stdout; logs go to stderr.
Rule 2: every daemon a bench starts is stopped when its `hosted_mesh` block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from nexusd.harness.cluster import LocalCluster, even_spans, local_cluster
from nexusd.logging import configure_logging

CALL_TIMEOUT_S = 120.0
HOSTS_TIMEOUT_S = 60.0


def common_args(p: argparse.ArgumentParser) -> None:
    """Flags every mesh bench takes: models dir, work dir, smoke."""
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="models folder (default: ~/.cache/nexusd/models, built once)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where daemons keep data and logs (default: a temp dir, removed)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a test")


def emit_json(doc: dict[str, object]) -> None:
    """The bench's one line of output."""
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def quiet_logs() -> None:
    """In-process logs (model building) go to stderr, so stdout carries only the JSON."""
    configure_logging("warning", "json", sys.stderr)


@contextlib.contextmanager
def work_dir(given: Path | None) -> Iterator[Path]:
    """`given` (kept) or a temp dir removed on exit (daemon data dirs and logs)."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="nexusd-bench-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def hosted_mesh(
    root: Path,
    layout: Sequence[Sequence[str]],
    *,
    models_dir: Path,
    wait: Sequence[tuple[str, int]],
    names: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[LocalCluster]:
    """A joined cluster of len(layout) daemons, node i hosting `layout[i]` ("MODEL:A-B").

    Args:
        wait: (model, hosts) pairs node 0 must see advertised before the mesh is used.
        env: extra environment of every daemon (e.g. `NEXUSD_EXEC__VERIFY_RATE`).
    """
    with local_cluster(root, len(layout), models_dir=models_dir, names=names, env=env) as cluster:
        for i, specs in enumerate(layout):
            for spec in specs:
                cluster.host(i, spec)
        for model, count in wait:
            cluster.wait_hosts(0, count, model, timeout_s=HOSTS_TIMEOUT_S)
        yield cluster


def even_layout(model: str, n_atoms: int, nodes: int) -> list[list[str]]:
    """One contiguous span of `model` per node, node 0 first."""
    return [[f"{model}:{a}-{b}"] for a, b in even_spans(n_atoms, nodes)]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def rounded(x: float, digits: int = 4) -> float:
    return round(float(x), digits)
