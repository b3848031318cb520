"""Pruning: unstructured magnitude pruning, and structured removal of heads and FFN neurons.

Rule 1: structured pruning makes an atom physically smaller: the pruned spec says how many
heads (`heads`, with `head_dim` kept) and feed-forward neurons (`intermediate`) remain, the
family builder builds the smaller module, and the kept rows/columns of every weight are
copied into it. A pruned atom is an ordinary atom (saved, loaded and verified alike).
Rule 2: what is removed is chosen on calibration data, not on weights alone. `prune_greedy`
(what `compress` uses) removes, one at a time, the head or neuron whose removal raises the
least-squares reconstruction error of its sublayer least once the output projection is refit
(optimal brain surgeon over groups of columns, `eliminate`), the same fraction of every
block (a model-wide budget spread over the blocks by those errors, weighed by the next
LayerNorm's scale, measured worse on MiniLM: cosine 0.931 against 0.940, so it was removed).
`importance` is a cheaper ranking (FLAP's fluctuation: variance of a unit's output-projection
input times its column's squared norm).
Rule 3: nothing here mutates its input; every function returns new atoms.
Supported blocks: BERT encoder layers (`BertLayer`) and Nexus blocks (`NexusBlock`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .atom import Atom, AtomSpec, ForwardContext, make_dims
from .bert import BertLayer
from .model import build_atom, load_state
from .nexus import NexusBlock

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
    """Score the heads and FFN neurons of a block on its calibration input `x`: FLAP's
    fluctuation (An et al. 2024), the variance over real tokens of each input channel of the
    output projection times the squared norm of its weight column (a head sums its channels).
    The variance, not the mean: a unit's mean contribution is what a refit bias keeps.

    Raises:
        ValueError: `atom` is not a prunable block.
    """
    block = _block(atom)
    ffn_out = _ffn_out(block)
    real = _real(x, ctx)
    seen = _capture(block, x, ctx, {"attn": (block.attn_out, False), "ffn": (ffn_out, False)})
    col = block.attn_out.weight.detach().float().pow(2).sum(dim=0)  # (H*D,)
    heads = (seen["attn"][real].var(dim=0, correction=0) * col).view(block.heads, -1).sum(dim=1)
    neurons = seen["ffn"][real].var(dim=0, correction=0) * (
        ffn_out.weight.detach().float().pow(2).sum(dim=0)
    )
    return Importance(heads=heads, neurons=neurons)


def _real(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """(B*T,) True where a row of the block input `x` (B, T, C) is a real token."""
    if ctx.pad_mask is None:
        return torch.ones(x.shape[0] * x.shape[1], dtype=torch.bool)
    return ctx.pad_mask[:, -x.shape[1] :].bool().reshape(-1)


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
    real = _real(x_dense, ctx)
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


@dataclass(frozen=True, slots=True)
class Elimination:
    """The result of `eliminate`: which groups of input columns stay, the refit projection
    over them, and the squared-error increase each removal cost, in removal order."""

    kept: torch.Tensor  # (G_kept,) sorted group indexes
    weight: torch.Tensor  # (C, G_kept * group)
    bias: torch.Tensor  # (C,)
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kept.dim() != 1 or self.weight.dim() != 2 or self.bias.dim() != 1:
            raise ValueError("elimination: kept and bias must be 1-D, weight 2-D")
        if any(c < 0 or not math.isfinite(c) for c in self.costs):
            raise ValueError("elimination: costs must be finite and >= 0")


def eliminate(
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    group: int,
    remove: int,
) -> Elimination:
    """Greedy backward elimination of `remove` groups of `group` adjacent input columns of a
    projection fit by (ridge) least squares with a bias: linear(inputs) ~ target.

    Optimal brain surgeon over groups (Hassibi & Stork 1993; ZipLM, Kurtic et al. 2023): with
    H^-1 the inverse Gram matrix and W the least-squares solution, removing group S costs
    exactly tr(W_S^T [(H^-1)_SS]^-1 W_S) of squared error after the refit of the rest, and
    W and H^-1 are updated in closed form. A head's columns are independent of the other
    heads' (the heads see the same input), so the cost is the sublayer's true error.

    Raises:
        ValueError: shapes disagree, or `remove` is not below the number of groups.
    """
    m, k = inputs.shape
    if target.shape[0] != m or k % group:
        raise ValueError(f"eliminate: inputs {tuple(inputs.shape)}, target {tuple(target.shape)}")
    n = k // group
    if not 0 <= remove < n:
        raise ValueError(f"eliminate: can remove 0..{n - 1} of {n} groups, not {remove}")
    a = torch.cat((inputs.double(), torch.ones(m, 1, dtype=torch.float64)), dim=1)  # (M, K+1)
    y = target.double()
    gram = a.T @ a
    gram += RIDGE * gram.diagonal().mean() * torch.eye(k + 1, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    w = hinv @ (a.T @ y)  # (K+1, C)
    cols = torch.arange(k).view(n, group)
    alive = torch.ones(n, dtype=torch.bool)
    costs = []
    for _ in range(remove):
        cand = alive.nonzero().squeeze(1)
        idx = cols[cand]  # (G, g)
        blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (G, g, g)
        ws = w[idx]  # (G, g, C)
        cost = (ws * torch.linalg.solve(blocks, ws)).sum(dim=(1, 2))  # (G,)
        best = int(torch.argmin(cost))
        s = cols[cand[best]]
        inv_ss = torch.linalg.inv(hinv[s][:, s])
        side = hinv[:, s]  # (K+1, g)
        w -= side @ (inv_ss @ w[s])
        hinv -= side @ inv_ss @ side.T
        alive[cand[best]] = False
        costs.append(max(0.0, float(cost[best])))
    kept = alive.nonzero().squeeze(1)
    w_kept = w[cols[kept].reshape(-1)]
    return Elimination(kept=kept, weight=w_kept.T.float(), bias=w[-1].float(), costs=tuple(costs))


def _rebuilt(block: Block, heads: torch.Tensor, neurons: torch.Tensor) -> Block:
    """A new block of `block`'s kept `heads` and `neurons` (sorted indexes), weights copied."""
    spec = pruned_spec(block.spec, heads.numel(), block.head_dim, neurons.numel())
    new = _block(build_atom(spec))
    load_state(new, _sliced_state(block, heads, neurons), f"pruning of {block.spec.uid}")
    new.eval()
    return new


