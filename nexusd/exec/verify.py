"""Spot-check verification: is a host's output the one an honest replica computes?

Rule 1: which steps are checked is decided by `VerifyPolicy.sampled` from the host's step
count in the session and the session's own `random.Random`: a host's first
`first_steps` steps always, every later step with probability `rate`.
Rule 2: two outputs agree when their largest absolute difference, relative to the largest
magnitude of the reference, is within `VerifyPolicy.tolerance` for the dtypes and the wire
codec involved (fp32 tight; bf16 and lossy codecs looser, from their rounding quantum).
Rule 3: a checked step of a session with a KV cache is recomputed on a fresh session as ONE
step: the hop's stored inputs and this step's input concatenated along the tokens
(`session.RoutedSession._check_inputs`); a causal model gives the same last tokens as the incremental steps, up
to rounding, and the check costs one prefill instead of one step per stored input.
The session (`session.RoutedSession`) runs the checks; this module holds the policy, the
records a check is made of, and the comparison.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from atoms.codecs import CODECS

from .hops import StepInput

# Extra tolerance a lossy codec adds: both outputs are rounded by it, so up to two quanta
# relative to the tensor's largest value (fp16 2**-11, bf16 2**-8, int8 absmax/127 per
# block of 64), doubled for margin.
CODEC_TOLERANCE: dict[str, float] = {"raw": 0.0, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 3.2e-2}
assert set(CODEC_TOLERANCE) == set(CODECS), "every codec needs a verification tolerance"
_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyPolicy:
    """What the origin checks, and how close two outputs must be ([exec] in the config).

    Attributes:
        rate: fraction of a host's later steps recomputed on a second replica (0: none).
        first_steps: a host's first N steps in a session are always checked.
        tol_fp32: relative tolerance when both outputs are float32 and the codec is raw.
        tol_bf16: relative tolerance when either output is bfloat16 or float16.
        beside: a generation's checks run beside its stream (`session.py` Rule 7).
    """

    rate: float = 0.02
    first_steps: int = 1
    tol_fp32: float = 1e-4
    tol_bf16: float = 5e-2
    beside: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"verify_rate: expected 0..1, got {self.rate!r}")
        if (
            isinstance(self.first_steps, bool)
            or not isinstance(self.first_steps, int)
            or self.first_steps < 0
        ):
            raise ValueError(
                f"verify_first_steps: expected an integer >= 0, got {self.first_steps!r}"
            )
        for name in ("tol_fp32", "tol_bf16"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"verify_{name}: expected a number in (0, 1), got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.first_steps > 0

    def sampled(self, host_steps: int, rng: random.Random) -> bool:
        """Check the step a host is about to count as its `host_steps`-th (0-based)?"""
        if host_steps < self.first_steps:
            return True
        return self.rate > 0 and rng.random() < self.rate

    def tolerance(self, a: torch.dtype, b: torch.dtype, codec: str) -> float:
        """Largest relative difference two honest outputs of dtypes `a`, `b` may have."""
        if codec not in CODEC_TOLERANCE:
            raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODEC_TOLERANCE)}")
        base = self.tol_bf16 if a in _HALF or b in _HALF else self.tol_fp32
        return max(base, CODEC_TOLERANCE[codec])


def difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf when the shapes differ or a value is not finite)."""
    if out.shape != ref.shape:
        return math.inf
    if not out.is_floating_point() or not ref.is_floating_point():
        return 0.0 if torch.equal(out, ref) else math.inf
    a, b = out.double(), ref.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / max(scale, 1e-12)


def last_tokens(ref: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The tokens of `ref` (a concatenated check's output) that `like` (one step's) covers:
    the last `like.shape[1]` of a [batch, tokens, ...] output; the whole of anything else."""
    if ref.dim() >= 3 and like.dim() == ref.dim() and ref.shape[1] >= like.shape[1]:
        return ref[:, ref.shape[1] - like.shape[1] :]
    return ref


def next_token(out: torch.Tensor) -> torch.Tensor:
    """The token a step of the model's last hop gave: its int64 (B,) reduced output, or
    the argmax of its logits' last position."""
    if out.dtype == torch.int64:
        return out
    return (out[:, -1] if out.dim() == 3 else out).argmax(-1)


def joined_steps(steps: list[StepInput]) -> list[StepInput]:
    """`steps` as ONE step, concatenated along the tokens (one prefill: verify Rule 3);
    unchanged when they are not token-shaped."""
    if len(steps) <= 1:
        return steps
    xs = [s.x for s in steps]
    if any(t.dim() not in (2, 3) or t.dim() != xs[0].dim() for t in xs):
        return steps
    last = steps[-1]
    return [StepInput(torch.cat(xs, dim=1), steps[0].position, last.causal, last.pad_mask)]


Opinion = tuple[torch.Tensor | None, bytes | None, bool]  # (output, replica host, the origin's?)
# (start, end, inputs, batch, max_len, last_only) -> the origin's own output of the last
# input (its last position only with last_only), computed on a fresh session of atoms
# [start, end) from its model files
Arbiter = Callable[[int, int, list[StepInput], int, int, bool], Awaitable[torch.Tensor]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """How a session spot-checks its hops (the rules above; `session.py` Rules 4-7).

    Attributes:
        policy: which steps, which tolerance.
        arbiter: the origin's own computation, the judge when two replicas disagree and
            the second opinion when no other replica exists.
        codec: the session's wire codec (it widens the tolerance).
        trusted: a host whose outputs are never checked (the origin itself).
        rng: decides the sampled steps.
        on_check: told the outcome of each check ("agreed", "wrong_output", "undecided",
            "deferred").
        judge_ready: (start, end) -> whether the arbiter can judge atoms [start, end)
            without loading them first (False also starts that load in the background;
            Rule 6); None: it always can.
    """

    policy: VerifyPolicy
    arbiter: Arbiter
    codec: str = "raw"
    trusted: bytes = b""
    rng: random.Random = field(default_factory=random.Random)
    on_check: Callable[[str], None] | None = None
    judge_ready: Callable[[int, int], bool] | None = None
