"""The atom: the unit of a neural network that one host runs.

Rule 1: an atom is an `nn.Module` plus a frozen `AtomSpec`; two atoms with the same spec
and the same weights compute the same function.
Rule 2: every atom has the same call shape, `forward(x, ctx) -> Tensor`, so that any
contiguous run of atoms (a span) can be executed by one loop and cut anywhere.
Rule 3: inputs from outside are checked (`check_input`) before they touch a weight:
shape, dtype and finiteness errors name the atom.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import KVCache, KVLayout
from .errors import DtypeMismatch, ModelFormatError, NonFiniteInput, ShapeMismatch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

AttrValue = bool | int | float | str  # the value types `AtomSpec.attrs` may hold


class AtomKind(enum.StrEnum):
    """What an atom computes. Routing and placement treat all kinds alike."""

    EMBEDDING = "embedding"  # token ids (B, T) -> hidden (B, T, C)
    POSITION = "position"  # hidden -> hidden + positional encoding
    ATTENTION = "attention"  # hidden -> hidden (self-attention sublayer, with KV cache)
    FEED_FORWARD = "feed_forward"  # hidden -> hidden
    BLOCK = "block"  # a whole transformer block (attention + feed-forward)
    NORM = "norm"  # hidden -> normalised hidden
    POOLING = "pooling"  # hidden (B, T, C) -> pooled (B, C)
    LM_HEAD = "lm_head"  # hidden (B, T, C) -> logits (B, T, V)
    CLS_HEAD = "cls_head"  # pooled (B, C) -> logits (B, K)
    CONV = "conv"  # feature map (B, C, H, W) -> feature map


class IOKind(enum.StrEnum):
    """The kind of tensor an atom takes or gives; consecutive atoms must agree."""

    IDS = "ids"  # (B, T) int64 token ids
    HIDDEN = "hidden"  # (B, T, C) float
    POOLED = "pooled"  # (B, C) float
    LOGITS = "logits"  # (B, T, V) or (B, K) float
    IMAGE = "image"  # (B, C, H, W) float


@dataclass(frozen=True, slots=True)
class AtomSpec:
    """Everything needed to rebuild an atom's module, except its weights.

    Args:
        kind: what it computes.
        model_id: the model this atom belongs to.
        index: position in the model's ordered atom list (0-based).
        family: the model family that knows how to build it ("bert", "llama", "nexus", ...).
        dims: named integer dimensions, sorted by name (hidden, heads, ...).
        dtype: "float32" or "bfloat16".
        in_kind / out_kind: the tensor kinds taken and given.
        attrs: named non-integer settings (LayerNorm eps, activation name, ...), sorted by
            name, as (name, bool | int | float | str) pairs; see `make_attrs` and `attr`.
    """

    kind: AtomKind
    model_id: str
    index: int
    family: str
    dims: tuple[tuple[str, int], ...]
    dtype: str = "float32"
    in_kind: IOKind = IOKind.HIDDEN
    out_kind: IOKind = IOKind.HIDDEN
    attrs: tuple[tuple[str, AttrValue], ...] = ()

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"atom index must be >= 0, got {self.index}")
        if self.dtype not in DTYPES:
            raise ValueError(f"atom dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        names = [n for n, _ in self.dims]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError(f"atom dims must be unique and sorted by name, got {names}")
        for name, value in self.dims:
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"atom dim {name} must be a non-negative int, got {value!r}")
        attr_names = [n for n, _ in self.attrs]
        if attr_names != sorted(attr_names) or len(set(attr_names)) != len(attr_names):
            raise ValueError(f"atom attrs must be unique and sorted by name, got {attr_names}")
        for name, attr in self.attrs:
            if not isinstance(attr, bool | int | float | str):
                raise ValueError(f"atom attr {name} must be bool/int/float/str, got {attr!r}")

    @property
    def uid(self) -> str:
        return f"{self.model_id}/{self.index:03d}-{self.kind.value}"

    def dim(self, name: str) -> int:
        for n, v in self.dims:
            if n == name:
                return v
        raise KeyError(f"atom {self.uid} has no dim {name!r}")

    def dim_or(self, name: str, default: int) -> int:
        """The dim `name`, or `default` when the spec does not set it (optional dims)."""
        for n, v in self.dims:
            if n == name:
                return v
        return default

    def attr(self, name: str) -> AttrValue:
        for n, v in self.attrs:
            if n == name:
                return v
        raise KeyError(f"atom {self.uid} has no attr {name!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def make_dims(**dims: int) -> tuple[tuple[str, int], ...]:
    """Build the sorted `dims` tuple of an `AtomSpec` from keyword arguments."""
    return tuple(sorted(dims.items()))


def make_attrs(**attrs: AttrValue) -> tuple[tuple[str, AttrValue], ...]:
    """Build the sorted `attrs` tuple of an `AtomSpec` from keyword arguments."""
    return tuple(sorted(attrs.items()))


@dataclass(slots=True)
class ForwardContext:
    """Per-call facts every atom of a span may need.

    Args:
        positions: (B, T) int64 absolute positions of the new tokens.
        pad_mask: (B, T_total) bool, True where a token is real, covering cached plus new
            tokens; None when nothing is padded.
        causal: whether attention may look only backwards (decoders, Nexus) or both ways.
        cache: the session's KV cache, or None for a stateless full forward.
        dropout: the dropout rate of this call (0 in inference; training sets it).
        seed: seeds every dropout mask of this call (`dropout_mask`): the same seed gives the
            same masks, so a recompute, a retry or a replay is bit-identical.
        logits_to_keep: > 0: an LM head projects only the last `logits_to_keep` positions
            (`kept_positions`; Hugging Face's argument of the same name): a generation
            step reads only the last position's logits, and over a prompt of T tokens the
            vocabulary projection is most of the span's work. 0: every position.
    """

    positions: torch.Tensor
    pad_mask: torch.Tensor | None = None
    causal: bool = False
    cache: KVCache | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    dropout: float = 0.0
    seed: int = 0
    logits_to_keep: int = 0

    @classmethod
    def for_tokens(
        cls,
        batch: int,
        length: int,
        *,
        start: int = 0,
        causal: bool = False,
        pad_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> ForwardContext:
        pos = torch.arange(start, start + length, dtype=torch.long).unsqueeze(0).expand(batch, -1)
        return cls(
            positions=pos,
            pad_mask=pad_mask,
            causal=causal,
            cache=cache,
            logits_to_keep=logits_to_keep,
        )


def vocab_major(weight: torch.Tensor) -> None:
    """Lay out an output projection's (V, C) weight column-major, in place: the same
    (V, C) parameter over a contiguous (C, V) buffer. `F.linear` then multiplies by that
    buffer as it is, and MKL's kernel for a few rows times a wide matrix is far faster
    that way round: one decode row through a 30,522 x 384 projection takes 1.8 ms instead
    of 4.5 ms, three rows 7.1 ms instead of 17 ms, and four or more rows as much as before
    (bit-identical from four on; fewer differ in the last bits, within 1e-6 relative).
    Values, shape, state dicts and the stored bytes (saved contiguous) stay as they were;
    `load_state_dict` copies into this layout, and gradients and optimiser state follow it.
    Called on a meta-device weight it costs nothing, and materialising keeps the layout.
    """
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()


def kept_positions(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The positions of hidden states `x` (B, T, C) an LM head projects: the last
    `ctx.logits_to_keep` of them, or all when it is 0 (or T is no more)."""
    k = ctx.logits_to_keep
    return x if k <= 0 or x.shape[1] <= k else x[:, -k:]


def dropout(x: torch.Tensor, ctx: ForwardContext, atom: AtomSpec, site: int) -> torch.Tensor:
    """Inverted dropout of `x` at rate `ctx.dropout`, its mask drawn from its own generator.

    The mask depends only on (ctx.seed, atom index, site, shape), never on the global RNG,
    so the host that recomputes a forward for the backward pass, or a replacement host that
    replays it, draws the very same mask (SWARM's deterministic dropout).
    """
    p = ctx.dropout
    if p <= 0.0:
        return x
    mix = (ctx.seed * 1_000_003 + atom.index * 7919 + site) % (1 << 62)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(mix)) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Atom(nn.Module):
    """Base class of all atoms. Subclasses set `self.spec` and implement `forward`."""

    spec: AtomSpec

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def kv_layout(self) -> KVLayout | None:
        """What this atom keeps per token in a session's KV cache; None for no cache."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """Validate an input from outside this process before use.

        Raises:
            ShapeMismatch, DtypeMismatch, NonFiniteInput: naming this atom's uid.
        """
        uid = self.spec.uid
        kind = self.spec.in_kind
        if kind is IOKind.IDS:
            if x.dtype != torch.long:
                raise DtypeMismatch(f"atom {uid}: expected int64 token ids, got {x.dtype}")
            if x.dim() != 2:
                raise ShapeMismatch(f"atom {uid}: expected (B,T) ids, got {tuple(x.shape)}")
            return
        expected_rank = {IOKind.HIDDEN: 3, IOKind.POOLED: 2, IOKind.LOGITS: 3, IOKind.IMAGE: 4}
        rank = expected_rank[kind]
        if x.dim() != rank:
            raise ShapeMismatch(
                f"atom {uid}: expected a rank-{rank} {kind.value} tensor, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise DtypeMismatch(f"atom {uid}: expected a float tensor, got {x.dtype}")
        width = self.input_width()
        if width is not None and x.shape[-1 if kind is not IOKind.IMAGE else 1] != width:
            raise ShapeMismatch(f"atom {uid}: expected width {width}, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteInput(f"atom {uid}: input holds NaN or Inf")

    def input_width(self) -> int | None:
        """The expected size of the feature dimension, or None if any is fine."""
        for name in ("hidden", "in_channels"):
            try:
                return self.spec.dim(name)
            except KeyError:
                continue
        return None


def build_from_table(
    spec: AtomSpec, family: str, classes: Mapping[AtomKind, Callable[[AtomSpec], Atom]]
) -> Atom:
    """Rebuild an atom of `family` (zero weights) from its spec with the family's class table.

    Raises:
        ModelFormatError: not a spec of this family and kinds, or one missing a dim/attr.
    """
    if spec.family != family or spec.kind not in classes:
        raise ModelFormatError(
            f"atom {spec.uid}: expected a {family} {sorted(k.value for k in classes)} spec, "
            f"got family {spec.family!r} kind {spec.kind.value}"
        )
    try:
        return classes[spec.kind](spec)
    except KeyError as exc:
        raise ModelFormatError(f"atom {spec.uid}: incomplete {family} spec: {exc}") from None
