"""Weight precision per atom: fp32 <-> bf16 conversion, and its measured effect.

Rule 1: conversion never mutates: `to_dtype` returns a new atom, rebuilt from a spec whose
`dtype` is the target (so its manifest entry, weight digest and KV layout say bf16), with the
original's weights cast into it.
Rule 2: no precision level ships without its measured error: `cosine_report` compares a
candidate's outputs with the fp32 reference row by row (docs/architecture.md §7).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .atom import DTYPES, Atom
from .model import Model, build_atom, load_state

if TYPE_CHECKING:
    from collections.abc import Sequence


def to_dtype(atom: Atom, dtype: str) -> Atom:
    """A copy of `atom` computing in `dtype` ("float32" or "bfloat16").

    Raises:
        ValueError: unknown dtype.
        ModelFormatError: the atom's family cannot rebuild it from its spec.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    new = build_atom(dataclasses.replace(atom.spec, dtype=dtype))
    load_state(new, atom.state_dict(), f"conversion of {atom.spec.uid} to {dtype}")
    new.train(atom.training)
    for (_, src), (_, dst) in zip(atom.named_parameters(), new.named_parameters(), strict=True):
        dst.requires_grad_(src.requires_grad)  # a frozen parameter stays frozen
    return new


def model_to_dtype(model: Model, dtype: str, *, indexes: Sequence[int] | None = None) -> Model:
    """A copy of `model` with the atoms at `indexes` (default: all) converted to `dtype`."""
    chosen = set(range(len(model))) if indexes is None else set(indexes)
    return model.with_atoms(
        [to_dtype(a, dtype) if a.spec.index in chosen else a for a in model.atoms]
    )


@dataclass(frozen=True, slots=True)
class CosineReport:
    """Row-wise cosine similarity of a candidate's outputs against a reference's."""

    mean: float
    min: float
    rows: int

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"a cosine report needs at least one row, got {self.rows}")


def cosine_report(reference: torch.Tensor, candidate: torch.Tensor) -> CosineReport:
    """Compare two (N, ...) outputs row by row, in float32.

    Raises:
        ValueError: shapes differ or there are no rows.
    """
    if reference.shape != candidate.shape or reference.shape[0] == 0:
        raise ValueError(
            f"cosine needs two equal non-empty shapes, got {tuple(reference.shape)} "
            f"and {tuple(candidate.shape)}"
        )
    ref = reference.detach().float().reshape(reference.shape[0], -1)
    cand = candidate.detach().float().reshape(candidate.shape[0], -1)
    cos = F.cosine_similarity(ref, cand, dim=1)
    return CosineReport(mean=float(cos.mean()), min=float(cos.min()), rows=int(cos.numel()))
