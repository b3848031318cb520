"""CONV atoms: a tiny CNN runs, cuts and saves like any transformer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from atoms.conv import conv_spec, image_context, tiny_cnn
from atoms.errors import ModelFormatError, ShapeMismatch
from atoms.model import build_atom, load_span, save_model

if TYPE_CHECKING:
    from pathlib import Path


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_tiny_cnn_shapes_through_its_atoms() -> None:
    model = tiny_cnn(widths=(4, 8), classes=5)
    assert [a.spec.kind.value for a in model.atoms] == ["conv", "conv", "pooling", "cls_head"]
    ctx = image_context(2)
    with torch.no_grad():
        x = model.span(0, 1)(_images(), ctx)
        assert x.shape == (2, 4, 8, 8)  # conv keeps H, W; max-pool halves them
        x = model.span(1, 2)(x, ctx)
        assert x.shape == (2, 8, 4, 4)
        assert model.span(2)(x, ctx).shape == (2, 5)


def test_every_cut_of_the_cnn_equals_the_whole_bit_for_bit() -> None:
    model = tiny_cnn()
    ctx = image_context(2)
    with torch.no_grad():
        whole = model.span()(_images(), ctx)
        for cut in range(1, len(model)):
            assert torch.equal(model.span(cut)(model.span(0, cut)(_images(), ctx), ctx), whole)


def test_cnn_saves_and_loads_by_span(tmp_path: Path) -> None:
    model = tiny_cnn(seed=3)
    save_model(model, tmp_path)
    ctx = image_context(2)
    with torch.no_grad():
        mid = model.span(0, 1)(_images(), ctx)
        assert torch.equal(load_span(tmp_path, 1, 4)(mid, ctx), model.span(1)(mid, ctx))


def test_conv_spec_validation() -> None:
    atom = build_atom(conv_spec(model_id="m", index=0, in_channels=3, out_channels=4))
    with pytest.raises(ShapeMismatch, match=r"m/000-conv.*width 3"):
        atom.check_input(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ModelFormatError, match="activation"):
        build_atom(
            conv_spec(model_id="m", index=0, in_channels=3, out_channels=4, activation="tanh")
        )
