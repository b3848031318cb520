"""A span: a contiguous run of one model's atoms, the unit a host serves.

Rule 1: a span is atoms[start:end] of one model, in index order, each atom's output kind
matching the next one's input kind; anything else cannot be built.
Rule 2: the span checks its input once, with its first atom's `check_input`, before any
weight is touched; inside the span tensors pass from atom to atom unchecked.
Rule 3: running spans [a, b) then [b, c) computes exactly what [a, c) computes: the loop is
the same, so a cut anywhere is bit-for-bit invisible in one dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .cache import KVLayout, SessionCache

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .atom import Atom, ForwardContext, IOKind


class Span(nn.Module):
    """Atoms `start .. end-1` of model `model_id`, run in order by `forward`.

    Args:
        atoms: a non-empty, contiguous, kind-compatible run of one model's atoms.

    Raises:
        ValueError: empty, mixed models, a gap in the indexes, or kinds that do not chain.
    """

    def __init__(self, atoms: Sequence[Atom]) -> None:
        super().__init__()
        if not atoms:
            raise ValueError("a span needs at least one atom")
        first = atoms[0].spec
        for offset, atom in enumerate(atoms):
            spec = atom.spec
            if spec.model_id != first.model_id:
                raise ValueError(
                    f"span mixes models: {first.model_id!r} and {spec.model_id!r} ({spec.uid})"
                )
            if spec.index != first.index + offset:
                raise ValueError(
                    f"span atoms must be contiguous: expected index {first.index + offset}, "
                    f"got {spec.uid}"
                )
            if offset and atoms[offset - 1].spec.out_kind is not spec.in_kind:
                prev = atoms[offset - 1].spec
                raise ValueError(
                    f"span: {prev.uid} gives {prev.out_kind.value}, "
                    f"{spec.uid} takes {spec.in_kind.value}"
                )
        self.atoms = nn.ModuleList(atoms)
        self._chain: tuple[Atom, ...] = tuple(atoms)  # typed view of the same modules
        self.model_id = first.model_id
        self.start = first.index
        self.end = first.index + len(atoms)

    def __len__(self) -> int:
        return len(self.atoms)

    def atom_list(self) -> list[Atom]:
        """The atoms, typed (iterating the ModuleList gives plain modules)."""
        return list(self._chain)

    @property
    def in_kind(self) -> IOKind:
        return self.atom_list()[0].spec.in_kind

    @property
    def out_kind(self) -> IOKind:
        return self.atom_list()[-1].spec.out_kind

    def check_input(self, x: torch.Tensor) -> None:
        """Validate an input from outside with the first atom's `check_input`.

        Raises:
            ShapeMismatch, DtypeMismatch, NonFiniteInput, InputOutOfRange: naming the atom.
        """
        self.atom_list()[0].check_input(x)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, *, check: bool = True) -> torch.Tensor:
        """Run every atom in order; floats are cast to each atom's dtype on the way in.

        Args:
            x: the first atom's input (ids, hidden, pooled or image).
            ctx: positions, pad mask, causal flag and the session cache for this call.
            check: validate `x` first (turn off only for tensors this process made).

        Raises:
            AtomError: invalid input, or a cache that is missing or full.
        """
        if check:
            self.check_input(x)
        for atom in self._chain:
            dtype = atom.spec.torch_dtype
            if x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)  # mixed precision across atoms (see precision.py)
            x = atom(x, ctx)
        return x

    def kv_layouts(self) -> dict[int, tuple[str, KVLayout]]:
        """index -> (uid, layout) of every atom keeping a KV cache (`SessionCache.allocate`)."""
        layouts: dict[int, tuple[str, KVLayout]] = {}
        for atom in self.atom_list():
            layout = atom.kv_layout()
            if layout is not None:
                layouts[atom.spec.index] = (atom.spec.uid, layout)
        return layouts

    def new_session_cache(self, batch: int, max_len: int, budget_bytes: int) -> SessionCache:
        """Allocate the KV cache one session needs on this span.

        Raises:
            CacheExhausted: it would exceed `budget_bytes`.
        """
        return SessionCache.allocate(
            self.kv_layouts(), batch=batch, max_len=max_len, budget_bytes=budget_bytes
        )

    def extra_repr(self) -> str:
        return f"model_id={self.model_id!r}, atoms=[{self.start}, {self.end})"
