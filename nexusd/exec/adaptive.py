"""The wire codec of each hop of a job whose codec is "auto", from the link's measurement.

Rule 1: activations travel between the origin and each host (routes relay via the origin),
so a hop's codec follows the measured link between the origin and that host: its RTT and
its bandwidth (the lower of the two directions).
Rule 2: the rule estimates one step's time on that link for each codec the job's error
budget allows (`CodecPolicy.budget`: the lossiest codec it accepts) as
    rtt + 2 * wire bytes / bandwidth + 2 * (encode + decode CPU time)
(the activations go out and the answer comes back in the same codec) and takes the
cheapest lossy codec only when it saves at least `min_saving` of the raw step's time: a
lossy codec costs accuracy, so it must buy a real speed-up. When the RTT dominates (tiny
payloads, long paths) or the link is fast, compression saves nothing worth its error and
the hop stays `raw`.
Rule 3: links measured at or above `slow_bytes_per_s` stay `raw` whatever the estimate:
the codec's CPU time is taken from the cores the spans compute on, which a per-step
estimate does not see. A link never measured is not assumed slow: `raw`.
Rule 4: at the same size bf16 is taken before fp16 (it keeps float32's range; fp16
overflows past 65504): fp16 is chosen only when the budget is fp16 itself.
Rule 5: "auto" is opt-in per job (`--codec auto`); `raw` stays the default for jobs that
must equal one process. Local hops never encode at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from atoms.codecs import CODECS
from mesh.routing import Link

from ..config import ExecConfig

AUTO = "auto"
JOB_CODECS = (*sorted(CODECS), AUTO)

# max |x - decoded| / max |x| a codec may put into a tensor (half a unit in the last
# place: fp16 10 stored mantissa bits, bf16 7; int8: half a step of a block's peak / 127)
ERROR_BOUND: dict[str, float] = {"raw": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 1 / 254}


@dataclass(frozen=True, slots=True)
class CodecCost:
    """CPU seconds one encode plus one decode takes: `per_byte` of raw float32 payload
    and `per_message` fixed (the calls themselves)."""

    per_byte: float
    per_message: float

    def __post_init__(self) -> None:
        for name in ("per_byte", "per_message"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"codec cost {name}: expected finite >= 0, got {value}")


# Measured with `python -m bench.wire_codecs` ("cpu" section: a 1.5 MB float32 micro-batch
# and a 1.5 KB token, encode + decode, median of 30, one core of this 2-core x86 machine;
# repeats on the shared machine varied up to 2x, int8 stays the dearest per byte).
CPU_COSTS: dict[str, CodecCost] = {
    "raw": CodecCost(per_byte=0.6e-9, per_message=18e-6),
    "fp16": CodecCost(per_byte=0.6e-9, per_message=24e-6),
    "bf16": CodecCost(per_byte=1.0e-9, per_message=26e-6),
    "int8": CodecCost(per_byte=2.6e-9, per_message=84e-6),
}


@dataclass(frozen=True, slots=True)
class CodecPolicy:
    """Args:
    slow_bytes_per_s: links measured at or above this stay raw (Rule 3; both
        directions are looked at).
    slow_codec: the job's error budget: the lossiest codec a hop may get (bf16/fp16
        ~1e-3 relative error, int8 ~1e-2, see `atoms.codecs.measure`); "raw": none.
    min_saving: the share of the raw step's estimated time a lossy codec must save.
    costs: each codec's CPU cost (`CPU_COSTS`).
    """

    slow_bytes_per_s: float = 6.25e6  # 50 Mbit/s
    slow_codec: str = "int8"
    min_saving: float = 0.1
    costs: Mapping[str, CodecCost] = field(default_factory=lambda: dict(CPU_COSTS), compare=False)

    def __post_init__(self) -> None:
        if not self.slow_bytes_per_s >= 0:  # NaN too; inf: no link is too fast (Rule 3)
            raise ValueError(f"slow_bytes_per_s must be >= 0, got {self.slow_bytes_per_s}")
        if self.slow_codec not in CODECS:
            raise ValueError(f"slow_codec must be one of {sorted(CODECS)}, got {self.slow_codec!r}")
        if not 0.0 <= self.min_saving < 1.0:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")
        missing = set(CODECS) - set(self.costs)
        if missing:
            raise ValueError(f"costs: no CPU cost for codec(s) {sorted(missing)}")

    @property
    def budget(self) -> str:
        """The lossiest codec the job accepts."""
        return self.slow_codec

    def candidates(self) -> list[str]:
        """The lossy codecs within the budget (Rule 4: fp16 only when it is the budget)."""
        bound = ERROR_BOUND[self.budget]
        allowed = [c for c in ("bf16", "fp16", "int8") if ERROR_BOUND[c] <= bound]
        return [c for c in allowed if c != "fp16" or self.budget == "fp16"]


def link_bandwidth(links: Sequence[Link], a: bytes, b: bytes) -> float | None:
    """The lower measured bandwidth of a <-> b (bytes/s), or None when never measured."""
    seen = [
        link.bandwidth_bytes_per_s for link in links if (link.src, link.dst) in ((a, b), (b, a))
    ]
    return min(seen) if seen else None


def link_rtt(links: Sequence[Link], a: bytes, b: bytes) -> float:
    """The higher measured round trip of a <-> b (seconds); 0 when never measured."""
    return max(
        (link.rtt_s for link in links if (link.src, link.dst) in ((a, b), (b, a))), default=0
    )


def step_seconds(
    codec: str, payload_bytes: int, rtt_s: float, bandwidth: float, policy: CodecPolicy
) -> float:
    """Rule 2's estimate of one step on the link: `payload_bytes` of raw float32
    activations out, as many back, both in `codec`."""
    ratio = 1.0 if codec == "raw" else CODECS[codec][0] / 4.0
    cpu = policy.costs[codec]
    one_way = ratio * payload_bytes / bandwidth + cpu.per_byte * payload_bytes + cpu.per_message
    return rtt_s + 2.0 * one_way


def choose(payload_bytes: int, rtt_s: float, bandwidth: float, policy: CodecPolicy) -> str:
    """The codec of one hop by Rule 2 and 3 (`bandwidth` measured, bytes/s)."""
    if bandwidth >= policy.slow_bytes_per_s or payload_bytes <= 0:
        return "raw"
    raw = step_seconds("raw", payload_bytes, rtt_s, bandwidth, policy)
    best, best_s = "raw", raw
    for codec in policy.candidates():
        s = step_seconds(codec, payload_bytes, rtt_s, bandwidth, policy)
        if s < best_s:
            best, best_s = codec, s
    return best if best_s <= (1.0 - policy.min_saving) * raw else "raw"


def hop_codec(
    job_codec: str,
    links: Sequence[Link],
    origin: bytes,
    host: bytes,
    policy: CodecPolicy,
    payload_bytes: int,
) -> str:
    """The codec of the hop to `host` for steps of `payload_bytes` raw bytes each way
    (see the module rules); a fixed job codec is kept."""
    if job_codec != AUTO:
        return job_codec
    bandwidth = link_bandwidth(links, origin, host)
    if bandwidth is None:
        return "raw"
    return choose(payload_bytes, link_rtt(links, origin, host), bandwidth, policy)


def tolerance_codec(job_codec: str, policy: CodecPolicy) -> str:
    """The codec spot-checks of an "auto" job allow for: the lossiest a hop may use."""
    return policy.slow_codec if job_codec == AUTO else job_codec


def codec_policy_of(cfg: ExecConfig) -> CodecPolicy:
    """The [exec] section's policy (slow_link_bytes_per_s, slow_link_codec)."""
    return CodecPolicy(cfg.slow_link_bytes_per_s, cfg.slow_link_codec)
