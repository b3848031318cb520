"""Pruning: unstructured magnitude pruning, and structured removal of heads and FFN neurons.

Rule 1: structured pruning makes an atom physically smaller: the pruned spec says how many
heads (`heads`, with `head_dim` kept) and feed-forward neurons (`intermediate`) remain, the
family builder builds the smaller module, and the kept rows/columns of every weight are
copied into it. A pruned atom is an ordinary atom (saved, loaded and verified alike).
Rule 2: what is removed is chosen on calibration data, not on weights alone: a head's score
is the mean norm of its contribution to the attention output projection, a neuron's is the
mean |activation| times the norm of its output column (`importance`).
Rule 3: nothing here mutates its input; every function returns new atoms.
Supported blocks: BERT encoder layers (`BertLayer`) and Nexus blocks (`NexusBlock`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .atom import Atom, AtomSpec, ForwardContext, make_dims
from .bert import BertLayer
from .model import build_atom, load_state
from .nexus import NexusBlock

if TYPE_CHECKING:
    from collections.abc import Callable

# (dense chain's input, pruned chain's input, context) of one block
Calibration = tuple[torch.Tensor, torch.Tensor, ForwardContext]
RIDGE = 1e-2  # of the mean diagonal of the Gram matrix, in `_refit`


def prunable(atom: Atom) -> bool:
    """Whether `atom` is a block whose heads and neurons `prune_block` can remove."""
    return isinstance(atom, BertLayer | NexusBlock)


Block = BertLayer | NexusBlock


def _block(atom: Atom) -> Block:
    if not isinstance(atom, BertLayer | NexusBlock):
        raise ValueError(f"atom {atom.spec.uid} has no heads or neurons to prune")
    return atom


def _ffn_out(atom: Block) -> nn.Linear:
    return atom.ffn_out if isinstance(atom, BertLayer) else atom.ffn_down


@dataclass(frozen=True, slots=True)
class Importance:
    """Per-head (H,) and per-neuron (F,) importance scores of one block."""

    heads: torch.Tensor
    neurons: torch.Tensor

    def __post_init__(self) -> None:
        if self.heads.dim() != 1 or self.neurons.dim() != 1:
            raise ValueError("importance scores must be 1-D")


def importance(atom: Atom, x: torch.Tensor, ctx: ForwardContext) -> Importance:
    """Score the heads and FFN neurons of a block on its calibration input `x`.

    Raises:
        ValueError: `atom` is not a prunable block.
    """
    block = _block(atom)
    h, d = block.heads, block.head_dim
    attn_out: nn.Linear = block.attn_out
    ffn_out = _ffn_out(block)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])

        return hook

    hooks = [
        attn_out.register_forward_pre_hook(keep("attn")),
        ffn_out.register_forward_pre_hook(keep("ffn")),
    ]
    try:
        with torch.no_grad():
            atom(x, ctx)
    finally:
        for hk in hooks:
            hk.remove()
    a = seen["attn"].reshape(-1, h, d)  # (M, H, D)
    w_o = attn_out.weight.detach().float().reshape(-1, h, d)  # (C, H, D)
    contrib = torch.einsum("mhd,chd->mhc", a, w_o)  # each head's share of the projection
    heads = contrib.norm(dim=2).mean(dim=0)  # (H,)
    neurons = seen["ffn"].abs().mean(dim=0) * ffn_out.weight.detach().float().norm(dim=0)
    return Importance(heads=heads, neurons=neurons)


def _kept(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    n = scores.numel()
    keep = max(1, n - round(n * fraction))
    return torch.sort(torch.topk(scores, keep).indices).values


def pruned_spec(spec: AtomSpec, heads: int, head_dim: int, intermediate: int) -> AtomSpec:
    """`spec` with `heads` heads of `head_dim` and `intermediate` FFN neurons."""
    dims = dict(spec.dims)
    dims.update(heads=heads, head_dim=head_dim, intermediate=intermediate)
    return dataclasses.replace(spec, dims=make_dims(**dims))


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def _sliced_state(
    atom: Block, heads: torch.Tensor, neurons: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The state dict of `atom` keeping only `heads` and `neurons` (sorted indexes)."""
    state = dict(atom.state_dict())
    d = atom.head_dim
    rows = _head_rows(heads, d)
    if isinstance(atom, BertLayer):
        for name in ("q", "k", "v"):
            state[f"{name}.weight"] = state[f"{name}.weight"][rows]
            state[f"{name}.bias"] = state[f"{name}.bias"][rows]
        state["ffn_in.weight"] = state["ffn_in.weight"][neurons]
        state["ffn_in.bias"] = state["ffn_in.bias"][neurons]
        state["ffn_out.weight"] = state["ffn_out.weight"][:, neurons]
    else:
        inner = atom.heads * d
        qkv_rows = torch.cat([rows + i * inner for i in range(3)])
        state["qkv.weight"] = state["qkv.weight"][qkv_rows]
        state["qkv.bias"] = state["qkv.bias"][qkv_rows]
        state["head_log_temperature"] = state["head_log_temperature"][heads]
        state["head_gate.weight"] = state["head_gate.weight"][heads]
        state["head_gate.bias"] = state["head_gate.bias"][heads]
        for name in ("ffn_gate", "ffn_up"):
            state[f"{name}.weight"] = state[f"{name}.weight"][neurons]
            state[f"{name}.bias"] = state[f"{name}.bias"][neurons]
        state["ffn_down.weight"] = state["ffn_down.weight"][:, neurons]
    state["attn_out.weight"] = state["attn_out.weight"][:, rows]
    return state