def _set(linear: nn.Linear, fit: Elimination) -> None:
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(fit.bias.to(linear.bias.dtype))


@dataclass(frozen=True, slots=True)
class Removal:
    """How many heads and feed-forward neurons to remove from one block."""

    heads: int
    neurons: int

    def __post_init__(self) -> None:
        if self.heads < 0 or self.neurons < 0:
            raise ValueError(f"removal counts must be >= 0, got {self.heads}, {self.neurons}")


@dataclass(frozen=True, slots=True)
class _Targets:
    """What a block's sublayers added in the dense chain."""

    attn: torch.Tensor  # (M, C) attention output projection's output, dense input
    ffn: torch.Tensor  # (M, C) FFN output projection's output
    res: torch.Tensor  # (M, C) the residual stream the FFN output is added to


def _targets(dense: Block, x: torch.Tensor, ctx: ForwardContext) -> _Targets:
    ref = _capture(
        dense,
        x,
        ctx,
        {
            "attn": (dense.attn_out, True),
            "ffn": (_ffn_out(dense), True),
            "res": (_residual(dense), False),
        },
    )
    return _Targets(attn=ref["attn"], ffn=ref["ffn"], res=ref["res"])


def prune_greedy(atom: Atom, removal: Removal, calib: Calibration) -> Atom:
    """A copy of block `atom` without `removal.heads` heads and `removal.neurons` neurons,
    each chosen by `eliminate` on the calibration tokens, its output projections refit.

    Sequential (SparseGPT-style): `calib` holds the dense chain's input (the targets: what the
    dense block's sublayers added) and the pruned chain's input (what the pruned block will
    see), so the refit also absorbs the error of the blocks before; the FFN is chosen on the
    output of the already pruned attention.

    Raises:
        ValueError: not a prunable block, or a count that would remove every head or neuron.
    """
    block = _block(atom)
    x_dense, x_pruned, ctx = calib
    real = _real(x_dense, ctx)
    ref = _targets(block, x_dense, ctx)
    got = _capture(block, x_pruned, ctx, {"attn": (block.attn_out, False)})
    shift = (x_dense - x_pruned).float().reshape(-1, x_dense.shape[-1])
    heads = eliminate(
        got["attn"][real],
        (ref.attn + shift)[real],
        group=block.head_dim,
        remove=removal.heads,
    )
    mid = _rebuilt(block, heads.kept, torch.arange(_ffn_out(block).in_features))
    _set(mid.attn_out, heads)
    got = _capture(
        mid, x_pruned, ctx, {"ffn": (_ffn_out(mid), False), "res": (_residual(mid), False)}
    )
    neurons = eliminate(
        got["ffn"][real],
        (ref.ffn + ref.res - got["res"])[real],
        group=1,
        remove=removal.neurons,
    )
    new = _rebuilt(mid, torch.arange(mid.heads), neurons.kept)
    _set(_ffn_out(new), neurons)
    new.requires_grad_(any(p.requires_grad for p in atom.parameters()))
    return new


def uniform_removal(atom: Atom, *, heads: float, ffn: float) -> Removal:
    """The `heads` fraction of the block's heads and `ffn` of its neurons (rounded, at least
    one of each kept).

    Raises:
        ValueError: not a prunable block, or a fraction outside [0, 1).
    """
    block = _block(atom)
    for name, frac in (("heads", heads), ("ffn", ffn)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"prune fraction {name} must be in [0, 1), got {frac}")
    h, f = block.heads, _ffn_out(block).in_features
    return Removal(min(h - 1, round(h * heads)), min(f - 1, round(f * ffn)))


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
