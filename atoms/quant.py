"""Weight-only quantisation of an atom's Linear layers and embedding tables.

Levels (the spec attr `quant`, with `group` for int4):
- "int8": symmetric int8 per output channel (per row for tables), one fp32 scale per row.
- "int4": asymmetric 4-bit, `group` consecutive inputs per fp16 (scale, minimum) pair, two
  values packed per uint8 (low nibble = even column).

Rule 1: a quantised atom is still an atom: its spec carries `quant` (and `group`), and
`atoms.model.build_atom` calls `quantize_modules` after the family builder, so the module
holds packed buffers of the right shapes and `load_state` fills them from the weight file.
Rule 2: packed weights stay packed in RAM and on disk; a forward dequantises one layer's
weight (or only the looked-up rows of a table) on the fly into the compute dtype, then runs
the dense kernel. torch's own packed kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) were measured 40-80x slower than fp32 on this CPU
(docs/architecture.md §7), so they are not used.
Rule 3: quantising never mutates: `quantize_atom` returns a new atom.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .atom import Atom, AtomSpec, ForwardContext, make_attrs

LEVELS = ("int8", "int4")
GROUPS = (32, 64, 128)
CALIB_ROWS = 4096  # input rows per Linear used to choose its int4 input scales


def spec_quant(spec: AtomSpec) -> tuple[str, int] | None:
    """The (level, group) a spec asks for, or None for a dense atom.

    Raises:
        ValueError: an unknown level or group.
    """
    try:
        level = spec.attr("quant")
    except KeyError:
        return None
    group = spec.attr("group") if level == "int4" else 0
    if level not in LEVELS or (level == "int4" and group not in GROUPS):
        raise ValueError(f"atom {spec.uid}: unknown quantisation {level!r} group {group!r}")
    return str(level), int(group)


def quantized_spec(spec: AtomSpec, level: str, group: int = 64) -> AtomSpec:
    """`spec` with the attrs saying it holds `level`-quantised weights."""
    if level not in LEVELS or (level == "int4" and group not in GROUPS):
        raise ValueError(
            f"quantisation must be one of {LEVELS} (int4 group in {GROUPS}), "
            f"got {level!r} group {group}"
        )
    attrs = {n: v for n, v in spec.attrs if n not in ("quant", "group")}
    attrs["quant"] = level
    if level == "int4":
        attrs["group"] = group
    return dataclasses.replace(spec, attrs=make_attrs(**attrs))


# ------------------------------------------------------------------------- packing


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and fp32 scales (N,), symmetric per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed uint8 (N, K/2), fp16 scales and minima (N, K/group), by
    round-to-nearest (`gptq_int4` when calibration inputs are known)."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).half()
    lo16 = lo.half()
    q = torch.round((g - lo16.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, lo16


def dequant_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def dequant_int4(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    n, half = packed.shape
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, -1, group).to(dtype)
    w = q * scale.to(dtype)[..., None] + low.to(dtype)[..., None]  # (N, K/group, group)
    return w.reshape(n, 2 * half)


# ------------------------------------------------------------------------- modules


class _Packed(nn.Module):
    """Packed (N, K) weight rows: int8 + scale, or int4 + scale + minimum per group."""

    qweight: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor

    def __init__(self, rows: int, cols: int, level: str, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.level, self.group, self.dtype, self.cols = level, group, dtype, cols
        if level == "int8":
            self.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(rows, dtype=torch.float32))
        else:
            self.register_buffer("qweight", torch.zeros(rows, cols // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(rows, cols // group, dtype=torch.float16))
            self.register_buffer("low", torch.zeros(rows, cols // group, dtype=torch.float16))

    def fill(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffers quantising `w` (N, K), by buffer name."""
        if self.level == "int8":
            q, s = quantize_int8(w)
            return {"qweight": q, "scale": s}
        q, s, lo = quantize_int4(w, self.group)
        return {"qweight": q, "scale": s, "low": lo}

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantised rows (all, or those at `index`) in the compute dtype."""
        q, s = self.qweight, self.scale
        if index is not None:
            q, s = q[index], s[index]
        if self.level == "int8":
            return dequant_int8(q, s, self.dtype)
        low = self.low if index is None else self.low[index]
        return dequant_int4(q, s, low, self.group, self.dtype)


class QuantLinear(_Packed):
    """A Linear whose weight is packed; the bias (if any) stays in the compute dtype."""

    def __init__(self, linear: nn.Linear, level: str, group: int, dtype: torch.dtype) -> None:
        super().__init__(linear.out_features, linear.in_features, level, group, dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(torch.zeros(linear.out_features, dtype=dtype), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows(), self.bias)

    def fill_calibrated(self, w: torch.Tensor, x: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The buffers for weight `w`: int4 with GPTQ on inputs `x` (M, K) when given,
        otherwise round-to-nearest (`fill`)."""
        if self.level != "int4" or x is None:
            return self.fill(w)
        q, scale, low = gptq_int4(w, x, self.group)
        return {"qweight": q, "scale": scale, "low": low}


