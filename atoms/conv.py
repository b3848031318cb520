"""Convolutional atoms, to show that atoms are not transformer-only: CONV, a global pooling
and a tiny image classifier built from them.

Rule 1: a CONV atom is Conv2d -> activation -> optional max-pool, image (B, C, H, W) in and
out; its channels, kernel, stride, padding and pool size are spec dims, its activation an attr.
Rule 2: same machinery as every family: `build_atom(spec)`, `check_input` from `Atom`, spans
cut anywhere, weights saved per atom by content digest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .atom import Atom, AtomKind, AtomSpec, ForwardContext, IOKind, make_attrs, make_dims
from .bert import ClassifierHead, head_spec
from .errors import ModelFormatError
from .model import Model

if TYPE_CHECKING:
    from .partition import ConfigValue

FAMILY = "cnn"
ACTIVATIONS = ("relu", "gelu", "none")


def conv_spec(
    *,
    model_id: str,
    index: int,
    in_channels: int,
    out_channels: int,
    kernel: int = 3,
    stride: int = 1,
    pool: int = 1,
    activation: str = "relu",
    dtype: str = "float32",
) -> AtomSpec:
    """Spec of a CONV atom with "same" padding (kernel // 2); `pool` 1 means no pooling."""
    return AtomSpec(
        AtomKind.CONV,
        model_id,
        index,
        FAMILY,
        make_dims(
            in_channels=in_channels,
            kernel=kernel,
            out_channels=out_channels,
            padding=kernel // 2,
            pool=pool,
            stride=stride,
        ),
        dtype,
        IOKind.IMAGE,
        IOKind.IMAGE,
        make_attrs(activation=activation),
    )


def global_pool_spec(
    *, model_id: str, index: int, channels: int, dtype: str = "float32"
) -> AtomSpec:
    return AtomSpec(
        AtomKind.POOLING,
        model_id,
        index,
        FAMILY,
        make_dims(hidden=channels),
        dtype,
        IOKind.IMAGE,
        IOKind.POOLED,
        make_attrs(mode="global_avg"),
    )


class ZeroConv2d(nn.Conv2d):
    """`nn.Conv2d` starting at zero (no RNG): weights come from a state dict or `init_random`."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ConvAtom(Atom):
    """Image (B, C_in, H, W) -> image (B, C_out, H', W')."""

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        self.activation = str(spec.attr("activation"))
        if self.activation not in ACTIVATIONS:
            raise ModelFormatError(
                f"atom {spec.uid}: activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        self.pool = spec.dim("pool")
        self.conv = ZeroConv2d(
            spec.dim("in_channels"),
            spec.dim("out_channels"),
            spec.dim("kernel"),
            stride=spec.dim("stride"),
            padding=spec.dim("padding"),
            dtype=spec.torch_dtype,
        )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = self.conv(x)  # (B, C_out, H', W')
        if self.activation == "relu":
            y = F.relu(y)
        elif self.activation == "gelu":
            y = F.gelu(y)
        if self.pool > 1:
            y = F.max_pool2d(y, self.pool)  # (B, C_out, H'/p, W'/p)
        out: torch.Tensor = y
        return out

    def init_random(self, generator: torch.Generator) -> ConvAtom:
        """Kaiming-normal weights (fan-in, ReLU gain), zero bias, from `generator`; in place."""
        w = self.conv.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=generator).to(w.dtype) * (2.0 / fan_in) ** 0.5)
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        return self


class GlobalAvgPool(Atom):
    """Image (B, C, H, W) -> pooled (B, C): the mean over all pixels."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C)


def build_atom(spec: AtomSpec) -> Atom:
    """Rebuild one CNN atom (zero weights) from its spec.

    Raises:
        ModelFormatError: not a CNN conv / pooling / head spec, or one lacking a dim or attr.
    """
    classes: dict[AtomKind, type[Atom]] = {
        AtomKind.CONV: ConvAtom,
        AtomKind.POOLING: GlobalAvgPool,
        AtomKind.CLS_HEAD: ClassifierHead,
    }
    if spec.family != FAMILY or spec.kind not in classes:
        raise ModelFormatError(
            f"atom {spec.uid}: expected a {FAMILY} conv/pooling/cls_head spec, "
            f"got family {spec.family!r} kind {spec.kind.value}"
        )
    try:
        return classes[spec.kind](spec)
    except KeyError as exc:
        raise ModelFormatError(f"atom {spec.uid}: incomplete {FAMILY} spec: {exc}") from None


def tiny_cnn(
    *,
    model_id: str = "tiny-cnn",
    in_channels: int = 3,
    widths: tuple[int, ...] = (8, 16),
    classes: int = 10,
    seed: int = 0,
    dtype: str = "float32",
) -> Model:
    """A small random-init image classifier: CONV atoms (each halving H and W), a global
    average pool and a classifier head, all seeded from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    atoms: list[Atom] = []
    channels = in_channels
    for width in widths:
        spec = conv_spec(
            model_id=model_id,
            index=len(atoms),
            in_channels=channels,
            out_channels=width,
            pool=2,
            dtype=dtype,
        )
        atoms.append(ConvAtom(spec).init_random(gen))
        channels = width
    atoms.append(
        GlobalAvgPool(
            global_pool_spec(model_id=model_id, index=len(atoms), channels=channels, dtype=dtype)
        )
    )
    head = ClassifierHead(
        head_spec(
            model_id=model_id,
            index=len(atoms),
            hidden=channels,
            classes=classes,
            dtype=dtype,
            family=FAMILY,
        )
    )
    atoms.append(head.init_random(gen))
    config: dict[str, ConfigValue] = {
        "in_channels": in_channels,
        "classes": classes,
        "widths": ",".join(str(w) for w in widths),
    }
    return Model(model_id=model_id, family=FAMILY, config=config, atoms=atoms)


def image_context(batch: int) -> ForwardContext:
    """The context of an image batch: images have no token positions, so positions are
    a (B, 1) zero placeholder and there is no pad mask or cache."""
    return ForwardContext(positions=torch.zeros((batch, 1), dtype=torch.long))
