"""The training records of the execution protocol (they ride the same exec streams).

Rule 1: a training session on a host is a `SpanTrainer` over a span it serves; the origin
drives it with micro-batch forwards, backwards and fused loss steps, then commits each
optimiser step with `TrainApply(step)`; step ids make a duplicate or late message harmless.
Rule 2: at most one tensor per message (the payload frame), as every exec message; the
targets of a loss step are small int64 arrays and travel inside the header.
Rule 3: every size a header names is bounded here, before any tensor is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from atoms.codecs import CODECS
from mesh.wire import record

from .wire import SESSION_ID_BYTES, TensorHeader

MAX_MICRO_BATCHES = 1 << 16
# ids of one loss step (micro_batch x seq_len at most): 512 KiB of int64 targets plus a
# 64 KiB pad mask, so the largest loss header stays under the exec header limit
# (`wire.MAX_HEADER_BYTES`, 1 MiB) with room for its envelope
MAX_TARGETS = 1 << 16
MAX_STATE_TENSORS = 4096
SCHEDULES = ("1f1b", "gpipe")
STATE_KINDS = ("state", "grads", "params")
"""What a transfer of named tensors carries: "state" (parameters and optimiser moments, a
checkpoint: restoring it sets the step too), "grads" (the step's gradients: replicas sum
them), "params" (parameters only: an averaging round of replicas)."""


def _check_kind(kind: str) -> None:
    if kind not in STATE_KINDS:
        raise ValueError(f"kind: expected one of {STATE_KINDS}, got {kind!r}")


def _check_sid(session_id: bytes) -> None:
    if len(session_id) != SESSION_ID_BYTES:
        raise ValueError(f"session_id: expected {SESSION_ID_BYTES} bytes, got {len(session_id)}")


@record("t.open")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainOpen:
    """Start training atoms [start, end) of a model: a private fp32 copy of the trainable
    atoms, AdamW state, and `next_step` as the first optimiser step to apply. `codec` is
    the wire codec of the host's float answers (outputs, input gradients): the hop's."""

    session_id: bytes
    model_id: str
    start: int
    end: int
    needs_input_grad: bool
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    dropout: float
    precision: str
    next_step: int = 0
    codec: str = "raw"

    def __post_init__(self) -> None:
        _check_sid(self.session_id)
        if not 0 <= self.start < self.end:
            raise ValueError(f"span: expected 0 <= start < end, got [{self.start}, {self.end})")
        if self.next_step < 0:
            raise ValueError(f"next_step must be >= 0, got {self.next_step}")
        if self.codec not in CODECS:
            raise ValueError(f"codec: expected one of {sorted(CODECS)}, got {self.codec!r}")


@record("t.opened")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainOpened:
    session_id: bytes
    trainable_params: int
    next_step: int


@record("t.fwd")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainForward:
    """Forward of micro-batch `mb`: with `grad`, its backward follows (the host keeps what
    it needs); without, an inference forward (frozen spans, evaluation)."""

    session_id: bytes
    mb: int
    seed: int
    causal: bool
    grad: bool
    tensor: TensorHeader
    pad_mask: bytes = b""  # B x T bytes of 0/1 (1 = real token), empty for none

    def __post_init__(self) -> None:
        _check_sid(self.session_id)
        if not 0 <= self.mb < MAX_MICRO_BATCHES or self.seed < 0:
            raise ValueError(f"mb 0..{MAX_MICRO_BATCHES - 1} and seed >= 0 expected")
        if len(self.pad_mask) > MAX_TARGETS:
            raise ValueError(f"pad_mask: at most {MAX_TARGETS} bytes")


@record("t.bwd")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainBackward:
    """The gradient of micro-batch `mb`'s output; the answer carries its input's gradient."""

    session_id: bytes
    mb: int
    tensor: TensorHeader

    def __post_init__(self) -> None:
        _check_sid(self.session_id)
        if not 0 <= self.mb < MAX_MICRO_BATCHES:
            raise ValueError(f"mb 0..{MAX_MICRO_BATCHES - 1} expected")


@record("t.loss")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainLoss:
    """Forward, summed cross-entropy and backward of micro-batch `mb` on the span that ends
    in a head (`evaluate`: forward and loss only, no dropout, no gradient).

    `targets` are int64 little-endian of `targets_shape` ((B, T) next-token ids or (B,)
    class ids; -100 = no loss there).
    """

    session_id: bytes
    mb: int
    seed: int
    causal: bool
    evaluate: bool
    tensor: TensorHeader
    targets: bytes
    targets_shape: tuple[int, ...]
    pad_mask: bytes = b""

    def __post_init__(self) -> None:
        _check_sid(self.session_id)
        if not 0 <= self.mb < MAX_MICRO_BATCHES or self.seed < 0:
            raise ValueError(f"mb 0..{MAX_MICRO_BATCHES - 1} and seed >= 0 expected")
        count = 1
        for n in self.targets_shape:
            if n < 0:
                raise ValueError(f"targets_shape must be non-negative, got {self.targets_shape}")
            count *= n
        if not 1 <= len(self.targets_shape) <= 2 or count > MAX_TARGETS:
            raise ValueError(f"targets: rank 1-2 and at most {MAX_TARGETS} ids expected")
        if len(self.targets) != 8 * count:
            raise ValueError(f"targets: expected {8 * count} bytes, got {len(self.targets)}")
        if len(self.pad_mask) > MAX_TARGETS:
            raise ValueError(f"pad_mask: at most {MAX_TARGETS} bytes")


@record("t.out")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainOutput:
    """The answer to a forward (its output) or a backward (its input gradient; `has_tensor`
    False when the span needs none)."""

    session_id: bytes
    mb: int
    has_tensor: bool
    tensor: TensorHeader
    compute_s: float
    queue_s: float


@record("t.lossr")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainLossResult:
    session_id: bytes
    mb: int
    loss: float
    count: int
    correct: int
    has_tensor: bool
    tensor: TensorHeader
    compute_s: float
    queue_s: float


@record("t.norm")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainNorm:
    """Ask for the squared norm of the gradients summed for optimiser step `step`."""

    session_id: bytes
    step: int


@record("t.normr")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainNormResult:
    session_id: bytes
    step: int
    sq_norm: float
    micro_batches: int


@record("t.apply")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainApply:
    """Commit optimiser step `step`: gradients times `scale`, one AdamW update at `lr`."""

    session_id: bytes
    step: int
    lr: float
    scale: float


@record("t.applied")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainApplied:
    session_id: bytes
    step: int
    applied: bool  # False: a duplicate, already applied before


@record("t.getstate")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainGetState:
    """Ask for the session's tensors of `kind` (see STATE_KINDS): answered by
    `TrainStateTensor` x N then `TrainStateEnd`."""

    session_id: bytes
    kind: str = "state"

    def __post_init__(self) -> None:
        _check_kind(self.kind)


@record("t.tensor")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainStateTensor:
    """One named tensor of a checkpoint (host to origin, or origin to host to restore)."""

    session_id: bytes
    name: str
    index: int
    tensor: TensorHeader

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_STATE_TENSORS or not 0 < len(self.name) <= 512:
            raise ValueError(f"state tensor: index < {MAX_STATE_TENSORS} and a name expected")


@record("t.stateend")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainStateEnd:
    """The end of a transfer of named tensors: `count` were sent; a "state" restore also
    sets the next optimiser step to `next_step`."""

    session_id: bytes
    count: int
    next_step: int
    kind: str = "state"

    def __post_init__(self) -> None:
        if not 0 <= self.count <= MAX_STATE_TENSORS or self.next_step < 0:
            raise ValueError(f"state end: count 0..{MAX_STATE_TENSORS}, next_step >= 0 expected")
        _check_kind(self.kind)


@record("t.close")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainClose:
    session_id: bytes


TRAIN_HOST_INBOUND = (
    TrainOpen,
    TrainForward,
    TrainBackward,
    TrainLoss,
    TrainNorm,
    TrainApply,
    TrainGetState,
    TrainStateTensor,
    TrainStateEnd,
    TrainClose,
)
TRAIN_ORIGIN_INBOUND = (
    TrainOpened,
    TrainOutput,
    TrainLossResult,
    TrainNormResult,
    TrainApplied,
    TrainStateTensor,
    TrainStateEnd,
)