def _capture(
    atom: Atom, x: torch.Tensor, ctx: ForwardContext, taps: dict[str, tuple[nn.Module, bool]]
) -> dict[str, torch.Tensor]:
    """Run `atom` once and return, per tap name, the (M, width) input (False) or output
    (True) of the tapped module."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, (module, output) in taps.items():

        def hook(
            _m: nn.Module,
            args: tuple[torch.Tensor, ...],
            *out: torch.Tensor,
            name: str = name,
            output: bool = output,
        ) -> None:
            t = out[0] if output else args[0]
            seen[name] = t.detach().float().reshape(-1, t.shape[-1])

        if output:
            hooks.append(module.register_forward_hook(hook))
        else:
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            atom(x, ctx)
    finally:
        for hk in hooks:
            hk.remove()
    return seen


def _refit(linear: nn.Linear, inputs: torch.Tensor, target: torch.Tensor) -> None:
    """Least-squares (ridge) refit of `linear`'s weight and bias so that
    linear(inputs) ~ target: the kept heads/neurons take over what the removed ones did."""
    a = torch.cat((inputs, torch.ones(inputs.shape[0], 1)), dim=1)  # (M, K+1)
    gram = a.T @ a
    gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0])
    sol = torch.linalg.solve(gram, a.T @ target)  # (K+1, C)
    with torch.no_grad():
        linear.weight.copy_(sol[:-1].T.to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(sol[-1].to(linear.bias.dtype))


def _residual(atom: Block) -> nn.Module:
    """The module whose input is the residual stream that the FFN output is added to."""
    return atom.ffn_in if isinstance(atom, BertLayer) else atom.ffn_norm


def reconstruct(pruned: Block, dense: Block, calib: Calibration) -> None:
    """Refit (in place) the output projections of a pruned block so that each sublayer adds
    to the residual stream what the dense block added (layer-wise reconstruction, as the
    mask tuning of Kwon et al. 2022), on real (unpadded) calibration tokens. `calib` holds
    the dense chain's input, the pruned chain's input (so the refit also absorbs the error of
    the blocks before) and the context."""
    x_dense, x_pruned, ctx = calib
    real = torch.ones(x_dense.shape[:2], dtype=torch.bool).reshape(-1)
    if ctx.pad_mask is not None:
        real = ctx.pad_mask[:, -x_dense.shape[1] :].bool().reshape(-1)
    ref = _capture(
        dense,
        x_dense,
        ctx,
        {
            "attn": (dense.attn_out, True),
            "ffn": (_ffn_out(dense), True),
            "res": (_residual(dense), False),
        },
    )
    got = _capture(pruned, x_pruned, ctx, {"attn": (pruned.attn_out, False)})
    shift = (x_dense - x_pruned).float().reshape(-1, x_dense.shape[-1])
    _refit(pruned.attn_out, got["attn"][real], (ref["attn"] + shift)[real])
    got = _capture(
        pruned, x_pruned, ctx, {"ffn": (_ffn_out(pruned), False), "res": (_residual(pruned), False)}
    )
    _refit(_ffn_out(pruned), got["ffn"][real], (ref["ffn"] + ref["res"] - got["res"])[real])


def prune_block(
    atom: Atom, scores: Importance, *, heads: float, ffn: float, calib: Calibration | None = None
) -> Atom:
    """A copy of block `atom` without the `heads` fraction of its least important heads and
    the `ffn` fraction of its least important feed-forward neurons (at least one of each kept);
    with `calib` (dense input, pruned input, context) its output projections are refit
    (`reconstruct`).

    Raises:
        ValueError: not a prunable block, or a fraction outside [0, 1).
    """
    block = _block(atom)
    for name, frac in (("heads", heads), ("ffn", ffn)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"prune fraction {name} must be in [0, 1), got {frac}")
    keep_h, keep_n = _kept(scores.heads, heads), _kept(scores.neurons, ffn)
    spec = pruned_spec(atom.spec, keep_h.numel(), block.head_dim, keep_n.numel())
    new = _block(build_atom(spec))
    load_state(new, _sliced_state(block, keep_h, keep_n), f"pruning of {atom.spec.uid}")
    new.eval()
    if calib is not None and (heads > 0 or ffn > 0):
        reconstruct(new, block, calib)
    new.requires_grad_(any(p.requires_grad for p in atom.parameters()))
    return new


def magnitude_prune(atom: Atom, sparsity: float) -> Atom:
    """A copy of `atom` whose Linear weights each have their `sparsity` fraction of smallest
    |w| set to zero (unstructured). Same shapes and bytes: it only pays with a sparse kernel
    or a compressor, which is why `compress` uses structured pruning (measured, §7).

    Raises:
        ValueError: sparsity outside [0, 1).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    new = build_atom(atom.spec)
    state = dict(atom.state_dict())
    for name, module in atom.named_modules():
        if isinstance(module, nn.Linear) and sparsity > 0:
            w = state[f"{name}.weight"]
            k = int(w.numel() * sparsity)
            if k:
                cut = w.abs().flatten().float().kthvalue(k).values
                state[f"{name}.weight"] = torch.where(w.abs().float() <= cut, 0, w)
    load_state(new, state, f"magnitude pruning of {atom.spec.uid}")
    new.eval()
    return new
