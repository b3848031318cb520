"""Llama-style decoder atoms and their loader from a local Hugging Face folder.

The model is cut into `2 + num_hidden_layers` atoms:
index 0 EMBEDDING (ids -> hidden), 1..L BLOCK (RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, both with residual), L+1 LM_HEAD (final RMSNorm + vocabulary projection).

Rule 1: the math follows `transformers`' `LlamaForCausalLM` (v4 and v5 config layouts)
operation for operation, so logits agree within 1e-4 in float32; anything in a config we
do not implement (rope types other than default/linear/llama3, other activations) is a
`ModelFormatError`, never silently approximated.
Rule 2: attention caches live in the session's `SessionCache` (`ctx.cache`), never in the
module, so one hosted block serves many sessions; `kv_layout()` says what a block stores.
Rule 3: positions come from `ctx.positions`, so left-padded batches work when the caller
gives each row positions counting from its first real token and a `pad_mask`.
Rule 4: each atom owns its own weights: with tied embeddings the LM_HEAD atom holds a copy
of the embedding matrix, because the two atoms may live on different hosts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .atom import (
    Atom,
    AtomKind,
    AtomSpec,
    ForwardContext,
    IOKind,
    kept_positions,
    make_attrs,
    make_dims,
    vocab_major,
)
from .cache import KVLayout
from .errors import InputOutOfRange, ModelFormatError, ShapeMismatch, WeightsError
from .model import Model, read_hf_config
from .partition import ConfigValue
from .tokenizer import TextTokenizer

FAMILY = "llama"
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_parameters` in v5 configs, `rope_scaling` in v4).

    Args:
        theta: the base of the rotation frequencies.
        kind: "default", "linear" (positions divided by `factor`) or "llama3".
        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings:
            scaling parameters of "linear" / "llama3" (ignored for "default").
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in _ROPE_TYPES:
            raise ModelFormatError(
                f"rope type {self.kind!r} is not supported; expected one of {_ROPE_TYPES}"
            )
        if not self.theta > 0 or not self.factor > 0:
            raise ModelFormatError(
                f"rope needs theta > 0 and factor > 0, got {self.theta}, {self.factor}"
            )
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ModelFormatError(
                "llama3 rope needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """(head_dim/2,) float32 inverse frequencies, scaled as `kind` says."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (self.theta**exponents)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            return self._llama3(inv)
        return inv

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        # Llama 3.1 "rope_type: llama3": long wavelengths are divided by `factor`, short ones
        # kept, the band between is interpolated (transformers `_compute_llama3_parameters`).
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (old / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """The parts of a Hugging Face Llama `config.json` that define the computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelFormatError(f"llama config {name} must be an int >= 1, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"llama config: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"llama config: head_dim must be even, got {self.head_dim}")

    @classmethod
    def from_hf(cls, raw: Mapping[str, object]) -> LlamaConfig:
        """Parse a Hugging Face `config.json` mapping.

        Raises:
            ModelFormatError: not a Llama config, or one using features we do not implement.
        """
        if raw.get("model_type") != "llama":
            raise ModelFormatError(f"expected model_type 'llama', got {raw.get('model_type')!r}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFormatError(f"llama config: hidden_act must be 'silu', got {act!r}")
        hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
        eos = raw.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        eos_ids = tuple(e for e in eos_list if isinstance(e, int) and not isinstance(e, bool))
        if len(eos_ids) != len(eos_list):
            raise ModelFormatError(f"llama config: eos_token_id must be int(s), got {eos!r}")
        bos = raw.get("bos_token_id")
        if bos is not None and not isinstance(bos, int):
            raise ModelFormatError(f"llama config: bos_token_id must be an int, got {bos!r}")
        return cls(
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", heads),
            head_dim=_int(raw, "head_dim", hidden // heads),
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
            rope=_rope_from_hf(raw),
            max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=bos,
            eos_token_ids=eos_ids,
        )


def _int(raw: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = raw.get(key)
    if value is None and default is not None:  # absent or null: the transformers default
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelFormatError(f"llama config: {key} must be an int, got {value!r}")
    return value


def _float(raw: Mapping[str, object], key: str, default: float) -> float:
    value = raw.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ModelFormatError(f"llama config: {key} must be a number, got {value!r}")
    return float(value)


def _rope_from_hf(raw: Mapping[str, object]) -> RopeConfig:
    # v5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; v4 writes a top-level
    # rope_theta and an optional rope_scaling {"type" | "rope_type", "factor", ...}.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelFormatError(f"llama config: rope parameters must be a mapping, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    known = {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    }
    if kind in _ROPE_TYPES and set(params) - known:
        raise ModelFormatError(
            f"llama config: unsupported rope parameters {sorted(set(params) - known)}"
        )
    if not isinstance(theta, int | float):
        raise ModelFormatError(f"llama config: rope_theta must be a number, got {theta!r}")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    # "factor" is required for linear/llama3 (a missing one fails RopeConfig's check), and
    # llama3 also needs the original context length.
    original = _int(params, "original_max_position_embeddings") if kind == "llama3" else 8192
    return RopeConfig(
        theta=float(theta),
        kind=str(kind),
        factor=_float(params, "factor", math.nan),
        low_freq_factor=_float(params, "low_freq_factor", 1.0),
        high_freq_factor=_float(params, "high_freq_factor", 4.0),
        original_max_position_embeddings=original,
    )


# --------------------------------------------------------------------------- shared math


def attention_mask(ctx: ForwardContext, t_new: int, t_all: int) -> torch.Tensor | None:
    """Boolean (B, 1, T_new, T_all) mask, True where a query may attend; None for "all".

    Queries are the last `t_new` of `t_all` positions. Causal masking allows key j for query
    i when j <= (t_all - t_new) + i; `ctx.pad_mask` (B, T_all) removes padded keys. A row with
    nothing allowed (a padded query with only padding before it) attends everywhere, so it
    stays finite; its output is padding and is never read.

    Raises:
        ShapeMismatch: `ctx.pad_mask` does not cover all `t_all` tokens.
    """
    mask: torch.Tensor | None = None
    if ctx.causal and t_new > 1:
        q = torch.arange(t_all - t_new, t_all).unsqueeze(1)
        mask = (torch.arange(t_all).unsqueeze(0) <= q)[None, None]  # (1, 1, Tn, Ta)
    if ctx.pad_mask is not None:
        if ctx.pad_mask.shape[-1] != t_all:
            raise ShapeMismatch(
                f"pad_mask covers {ctx.pad_mask.shape[-1]} tokens, attention sees {t_all}"
            )
        keys = ctx.pad_mask.bool()[:, None, None, :]  # (B, 1, 1, Ta)
        mask = keys if mask is None else mask & keys
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, spec: AtomSpec
) -> torch.Tensor:
    """Scaled dot-product attention over cached plus new keys (grouped-query aware).

    Args:
        q: (B, H, T, D) queries, already scaled if the caller wants a non-default scale
            (the softmax scale here is 1/sqrt(D)).
        k, v: (B, H_kv, T, D) keys/values of the new tokens; appended to the session cache
            layer of atom `spec.index` when `ctx.cache` is set.

    Returns:
        (B, H, T, D) attention output.

    Raises:
        CacheNotReady: `ctx.cache` has no layer for this atom.
        CacheExhausted: the new tokens do not fit in the layer.
    """
    if ctx.cache is not None:
        layer = ctx.cache.layer(spec.index, spec.uid)
        k, v = layer.append(k.to(layer.dtype), v.to(layer.dtype))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # (B, H_kv, L, D) -> (B, H, L, D), head h reads kv head h // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = attention_mask(ctx, q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (transformers `LlamaRMSNorm`)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device="meta"))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def materialize(module: nn.Module, dtype: torch.dtype) -> None:
    """Turn a module built on the meta device into real CPU tensors of `dtype`.

    Weights become zeros, norm weights ones: building from a spec costs no random init and
    never touches the global RNG; real values come from a state dict or `init_random`.
    """
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    module.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --------------------------------------------------------------------------------- atoms


def _spec(
    cfg: LlamaConfig,
    kind: AtomKind,
    model_id: str,
    index: int,
    dtype: str,
    in_kind: IOKind = IOKind.HIDDEN,
    out_kind: IOKind = IOKind.HIDDEN,
) -> AtomSpec:
    # Everything an atom needs to rebuild itself goes into its spec (dims + attrs), so a host
    # can build a span from specs alone, without the model's config.json.
    dims = make_dims(
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
    )
    r = cfg.rope
    attrs = make_attrs(
        rms_norm_eps=cfg.rms_norm_eps,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        rope_theta=r.theta,
        rope_type=r.kind,
        rope_factor=r.factor,
        rope_low_freq_factor=r.low_freq_factor,
        rope_high_freq_factor=r.high_freq_factor,
        rope_original_max_position_embeddings=r.original_max_position_embeddings,
    )
    return AtomSpec(
        kind=kind,
        model_id=model_id,
        index=index,
        family=FAMILY,
        dims=dims,
        dtype=dtype,
        in_kind=in_kind,
        out_kind=out_kind,
        attrs=attrs,
    )


def _rope_from_spec(spec: AtomSpec) -> RopeConfig:
    return RopeConfig(
        theta=float(spec.attr("rope_theta")),
        kind=str(spec.attr("rope_type")),
        factor=float(spec.attr("rope_factor")),
        low_freq_factor=float(spec.attr("rope_low_freq_factor")),
        high_freq_factor=float(spec.attr("rope_high_freq_factor")),
        original_max_position_embeddings=int(spec.attr("rope_original_max_position_embeddings")),
    )


class LlamaEmbedding(Atom):
    """Token ids (B, T) -> hidden (B, T, C)."""

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        shape = (spec.dim("vocab"), spec.dim("hidden"))
        # _weight skips nn.Embedding's random init (a normal_ on meta costs ~1 s on first use)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape, device="meta"))
        materialize(self, spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        vocab = self.embed_tokens.num_embeddings
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise InputOutOfRange(
                f"atom {self.spec.uid}: token ids must be in [0, {vocab}), "
                f"got [{int(x.min())}, {int(x.max())}]"
            )
        out: torch.Tensor = self.embed_tokens(x)  # (B, T, C)
        return out


class _LlamaAttention(nn.Module):
    """The attention projections of a block (its forward is `LlamaBlock.forward`); the
    attribute names keep transformers' state-dict keys, e.g. `self_attn.q_proj.weight`."""

    def __init__(self, c: int, heads: int, kv_heads: int, d: int, *, bias: bool) -> None:
        super().__init__()
        meta = torch.device("meta")
        self.q_proj = nn.Linear(c, heads * d, bias=bias, device=meta)
        self.k_proj = nn.Linear(c, kv_heads * d, bias=bias, device=meta)
        self.v_proj = nn.Linear(c, kv_heads * d, bias=bias, device=meta)
        self.o_proj = nn.Linear(heads * d, c, bias=bias, device=meta)


class _LlamaMLP(nn.Module):
    """The SwiGLU projections of a block (its forward is `LlamaBlock.forward`); the attribute
    names keep transformers' state-dict keys, e.g. `mlp.gate_proj.weight`."""

    def __init__(self, c: int, f: int, *, bias: bool) -> None:
        super().__init__()
        meta = torch.device("meta")
        self.gate_proj = nn.Linear(c, f, bias=bias, device=meta)
        self.up_proj = nn.Linear(c, f, bias=bias, device=meta)
        self.down_proj = nn.Linear(f, c, bias=bias, device=meta)


class LlamaBlock(Atom):
    """One decoder layer: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))."""

    inv_freq: torch.Tensor  # a non-persistent buffer, registered in __init__

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c, d = spec.dim("hidden"), spec.dim("head_dim")
        self.heads, self.kv_heads, self.head_dim = spec.dim("heads"), spec.dim("kv_heads"), d
        eps = float(spec.attr("rms_norm_eps"))
        self.input_layernorm = RMSNorm(c, eps)
        self.post_attention_layernorm = RMSNorm(c, eps)
        bias = bool(spec.attr("attention_bias"))
        self.self_attn = _LlamaAttention(c, self.heads, self.kv_heads, d, bias=bias)
        f, mb = spec.dim("intermediate"), bool(spec.attr("mlp_bias"))
        self.mlp = _LlamaMLP(c, f, bias=mb)
        materialize(self, spec.torch_dtype)
        # float32 like transformers, whatever the weight dtype; registered after materialize.
        self.register_buffer("inv_freq", _rope_from_spec(spec).inv_freq(d), persistent=False)

    def kv_layout(self) -> KVLayout:
        return KVLayout(kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, k, ctx.positions)
        y = cached_attention(q, k, v, ctx, self.spec)  # (B, H, T, D)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        h = self.post_attention_layernorm(x)
        mlp = self.mlp
        out: torch.Tensor = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return out  # (B, T, C)

    def _rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.shape != q.shape[::2]:
            raise ShapeMismatch(
                f"atom {self.spec.uid}: positions must be (B,T)={tuple(q.shape[::2])}, "
                f"got {tuple(positions.shape)}"
            )
        freqs = positions.float()[:, :, None] * self.inv_freq[None, None, :]  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class LlamaHead(Atom):
    """Final RMSNorm then the vocabulary projection: hidden (B, T, C) -> logits (B, T, V)
    (T' = `ctx.logits_to_keep` positions when set, `atom.kept_positions`)."""

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c = spec.dim("hidden")
        self.norm = RMSNorm(c, float(spec.attr("rms_norm_eps")))
        self.lm_head = nn.Linear(c, spec.dim("vocab"), bias=False, device="meta")
        vocab_major(self.lm_head.weight)  # on meta: no copy
        materialize(self, spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(self.norm(kept_positions(x, ctx)))  # (B, T, V)
        return logits


def build_llama_atoms(cfg: LlamaConfig, *, model_id: str, dtype: str = "float32") -> list[Atom]:
    """Create the (randomly initialised) atoms of a Llama model, in order.

    Args:
        cfg: the model configuration.
        model_id: id stamped into every atom spec.
        dtype: "float32" or "bfloat16".
    """
    n = cfg.num_hidden_layers
    atoms: list[Atom] = [
        LlamaEmbedding(_spec(cfg, AtomKind.EMBEDDING, model_id, 0, dtype, in_kind=IOKind.IDS))
    ]
    atoms += [LlamaBlock(_spec(cfg, AtomKind.BLOCK, model_id, i + 1, dtype)) for i in range(n)]
    head_spec = _spec(cfg, AtomKind.LM_HEAD, model_id, n + 1, dtype, out_kind=IOKind.LOGITS)
    atoms.append(LlamaHead(head_spec))
    return atoms


def llama_atom_from_spec(spec: AtomSpec) -> Atom:
    """Rebuild one atom (random weights) from its spec alone, e.g. on a host loading a span.

    Raises:
        ModelFormatError: the spec is not a Llama atom.
    """
    classes: dict[AtomKind, type[Atom]] = {
        AtomKind.EMBEDDING: LlamaEmbedding,
        AtomKind.BLOCK: LlamaBlock,
        AtomKind.LM_HEAD: LlamaHead,
    }
    if spec.family != FAMILY or spec.kind not in classes:
        raise ModelFormatError(
            f"atom {spec.uid}: expected a {FAMILY} embedding/block/lm_head spec, "
            f"got family {spec.family!r} kind {spec.kind.value}"
        )
    try:
        return classes[spec.kind](spec)
    except KeyError as exc:  # a dim or attr the spec lacks
        raise ModelFormatError(f"atom {spec.uid}: incomplete {FAMILY} spec: {exc}") from None


# -------------------------------------------------------------------------------- loader


def hf_weight_names(cfg: LlamaConfig) -> dict[str, tuple[int, str]]:
    """Map every Hugging Face tensor name to (atom index, parameter name in that atom)."""
    names: dict[str, tuple[int, str]] = {"model.embed_tokens.weight": (0, "embed_tokens.weight")}
    last = cfg.num_hidden_layers + 1
    for i in range(cfg.num_hidden_layers):
        for local in _block_param_names(cfg):
            names[f"model.layers.{i}.{local}"] = (i + 1, local)
    names["model.norm.weight"] = (last, "norm.weight")
    names["lm_head.weight"] = (last, "lm_head.weight")
    return names


def _block_param_names(cfg: LlamaConfig) -> list[str]:
    out = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(f"self_attn.{proj}.weight")
        if cfg.attention_bias:
            out.append(f"self_attn.{proj}.bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(f"mlp.{proj}.weight")
        if cfg.mlp_bias:
            out.append(f"mlp.{proj}.bias")
    return out


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, for `model.safetensors` or a sharded index.

    Raises:
        WeightsError: neither layout is present, or the index names a missing shard.
    """
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: expected a 'weight_map' object")
        files = {name: folder / str(shard) for name, shard in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.exists()})
        if missing:
            raise WeightsError(f"{index}: shard files missing: {missing}")
        return files
    if single.exists():
        with safe_open(str(single), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each file once.

    Raises:
        WeightsError: some names are not in `files` (all of them are listed).
    """
    missing = sorted(n for n in names if n not in files)
    if missing:
        raise WeightsError(
            f"missing tensors ({len(missing)}): {', '.join(missing[:12])}"
            + (" ..." if len(missing) > 12 else "")
        )
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, group in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as fh:
            for name in group:
                out[name] = fh.get_tensor(name)
    return out


def _load_state(atom: Atom, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` (parameter name -> tensor) into `atom`, checking names and shapes.

    Raises:
        WeightsError: a parameter of the atom is missing from `tensors` or has another shape.
    """
    params = dict(atom.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: atom {atom.spec.uid} is missing tensors {missing}")
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[name]
            if t.shape != param.shape:
                raise WeightsError(
                    f"{source}: tensor {name} of atom {atom.spec.uid}: expected shape "
                    f"{tuple(param.shape)}, got {tuple(t.shape)}"
                )
            param.copy_(t.to(param.dtype))


def load_llama_atoms(
    folder: Path, *, model_id: str, dtype: str = "float32"
) -> tuple[LlamaConfig, list[Atom]]:
    """Load a Llama checkpoint from a local Hugging Face folder into atoms.

    Args:
        folder: holds config.json and model.safetensors, or a sharded
            model-0000x-of-0000y.safetensors set with model.safetensors.index.json.
        model_id: id stamped into every atom spec.
        dtype: "float32" or "bfloat16" (weights are converted on load).

    Returns:
        The parsed config and the atoms, in execution order.

    Raises:
        ModelFormatError: unsupported config or unexpected tensors.
        WeightsError: missing files or tensors (named), or wrong tensor shapes.
    """
    cfg = LlamaConfig.from_hf(read_hf_config(folder))
    eos = generation_eos_ids(folder)
    if eos is not None:
        cfg = replace(cfg, eos_token_ids=eos)
    files = safetensors_files(folder)
    mapping = hf_weight_names(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" not in files:
        mapping["model.embed_tokens.weight@head"] = mapping.pop("lm_head.weight")
    ignorable = "rotary_emb.inv_freq"  # stored by old checkpoints, recomputed here
    unexpected = sorted(n for n in files if n not in mapping and not n.endswith(ignorable))
    if unexpected:
        raise ModelFormatError(
            f"{folder}: tensors not part of a Llama model: {', '.join(unexpected[:12])}"
        )
    hf_names = sorted({n.split("@")[0] for n in mapping})
    tensors = read_tensors(files, hf_names)
    atoms = build_llama_atoms(cfg, model_id=model_id, dtype=dtype)
    per_atom: list[dict[str, torch.Tensor]] = [{} for _ in atoms]
    for hf_name, (index, local) in mapping.items():
        per_atom[index][local] = tensors[hf_name.split("@")[0]]
    for atom, state in zip(atoms, per_atom, strict=True):
        _load_state(atom, state, str(folder))
    return cfg, atoms


def generation_eos_ids(folder: Path) -> tuple[int, ...] | None:
    """The end-of-sequence ids `generation_config.json` names (int or list), which is what
    `transformers`' `generate` stops at; None when the file or its `eos_token_id` is absent
    (then config.json's `eos_token_id` applies).

    Raises:
        ModelFormatError: the file is not JSON, or its eos ids are not ints >= 0.
    """
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelFormatError(f"{path}: eos_token_id must be int(s) >= 0, got {eos!r}")
    return tuple(ids)


def config_dict(cfg: LlamaConfig) -> dict[str, ConfigValue]:
    """The flat name -> scalar form of `cfg` kept in `Model.config` and manifests.

    eos ids are joined with commas ("2" or "128001,128009"); "" when there are none.
    """
    r = cfg.rope
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": r.theta,
        "rope_type": r.kind,
        "rope_factor": r.factor,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": ",".join(str(i) for i in cfg.eos_token_ids),
    }


def eos_token_ids(model: Model) -> tuple[int, ...]:
    """The eos ids a Llama `Model` records (for `GenerationParams.stop_token_ids`)."""
    raw = model.config.get("eos_token_ids")
    return tuple(int(i) for i in str(raw).split(",") if i) if raw else ()


def load_llama(
    folder: Path, *, model_id: str, dtype: str = "float32", max_length: int | None = None
) -> Model:
    """Load a local Hugging Face Llama folder as a `Model` (family "llama").

    Args:
        folder: config.json + model.safetensors (or a sharded set with its index);
            tokenizer.json is optional (the model then has no tokenizer).
        model_id: id stamped into every atom spec.
        dtype: "float32" or "bfloat16".
        max_length: tokenizer truncation; default max_position_embeddings.

    Raises:
        ModelFormatError, WeightsError: as `load_llama_atoms`.
    """
    cfg, atoms = load_llama_atoms(folder, model_id=model_id, dtype=dtype)
    tokenizer = None
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        tokenizer = TextTokenizer.from_file(
            path, max_length=max_length or cfg.max_position_embeddings, padding_side="left"
        )
    return Model(
        model_id=model_id, family=FAMILY, config=config_dict(cfg), atoms=atoms, tokenizer=tokenizer
    )


def init_random(atom: Atom, generator: torch.Generator, *, std: float = 0.02) -> Atom:
    """Fill a Llama atom's weights in place: N(0, std) matrices, zero biases, unit norms.

    For tests and fresh models; draws only from `generator`.
    """
    with torch.no_grad():
        for name, p in atom.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, generator=generator) * std).to(p.dtype))
    return atom
