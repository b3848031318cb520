"""Inputs from outside: wrong shape, dtype, range or NaN/Inf each raise their own error,
naming the atom."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
import torch

from atoms.bert import BertConfig, ClassifierHead, head_spec, random_bert
from atoms.conv import tiny_cnn
from atoms.errors import DtypeMismatch, InputOutOfRange, NonFiniteInput, ShapeMismatch

if TYPE_CHECKING:
    from atoms.atom import Atom

CFG = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)
MODEL = random_bert(CFG, model_id="chk", seed=0)
EMBED, LAYER, POOL = MODEL.atoms
HEAD = ClassifierHead(head_spec(model_id="chk", index=3, hidden=16, classes=2))
CONV = tiny_cnn(model_id="cnn").atoms[0]

GOOD: list[tuple[Atom, torch.Tensor]] = [
    (LAYER, torch.zeros(2, 3, 16)),
    (POOL, torch.zeros(2, 3, 16)),
    (HEAD, torch.zeros(2, 16)),
    (CONV, torch.zeros(2, 3, 8, 8)),
]


def _uid(atom: Atom) -> str:
    return re.escape(atom.spec.uid)


@pytest.mark.parametrize(
    ("atom", "x"), GOOD, ids=lambda v: getattr(getattr(v, "spec", None), "uid", "")
)
def test_float_atoms_reject_each_bad_input_with_their_own_error(
    atom: Atom, x: torch.Tensor
) -> None:
    atom.check_input(x)  # the good input passes
    with pytest.raises(ShapeMismatch, match=_uid(atom)):
        atom.check_input(x[0])  # one rank short
    bigger = (
        torch.zeros(*x.shape[:-1], x.shape[-1] + 1) if x.dim() != 4 else torch.zeros(2, 4, 8, 8)
    )
    with pytest.raises(ShapeMismatch, match=_uid(atom)):
        atom.check_input(bigger)  # wrong width / channels
    with pytest.raises(DtypeMismatch, match=_uid(atom)):
        atom.check_input(x.long())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y.view(-1)[1] = bad
        with pytest.raises(NonFiniteInput, match=_uid(atom)):
            atom.check_input(y)


def test_embedding_rejects_bad_ids_with_their_own_error() -> None:
    EMBED.check_input(torch.tensor([[1, 2, 49]]))
    with pytest.raises(DtypeMismatch, match=_uid(EMBED)):
        EMBED.check_input(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ShapeMismatch, match=_uid(EMBED)):
        EMBED.check_input(torch.tensor([1, 2]))
    with pytest.raises(InputOutOfRange, match=_uid(EMBED) + r".*\[0, 50\)"):
        EMBED.check_input(torch.tensor([[1, 50]]))
    with pytest.raises(InputOutOfRange, match=_uid(EMBED)):
        EMBED.check_input(torch.tensor([[-1, 3]]))


def test_span_checks_its_first_atom_input_before_running() -> None:
    span = MODEL.span(1, 3)
    with pytest.raises(NonFiniteInput, match=_uid(LAYER)):
        span.check_input(torch.full((1, 2, 16), float("nan")))
