"""Nexus 1.1: a causal LM grown on a pretrained encoder (BERT/MiniLM) base.

Atoms, in order (B = batch, T = tokens, C = base hidden size, V = base vocabulary):

    0        BERT EMBEDDING    ids (B, T) -> (B, T, C)         base, frozen by default
    1..L     BERT BLOCK        (B, T, C) -> (B, T, C)          base, run CAUSALLY with KV cache
    L+1      POSITION          h + PE(position)                sinusoidal or learned
    L+2..    NEXUS BLOCK x N   see `NexusBlock`                KV cache
    last     LM_HEAD           LayerNorm then Linear(C, V)     logits over the base tokenizer

Rule 1: the base atoms are exactly `atoms/bert.py`'s, so a base span is hosted and cached
like any BERT span; every atom runs with `ctx.causal` so generation decodes one token at a
time through base and Nexus blocks alike.
Rule 2: everything an atom needs to rebuild itself is in its spec (dims + attrs); the saved
folder (config.json + model.safetensors + tokenizer.json) holds every atom's weights under
`atoms.<index>.<param>`, so a load needs no base folder.
Rule 3: fresh Nexus weights come from an explicit `torch.Generator(seed)`: the same seed
builds the same model; the global RNG is never used.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import bert
from .atom import (
    Atom,
    AtomKind,
    AtomSpec,
    ForwardContext,
    IOKind,
    build_from_table,
    dropout,
    kept_positions,
    make_attrs,
    make_dims,
    vocab_major,
)
from .cache import KVLayout
from .errors import InputOutOfRange, ModelFormatError, WeightsError
from .llama import attention_mask, materialize
from .minilm import minilm_dir
from .model import Model, load_model, save_model
from .partition import ConfigValue, ModelManifest
from .quant import QuantTable
from .tokenizer import TextTokenizer

FAMILY = "nexus"
NEXUS_VERSION = "1.1"
ARCHITECTURE = "NexusForCausalLM"
POSITION_KINDS = ("sinusoidal", "learned")
MAX_LOG_TEMPERATURE = math.log(100.0)  # cap of the per-head logit scale (as CLIP's)


@dataclass(frozen=True, slots=True)
class NexusConfig:
    """The Nexus part of the model (the base brings hidden size and vocabulary).

    Args:
        blocks: number of Nexus blocks (N >= 1).
        heads: attention heads per block; must divide the base hidden size.
        intermediate: GEGLU hidden width of the feed-forward.
        position: "sinusoidal" (fixed) or "learned" positional encoding.
        max_positions: longest sequence (positions must stay below it; the BERT base also
            caps it at its own max_position_embeddings).
        layer_norm_eps: eps of every Nexus LayerNorm.
        freeze_base: set requires_grad False on the base atoms' parameters.
        tie_head: the output projection reuses the base's word embeddings, frozen (see
            `NexusHead`); False gives a full trainable Linear(C, V).
    """

    blocks: int = 2
    heads: int = 6
    intermediate: int = 768
    position: str = "sinusoidal"
    max_positions: int = 512
    layer_norm_eps: float = 1e-5
    freeze_base: bool = True
    tie_head: bool = True

    def __post_init__(self) -> None:
        for name in ("blocks", "heads", "intermediate", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"nexus config {name} must be an int >= 1, got {value!r}")
        if self.position not in POSITION_KINDS:
            raise ValueError(
                f"nexus config position must be one of {POSITION_KINDS}, got {self.position!r}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"nexus config layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> NexusConfig:
        """Parse the `nexus` section of a saved config.json.

        Raises:
            ModelFormatError: unknown keys or invalid values.
        """
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModelFormatError(f"nexus config: unknown keys {unknown}")
        try:
            return cls(**raw)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"nexus config: {exc}") from None


# ------------------------------------------------------------------------------ atoms


def _spec(
    kind: AtomKind,
    model_id: str,
    index: int,
    dtype: str,
    dims: dict[str, int],
    attrs: Mapping[str, bool | int | float | str],
    *,
    out_kind: IOKind = IOKind.HIDDEN,
) -> AtomSpec:
    return AtomSpec(
        kind,
        model_id,
        index,
        FAMILY,
        make_dims(**dims),
        dtype,
        IOKind.HIDDEN,
        out_kind,
        make_attrs(**attrs),
    )


def sinusoidal_table(positions: torch.Tensor, width: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same) (Vaswani et al. §3.5).

    Args:
        positions: (B, T) int64 positions.
        width: C (even).

    Returns:
        (B, T, C) float32 encodings.
    """
    i = torch.arange(0, width, 2, dtype=torch.float32)
    angles = positions.float()[..., None] / torch.pow(10000.0, i / width)  # (B, T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave


class NexusPosition(Atom):
    """hidden (B, T, C) -> hidden + PE(ctx.positions); PE is fixed or a learned table."""

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        self.kind = str(spec.attr("position"))
        if self.kind not in POSITION_KINDS:
            raise ModelFormatError(f"atom {spec.uid}: position kind {self.kind!r} unknown")
        c, self.max_positions = spec.dim("hidden"), spec.dim("max_positions")
        if c % 2:
            raise ModelFormatError(f"atom {spec.uid}: hidden must be even, got {c}")
        if self.kind == "learned":
            shape = (self.max_positions, c)  # _weight: no random init (see LlamaEmbedding)
            self.table = nn.Embedding(*shape, _weight=torch.empty(shape, device="meta"))
        materialize(self, spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        pos = ctx.positions  # (B, T)
        if pos.numel() and int(pos.max()) >= self.max_positions:
            raise InputOutOfRange(
                f"atom {self.spec.uid}: positions must be < {self.max_positions}, "
                f"got {int(pos.max())}"
            )
        if self.kind == "learned":
            out: torch.Tensor = x + self.table(pos)  # (B, T, C)
            return out
        return x + sinusoidal_table(pos, x.shape[-1]).to(x.dtype)


class NexusBlock(Atom):
    """Pre-LN block with per-head dynamically scaled attention and a GEGLU feed-forward.

    With a = LN_1(x), per head h (D = C/H), per token t:

        A_h   = softmax( exp(min(tau_h, ln 100)) * (q_h k_h^T) / sqrt(D) + causal/pad mask ) v_h
        g_t,h = 2 * sigmoid(a_t . w_h + b_h)                     (dynamic gate, in (0, 2))
        x'    = x + W_o concat_h(g_t,h * A_h[t])
        m     = LN_2(x')
        out   = x' + W_down( GELU(W_gate m) * (W_up m) )

    tau (H,) is a learned per-head log-temperature of the attention logits; w (C, H) and b (H,)
    give each head a learned, input-dependent output gain. At initialisation tau = w = b = 0,
    so the block starts as plain multi-head attention (every gain exactly 1).
    """

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c, self.heads, f = spec.dim("hidden"), spec.dim("heads"), spec.dim("intermediate")
        # head_dim is set only by structured pruning (atoms/prune.py): heads * head_dim < c
        if not spec.dim_or("head_dim", 0) and c % self.heads:
            raise ModelFormatError(
                f"atom {spec.uid}: hidden {c} is not a multiple of heads {self.heads}"
            )
        self.head_dim = spec.dim_or("head_dim", c // self.heads)
        inner = self.heads * self.head_dim
        eps = float(spec.attr("eps"))
        self.attn_norm = nn.LayerNorm(c, eps=eps, device="meta")
        self.qkv = nn.Linear(c, 3 * inner, device="meta")
        self.attn_out = nn.Linear(inner, c, device="meta")
        self.head_log_temperature = nn.Parameter(torch.zeros(self.heads, device="meta"))
        self.head_gate = nn.Linear(c, self.heads, device="meta")
        self.ffn_norm = nn.LayerNorm(c, eps=eps, device="meta")
        self.ffn_gate = nn.Linear(c, f, device="meta")
        self.ffn_up = nn.Linear(c, f, device="meta")
        self.ffn_down = nn.Linear(f, c, device="meta")
        materialize(self, spec.torch_dtype)

    def kv_layout(self) -> KVLayout:
        return KVLayout(kv_heads=self.heads, head_dim=self.head_dim, dtype=self.spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        h, d = self.heads, self.head_dim
        a = self.attn_norm(x)
        q, k, v = self.qkv(a).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        temperature = self.head_log_temperature.clamp(max=MAX_LOG_TEMPERATURE).exp()  # (H,)
        q = q * temperature.view(1, h, 1, 1)  # scales the logits q.k of head h
        if ctx.cache is not None:
            layer = ctx.cache.layer(self.spec.index, self.spec.uid)
            k, v = layer.append(k.to(layer.dtype), v.to(layer.dtype))  # (B, H, L, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = attention_mask(ctx, t, k.shape[2])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        gate = 2 * torch.sigmoid(self.head_gate(a))  # (B, T, H)
        y = y.transpose(1, 2) * gate.unsqueeze(-1)  # (B, T, H, D)
        x = x + dropout(self.attn_out(y.reshape(b, t, h * d)), ctx, self.spec, 0)
        m = self.ffn_norm(x)
        ffn = self.ffn_down(F.gelu(self.ffn_gate(m)) * self.ffn_up(m))
        out: torch.Tensor = x + dropout(ffn, ctx, self.spec, 1)
        return out  # (B, T, C)


class NexusHead(Atom):
    """hidden (B, T, C) -> logits (B, T, V): final LayerNorm, then the output projection
    (of the last `ctx.logits_to_keep` positions when set, `atom.kept_positions`).

    Untied (attr tied False): Linear(C, V) without bias, all trainable.
    Tied (attr tied True): logits = (W LN(x)) E^T + b, where E (V, C) is a frozen copy of the
    base's word embeddings (`table`, requires_grad False), W (C, C) a trainable projection
    started at the identity and b (V,) a trainable bias: 0.2 M trainable parameters instead of
    V x C = 11.7 M, and the output space is the one the base was pretrained in.
    """

    QUANT_TABLES = ("table",)  # a quantised head packs the tied table (atoms/quant.py)

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c, v = spec.dim("hidden"), spec.dim("vocab")
        self.tied = is_tied(spec)
        self.norm = nn.LayerNorm(c, eps=float(spec.attr("eps")), device="meta")
        if self.tied:
            self.proj = nn.Linear(c, c, bias=False, device="meta")
            self.bias = nn.Parameter(torch.zeros(v, device="meta"))
            self.table = nn.Parameter(torch.zeros(v, c, device="meta"), requires_grad=False)
        else:
            self.proj = nn.Linear(c, v, bias=False, device="meta")
        vocab_major(self.table if self.tied else self.proj.weight)  # on meta: no copy
        materialize(self, spec.torch_dtype)
        if self.tied:
            self.table.requires_grad_(False)  # frozen: the base's word embeddings

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h: torch.Tensor = self.proj(self.norm(kept_positions(x, ctx)))
        if not self.tied:
            return h  # (B, T, V)
        table = self.table.rows() if isinstance(self.table, QuantTable) else self.table
        logits: torch.Tensor = F.linear(h, table.to(h.dtype), self.bias.to(h.dtype))
        return logits  # (B, T, V)


def is_tied(spec: AtomSpec) -> bool:
    """Whether a Nexus head spec ties its output to the base's word embeddings."""
    try:
        return bool(spec.attr("tied"))
    except KeyError:
        return False  # specs written before the attribute existed


_CLASSES: dict[AtomKind, type[Atom]] = {
    AtomKind.POSITION: NexusPosition,
    AtomKind.BLOCK: NexusBlock,
    AtomKind.LM_HEAD: NexusHead,
}


def nexus_atom_from_spec(spec: AtomSpec) -> Atom:
    """Rebuild one Nexus-family atom (position, block, head) from its spec, zero weights.

    Raises:
        ModelFormatError: not a Nexus atom spec, or one missing a dim/attr.
    """
    return build_from_table(spec, FAMILY, _CLASSES)


def nexus_specs(
    cfg: NexusConfig,
    *,
    hidden: int,
    vocab: int,
    first_index: int,
    model_id: str,
    dtype: str = "float32",
) -> list[AtomSpec]:
    """Specs of the Nexus part (position, N blocks, head), numbered from `first_index`.

    Raises:
        ModelFormatError: `cfg.heads` does not divide `hidden`.
    """
    if hidden % cfg.heads:
        raise ModelFormatError(
            f"nexus: base hidden size {hidden} is not a multiple of heads {cfg.heads}"
        )
    eps = {"eps": cfg.layer_norm_eps}
    specs = [
        _spec(
            AtomKind.POSITION,
            model_id,
            first_index,
            dtype,
            {"hidden": hidden, "max_positions": cfg.max_positions},
            {"position": cfg.position},
        )
    ]
    for i in range(cfg.blocks):
        specs.append(
            _spec(
                AtomKind.BLOCK,
                model_id,
                first_index + 1 + i,
                dtype,
                {"heads": cfg.heads, "hidden": hidden, "intermediate": cfg.intermediate},
                eps,
            )
        )
    specs.append(
        _spec(
            AtomKind.LM_HEAD,
            model_id,
            first_index + 1 + cfg.blocks,
            dtype,
            {"hidden": hidden, "vocab": vocab},
            {**eps, "tied": cfg.tie_head},
            out_kind=IOKind.LOGITS,
        )
    )
    return specs


def init_random(atom: Atom, generator: torch.Generator, *, residual_layers: int) -> Atom:
    """Fill a Nexus atom's weights in place (GPT-2 scheme, from `generator` only).

    Matrices N(0, 0.02); the projections back into the residual stream (attn_out, ffn_down)
    N(0, 0.02 / sqrt(2 * residual_layers)); biases 0; norm weights 1; the per-head scaling
    parameters (log-temperature, gate) 0, so the block starts as plain attention.
    """
    out_std = 0.02 / math.sqrt(2 * residual_layers)
    with torch.no_grad():
        for name, p in atom.named_parameters():
            if isinstance(atom, NexusHead) and atom.tied and name in ("proj.weight", "table"):
                if name == "proj.weight":
                    p.copy_(torch.eye(p.shape[0], dtype=p.dtype))  # table is set by the builder
            elif name.startswith(("head_log_temperature", "head_gate")) or name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                std = out_std if name.startswith(("attn_out", "ffn_down")) else 0.02
                p.copy_((torch.randn(p.shape, generator=generator) * std).to(p.dtype))
    return atom


# ------------------------------------------------------------------- build, save, load


def build_nexus(
    base_folder: Path | None,
    cfg: NexusConfig,
    seed: int,
    *,
    model_id: str = "nexus-1.1",
    dtype: str = "float32",
) -> Model:
    """A Nexus 1.1 model over a pretrained BERT base, with freshly initialised Nexus atoms.

    Args:
        base_folder: a Hugging Face BERT folder (config.json, model.safetensors,
            tokenizer.json); None for the bundled all-MiniLM-L6-v2.
        cfg: the Nexus part's configuration.
        seed: seeds the `torch.Generator` that initialises the Nexus atoms.
        model_id: the id of the new model (every atom's uid starts with it).
        dtype: "float32" or "bfloat16".

    Returns:
        A `Model` of family "nexus" whose tokenizer is the base's (left padding); base
        parameters have requires_grad False when `cfg.freeze_base`.

    Raises:
        ModelFormatError, WeightsError: a bad base folder; heads not dividing the base width;
            `cfg.max_positions` beyond the base's position table.
    """
    if base_folder is None:
        base_folder = minilm_dir()  # the bundled default base
    base = bert.load_bert(Path(base_folder), model_id=model_id, dtype=dtype, pooling=False)
    hidden = _config_int(base, "hidden_size")
    limit = _config_int(base, "max_position_embeddings")
    if cfg.max_positions > limit:
        raise ModelFormatError(
            f"nexus: max_positions {cfg.max_positions} exceeds the base's {limit} positions"
        )
    if base.tokenizer is None:
        raise ModelFormatError(f"nexus: base folder {base_folder} has no tokenizer.json")
    vocab = base.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(seed)
    specs = nexus_specs(
        cfg, hidden=hidden, vocab=vocab, first_index=len(base.atoms), model_id=model_id, dtype=dtype
    )
    fresh = [
        init_random(nexus_atom_from_spec(s), generator, residual_layers=cfg.blocks) for s in specs
    ]
    head = fresh[-1]
    if isinstance(head, NexusHead) and head.tied:
        word = dict(base.atoms[0].named_parameters())["word.weight"]
        with torch.no_grad():
            head.table.copy_(word.to(head.table.dtype))
    sep = base.tokenizer.token_to_id("[SEP]")  # the BERT vocabulary's end of a sequence
    config: dict[str, ConfigValue] = {
        "nexus_version": NEXUS_VERSION,
        "architecture": ARCHITECTURE,
        "base_layers": len(base.atoms) - 1,
        "hidden_size": hidden,
        "vocab_size": vocab,
        **{f"base_{k}": v for k, v in base.config.items()},
        **asdict(cfg),
        # Generation stops at [SEP] (102 in MiniLM's vocabulary), as it ends every sequence
        # the base was trained on; same comma-separated form as Llama's `eos_token_ids`.
        "eos_token_ids": "" if sep is None else str(sep),
    }
    tokenizer = TextTokenizer.from_json(
        base.tokenizer.to_json(), max_length=cfg.max_positions, padding_side="left"
    )
    model = Model(
        model_id=model_id,
        family=FAMILY,
        config=config,
        atoms=[*base.atoms, *fresh],
        tokenizer=tokenizer,
    )
    return _apply_freeze(model)


def nexus_config_of(model: Model) -> NexusConfig:
    """The `NexusConfig` recorded in a Nexus model's config.

    Raises:
        ModelFormatError: not a Nexus 1.1 model.
    """
    version = model.config.get("nexus_version")
    if model.family != FAMILY or version != NEXUS_VERSION:
        raise ModelFormatError(
            f"model {model.model_id}: expected family {FAMILY!r} version {NEXUS_VERSION}, "
            f"got family {model.family!r} version {version!r}"
        )
    fields = NexusConfig.__dataclass_fields__
    return NexusConfig.from_dict({k: v for k, v in model.config.items() if k in fields})


def base_atom_count(model: Model) -> int:
    """How many leading atoms are the pretrained base (embedding + BERT layers)."""
    return _config_int(model, "base_layers") + 1


def _config_int(model: Model, key: str) -> int:
    value = model.config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelFormatError(
            f"model {model.model_id}: config {key} must be an int, got {value!r}"
        )
    return value


def _apply_freeze(model: Model) -> Model:
    freeze = nexus_config_of(model).freeze_base
    for atom in model.atoms[: base_atom_count(model)]:
        atom.requires_grad_(not freeze)
    head = model.atoms[-1]
    if isinstance(head, NexusHead) and head.tied:
        head.table.requires_grad_(False)
    return model


def save_nexus(model: Model, folder: Path) -> ModelManifest:
    """Save a Nexus model as a model folder, plus a Hugging Face style `config.json`.

    The folder is `save_model`'s layout (manifest.json, weights/<digest>.safetensors per
    atom, tokenizer.json copied from the base) and config.json with
    `"architectures": ["NexusForCausalLM"]` and `"nexus_version": "1.1"`.

    Raises:
        ModelFormatError: `model` is not a Nexus 1.1 model.
    """
    nexus_config_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = save_model(model, folder)
    hf = {"architectures": [ARCHITECTURE], "model_type": FAMILY, **dict(model.config)}
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return manifest


def load_nexus(folder: Path) -> Model:
    """Load a folder written by `save_nexus` (no base folder needed).

    Raises:
        ModelFormatError: not a Nexus 1.1 folder (config.json or manifest).
        WeightsError: a weight or tokenizer file is missing or corrupt.
    """
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"nexus folder {folder} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    if (
        not isinstance(hf, Mapping)
        or hf.get("architectures") != [ARCHITECTURE]
        or (hf.get("nexus_version") != NEXUS_VERSION)
    ):
        got = (hf.get("architectures"), hf.get("nexus_version")) if isinstance(hf, Mapping) else hf
        raise ModelFormatError(
            f"{folder / 'config.json'}: expected architectures [{ARCHITECTURE!r}] and "
            f"nexus_version {NEXUS_VERSION!r}, got {got!r}"
        )
    return _apply_freeze(load_model(folder))


# ------------------------------------------------------------------- shipped weights

SHIPPED_FILE = "nexus-1.1.safetensors"


def shipped_weights_path() -> Path:
    """The trained Nexus 1.1 weights the project ships (`data/models/` at the repository
    root; provenance, command and metrics in `data/models/README.md`).

    Raises:
        WeightsError: the file is absent (an installed wheel does not carry data/).
    """
    path = Path(__file__).resolve().parents[1] / "data" / "models" / SHIPPED_FILE
    if not path.is_file():
        raise WeightsError(
            f"the trained Nexus 1.1 weights {path} are missing: they ship in the "
            "repository (data/models/); run from a checkout"
        )
    return path


def trainable_tensors(model: Model) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by absolute name ("atoms.<index>.<param>")."""
    return {
        f"atoms.{a.spec.index}.{n}": p.detach()
        for a in model.atoms
        for n, p in a.named_parameters()
        if p.requires_grad
    }


def load_shipped(model: Model, path: Path, sha256: str) -> Model:
    """Write the shipped trained tensors into a freshly built Nexus 1.1 `model` (in place).

    The file holds exactly the model's trainable parameters (bf16 or fp32), named as
    `trainable_tensors` names them; its SHA-256 must equal `sha256`.

    Raises:
        WeightsError: the file's digest differs, or its tensors do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != sha256:
        raise WeightsError(f"{path}: expected SHA-256 {sha256}, got {got} (corrupt or replaced)")
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError) as exc:
        raise WeightsError(f"{path}: not a safetensors file: {exc}") from None
    expected = trainable_tensors(model)
    if set(tensors) != set(expected):
        raise WeightsError(
            f"{path}: tensors {sorted(set(tensors) ^ set(expected))[:4]} do not "
            f"fit {model.model_id}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = expected[name]
            if tuple(value.shape) != tuple(target.shape):
                raise WeightsError(
                    f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
    return model