def gptq_int4(
    w: torch.Tensor, x: torch.Tensor, group: int, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2023): quantise the columns of `w` (N, K) one by one, each time
    spreading the rounding error over the columns not yet quantised along the inverse
    Hessian of the layer's inputs `x` (M, K), so the *outputs* x w^T move least. A group's
    (scale, minimum) is taken from the already-corrected weights when its first column comes
    up. Returns what `quantize_int4` returns. Measured on MiniLM: embedding cosine 0.962
    (round-to-nearest, group 32) -> 0.986."""
    w = w.detach().float().clone()
    n, k = w.shape
    x = x.float()
    h = x.T @ x / max(1, x.shape[0])
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.uint8)
    scale = torch.zeros(n, k // group, dtype=torch.float16)
    low = torch.zeros_like(scale)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                g = w1[:, i : i + group]
                scale[:, col // group] = ((g.amax(1) - g.amin(1)) / 15.0).clamp(min=1e-8).half()
                low[:, col // group] = g.amin(1).half()
            s, lo = scale[:, col // group].float(), low[:, col // group].float()
            qc = torch.round((w1[:, i] - lo) / s).clamp(0, 15)
            q[:, col] = qc.to(torch.uint8)
            err[:, i] = (w1[:, i] - (qc * s + lo)) / h1[i, i]
            w1[:, i:] -= err[:, i : i + 1] * h1[i, i:][None, :]
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, low


class QuantEmbedding(_Packed):
    """An embedding table whose rows are packed; a lookup dequantises only the rows it reads."""

    def __init__(self, table: nn.Embedding, level: str, group: int, dtype: torch.dtype) -> None:
        super().__init__(table.num_embeddings, table.embedding_dim, level, group, dtype)
        self.num_embeddings = table.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = self.rows(ids.reshape(-1))
        return flat.reshape(*ids.shape, self.cols)


class QuantTable(_Packed):
    """A (rows, cols) weight matrix an atom uses directly (not through a Linear), packed; the
    atom names such tensors in its class attribute `QUANT_TABLES` and reads `rows()`."""

    def __init__(self, table: torch.Tensor, level: str, group: int, dtype: torch.dtype) -> None:
        super().__init__(table.shape[0], table.shape[1], level, group, dtype)


def _fits(module: nn.Module, level: str, group: int) -> bool:
    if not isinstance(module, nn.Linear | nn.Embedding):
        return False
    cols = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
    return level == "int8" or cols % group == 0


def quantize_modules(atom: Atom) -> list[str]:
    """Replace (in place) the Linear and Embedding children of an atom whose spec asks for
    quantisation with empty packed modules; the names replaced, sorted. A dense spec, or a
    layer whose width is not a multiple of the group, is left as it is."""
    quant = spec_quant(atom.spec)
    if quant is None:
        return []
    level, group = quant
    replaced = []
    for name, module in list(atom.named_modules()):
        if not name or not _fits(module, level, group):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = atom.get_submodule(parent_name)
        dtype = atom.spec.torch_dtype
        new: nn.Module
        if isinstance(module, nn.Linear):
            new = QuantLinear(module, level, group, dtype)
        else:
            new = QuantEmbedding(module, level, group, dtype)
        setattr(parent, child, new)
        replaced.append(name)
    for name in getattr(atom, "QUANT_TABLES", ()):
        table = getattr(atom, name)
        if isinstance(table, torch.Tensor) and (level == "int8" or table.shape[1] % group == 0):
            delattr(atom, name)
            setattr(atom, name, QuantTable(table, level, group, atom.spec.torch_dtype))
            replaced.append(name)
    return sorted(replaced)


Calibration = tuple[torch.Tensor, ForwardContext]  # an atom's input and its context


def linear_inputs(dense: Atom, calib: Calibration) -> dict[str, torch.Tensor]:
    """The inputs each Linear of `dense` sees on `calib`, as (<= CALIB_ROWS, K) by name."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in dense.named_modules():
        if isinstance(module, nn.Linear):

            def keep(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                rows = args[0].detach().reshape(-1, args[0].shape[-1])
                step = max(1, rows.shape[0] // CALIB_ROWS)
                seen[name] = rows[::step][:CALIB_ROWS].float()

            hooks.append(module.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            dense(*calib)
    finally:
        for h in hooks:
            h.remove()
    return seen


def quantized_state(
    dense: Atom, level: str, group: int, calib: Calibration | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of `dense` quantised to `level`: what `quantize_atom` loads."""
    from .model import build_atom  # model imports this module for build_atom's hook

    target = build_atom(quantized_spec(dense.spec, level, group))
    inputs = linear_inputs(dense, calib) if calib is not None and level == "int4" else {}
    state = dict(dense.state_dict())
    for name, module in target.named_modules():
        if not isinstance(module, _Packed):
            continue
        weight = state.pop(name if isinstance(module, QuantTable) else f"{name}.weight")
        if isinstance(module, QuantLinear):
            bufs = module.fill_calibrated(weight, inputs.get(name))
        else:
            bufs = module.fill(weight)
        for buf, value in bufs.items():
            state[f"{name}.{buf}"] = value
    return state


def quantize_atom(
    dense: Atom, level: str, group: int = 64, calib: Calibration | None = None
) -> Atom:
    """A copy of `dense` with its Linear layers and tables quantised to `level` (frozen:
    not for training); int4 Linear layers are rounded by GPTQ on `calib` (the atom's input
    and context) when given, else to nearest.

    Raises:
        ValueError: unknown level or group; the atom is already quantised.
    """
    from .model import build_atom, load_state

    if spec_quant(dense.spec) is not None:
        raise ValueError(f"atom {dense.spec.uid} is already quantised")
    new = build_atom(quantized_spec(dense.spec, level, group))
    state = quantized_state(dense, level, group, calib)
    load_state(new, state, f"quantisation of {dense.spec.uid}")
    new.eval()
    new.requires_grad_(False)
    return new
