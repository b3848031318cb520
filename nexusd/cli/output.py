"""How the CLI prints: JSON with `--json`, else plain aligned text (tables, durations, routes).

Rule: commands print through `emit`, so every command that prints data honours `--json`
the same way (dataclasses, bytes as hex, paths as strings, sorted keys).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

from ..api.records import HopReport


def emit(args: argparse.Namespace, data: object, human: Callable[[], str]) -> None:
    """Print `data` as JSON with --json, else the human rendering."""
    if getattr(args, "json", False):
        print(json.dumps(_jsonable(data), indent=2, sort_keys=True))
    else:
        print(human())


def _jsonable(data: object) -> object:
    if is_dataclass(data) and not isinstance(data, type):
        return _jsonable(asdict(data))
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    if isinstance(data, bytes):
        return data.hex()
    if isinstance(data, Path):
        return str(data)
    return data


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def route_table(route: tuple[HopReport, ...]) -> str:
    """A job's route, one row per hop, with its per-hop timings and traffic."""
    rows = [
        [
            h.name or h.host[:8],
            h.host[:8],
            f"{h.start}-{h.end - 1}",
            str(h.steps),
            f"{h.compute_s * 1000:.1f}",
            f"{h.queue_s * 1000:.1f}",
            f"{h.transfer_s * 1000:.1f}",
            f"{(h.bytes_out + h.bytes_in) / 1e6:.2f}",
            h.codec or "-",
            f"{h.bytes_saved / 1e6:.2f}",
        ]
        for h in route
    ]
    headers = ["host", "id", "atoms", "steps", "compute ms", "queue ms", "transfer ms", "MB"]
    return table([*headers, "codec", "MB saved"], rows)


def wire_summary(route: tuple[HopReport, ...]) -> str:
    """One line on the lossy wire codecs a job's hops used and the bytes they saved vs raw
    ("" when every hop was raw or local: nothing to say)."""
    lossy = [h for h in route if h.codec not in ("", "raw")]
    if not lossy:
        return ""
    codecs = ", ".join(sorted({h.codec for h in lossy}))
    saved = sum(h.bytes_saved for h in route)
    error = max(h.wire_error for h in lossy)
    return (
        f"wire: {codecs} on {len(lossy)} of {len(route)} hops, {saved / 1e6:.2f} MB saved vs raw,"
        f" max relative error {error:.2g}"
    )


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
