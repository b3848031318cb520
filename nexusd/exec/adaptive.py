"""The wire codec of each hop of a job whose codec is "auto", from the link's measurement.

Rule 1: activations travel between the origin and each host (routes relay via the origin),
so a hop's codec follows the measured link between the origin and that host: below
`slow_bytes_per_s` (either direction) the hop uses the job's lossy `slow_codec`, otherwise
the exact `raw`. A link never measured is not assumed slow: `raw`.
Rule 2: "auto" is opt-in per job (`--codec auto`); `raw` stays the default for jobs that
must equal one process. Local hops never encode at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from atoms.codecs import CODECS
from mesh.routing import Link

from ..config import ExecConfig

AUTO = "auto"
JOB_CODECS = (*sorted(CODECS), AUTO)


@dataclass(frozen=True, slots=True)
class CodecPolicy:
    """Args:
    slow_bytes_per_s: links measured below this are slow (both directions are looked at).
    slow_codec: the codec a slow link gets (the job's error budget: bf16/fp16 ~1e-3
        relative error, int8 ~1e-2, see `atoms.codecs.measure`).
    """

    slow_bytes_per_s: float = 6.25e6  # 50 Mbit/s
    slow_codec: str = "int8"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slow_bytes_per_s) and self.slow_bytes_per_s >= 0):
            raise ValueError(f"slow_bytes_per_s must be >= 0, got {self.slow_bytes_per_s}")
        if self.slow_codec not in CODECS:
            raise ValueError(f"slow_codec must be one of {sorted(CODECS)}, got {self.slow_codec!r}")


def link_bandwidth(links: Sequence[Link], a: bytes, b: bytes) -> float | None:
    """The lower measured bandwidth of a <-> b (bytes/s), or None when never measured."""
    seen = [
        link.bandwidth_bytes_per_s for link in links if (link.src, link.dst) in ((a, b), (b, a))
    ]
    return min(seen) if seen else None


def hop_codec(
    job_codec: str, links: Sequence[Link], origin: bytes, host: bytes, policy: CodecPolicy
) -> str:
    """The codec of the hop to `host` (see the module rules); a fixed job codec is kept."""
    if job_codec != AUTO:
        return job_codec
    bandwidth = link_bandwidth(links, origin, host)
    if bandwidth is not None and bandwidth < policy.slow_bytes_per_s:
        return policy.slow_codec
    return "raw"


def tolerance_codec(job_codec: str, policy: CodecPolicy) -> str:
    """The codec spot-checks of an "auto" job allow for: the lossiest a hop may use."""
    return policy.slow_codec if job_codec == AUTO else job_codec


def codec_policy_of(cfg: ExecConfig) -> CodecPolicy:
    """The [exec] section's policy (slow_link_bytes_per_s, slow_link_codec)."""
    return CodecPolicy(cfg.slow_link_bytes_per_s, cfg.slow_link_codec)
