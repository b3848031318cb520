"""BERT family: embedding, encoder-layer, pooling and classifier-head atoms, and the loader.

A BERT model is cut into `1 + num_hidden_layers (+ 1 pooling) (+ 1 head)` atoms:
index 0 EMBEDDING (ids -> hidden: word + position + token type, LayerNorm), 1..L BLOCK
(post-LN encoder layer: self-attention + feed-forward, each with residual and LayerNorm),
then optionally POOLING (masked mean, optional L2 normalisation: sentence-transformers'
`Pooling(mean)` + `Normalize`) and CLS_HEAD (Linear on the pooled vector).

Rule 1: the math follows `transformers`' `BertModel` operation for operation, so hidden
states agree within 1e-4 in float32; configs using features we do not implement (relative
position embeddings, unknown activations) are a `ModelFormatError`.
Rule 2: everything an atom needs to rebuild itself is in its spec (dims + attrs), so a host
builds a span from specs alone (`build_atom`) and then loads its weights.
Rule 3: a `BertLayer` is causal and cached only when the caller says so (`ctx.causal`,
`ctx.cache`): the same module serves bidirectional embedding jobs and, for the Nexus
family, a causal base LM with a per-session KV cache.
Rule 4: modules are built without touching the global RNG: weights start at zero
(`build_atom`) until a state dict is loaded or `init_random` is called with a generator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .atom import (
    Atom,
    AtomKind,
    AtomSpec,
    ForwardContext,
    IOKind,
    build_from_table,
    make_attrs,
    make_dims,
)
from .cache import KVLayout
from .errors import (
    InputOutOfRange,
    ModelFormatError,
    ShapeMismatch,
    UnsupportedOperation,
    WeightsError,
)
from .model import Model, load_state, read_hf_config
from .tokenizer import TextTokenizer

if TYPE_CHECKING:
    from collections.abc import Mapping

FAMILY = "bert"
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The parts of a Hugging Face BERT `config.json` that define the computation."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelFormatError(f"bert config {name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelFormatError(
                f"bert config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelFormatError(
                f"bert config: hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}"
            )

    @classmethod
    def from_hf(cls, raw: Mapping[str, object]) -> BertConfig:
        """Parse a Hugging Face `config.json` mapping.

        Raises:
            ModelFormatError: not a BERT config, or one using features we do not implement.
        """
        if raw.get("model_type") != "bert":
            raise ModelFormatError(f"expected model_type 'bert', got {raw.get('model_type')!r}")
        pos = raw.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ModelFormatError(f"bert config: only absolute positions, got {pos!r}")
        try:
            return cls(**{f: raw[f] for f in cls.__dataclass_fields__ if f in raw})  # type: ignore[arg-type]
        except TypeError as exc:
            raise ModelFormatError(f"bert config is incomplete: {exc}") from None

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh")  # gelu_new / gelu_pytorch_tanh


class ZeroLinear(nn.Linear):
    """`nn.Linear` whose initial weights are zeros: no RNG and no init cost, because the real
    weights always come from a state dict (or `init_random`)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _table(rows: int, width: int, dtype: torch.dtype) -> nn.Embedding:
    # Given as `_weight` so nn.Embedding skips its RNG init (same idea as ZeroLinear).
    return nn.Embedding(rows, width, _weight=torch.zeros(rows, width, dtype=dtype))


# ------------------------------------------------------------------------------ specs


def embedding_spec(cfg: BertConfig, *, model_id: str, dtype: str = "float32") -> AtomSpec:
    return AtomSpec(
        AtomKind.EMBEDDING,
        model_id,
        0,
        FAMILY,
        make_dims(
            hidden=cfg.hidden_size,
            max_positions=cfg.max_position_embeddings,
            type_vocab=cfg.type_vocab_size,
            vocab=cfg.vocab_size,
        ),
        dtype,
        IOKind.IDS,
        IOKind.HIDDEN,
        make_attrs(eps=cfg.layer_norm_eps),
    )


def layer_spec(cfg: BertConfig, *, model_id: str, index: int, dtype: str = "float32") -> AtomSpec:
    return AtomSpec(
        AtomKind.BLOCK,
        model_id,
        index,
        FAMILY,
        make_dims(
            heads=cfg.num_attention_heads,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
        ),
        dtype,
        IOKind.HIDDEN,
        IOKind.HIDDEN,
        make_attrs(act=cfg.hidden_act, eps=cfg.layer_norm_eps),
    )


def pooling_spec(
    *,
    model_id: str,
    index: int,
    hidden: int,
    normalize: bool,
    dtype: str = "float32",
    family: str = FAMILY,
) -> AtomSpec:
    return AtomSpec(
        AtomKind.POOLING,
        model_id,
        index,
        family,
        make_dims(hidden=hidden),
        dtype,
        IOKind.HIDDEN,
        IOKind.POOLED,
        make_attrs(mode="mean", normalize=normalize),
    )


def head_spec(
    *,
    model_id: str,
    index: int,
    hidden: int,
    classes: int,
    dtype: str = "float32",
    family: str = FAMILY,
) -> AtomSpec:
    return AtomSpec(
        AtomKind.CLS_HEAD,
        model_id,
        index,
        family,
        make_dims(classes=classes, hidden=hidden),
        dtype,
        IOKind.POOLED,
        IOKind.LOGITS,
    )


# ------------------------------------------------------------------------------ atoms


class BertEmbedding(Atom):
    """Token ids (B, T) -> hidden (B, T, C); token types from `ctx.extras["token_type_ids"]`."""

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c = spec.dim("hidden")
        dt = spec.torch_dtype
        self.word = _table(spec.dim("vocab"), c, dt)
        self.position = _table(spec.dim("max_positions"), c, dt)
        self.token_type = _table(spec.dim("type_vocab"), c, dt)
        self.norm = nn.LayerNorm(c, eps=float(spec.attr("eps")), dtype=dt)

    def check_input(self, x: torch.Tensor) -> None:
        """Base checks, plus every id inside the vocabulary.

        Raises:
            ShapeMismatch, DtypeMismatch, InputOutOfRange: naming this atom's uid.
        """
        super().check_input(x)
        vocab = self.spec.dim("vocab")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise InputOutOfRange(
                f"atom {self.spec.uid}: token ids must be in [0, {vocab}), "
                f"got [{int(x.min())}, {int(x.max())}]"
            )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        positions = ctx.positions  # (B, T)
        if positions.shape != x.shape:
            raise ShapeMismatch(
                f"atom {self.spec.uid}: positions {tuple(positions.shape)} do not match "
                f"ids {tuple(x.shape)}"
            )
        limit = self.spec.dim("max_positions")
        if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < limit:
            raise InputOutOfRange(
                f"atom {self.spec.uid}: positions must be in [0, {limit}), "
                f"got [{int(positions.min())}, {int(positions.max())}]"
            )
        types = ctx.extras.get("token_type_ids")
        if types is None:
            types = torch.zeros_like(x)
        h = self.word(x) + self.token_type(types)  # (B, T, C), HF adds in this order
        h = h + self.position(positions)
        out: torch.Tensor = self.norm(h)
        return out


def attention_allowed(ctx: ForwardContext, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Boolean (B|1, 1, q_len, kv_len) mask, True where a query may attend; None for "all".

    The queries are the last `q_len` of `kv_len` cached-plus-new tokens. `ctx.causal` lets
    query i see key j only when j <= (kv_len - q_len) + i; `ctx.pad_mask` (B, kv_len) hides
    padded keys. A row left with nothing to see (a padded query before any real token) sees
    everything instead, so it stays finite; its output is padding and never read.

    Raises:
        ShapeMismatch: `ctx.pad_mask` does not cover `kv_len` tokens.
    """
    allowed: torch.Tensor | None = None
    if ctx.causal and q_len > 1:  # one new query may see every cached key
        q = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)  # (Tq, 1)
        allowed = (torch.arange(kv_len).unsqueeze(0) <= q)[None, None]  # (1, 1, Tq, Tk)
    if ctx.pad_mask is not None:
        if ctx.pad_mask.dim() != 2 or ctx.pad_mask.shape[1] != kv_len:
            raise ShapeMismatch(
                f"pad_mask must be (B, {kv_len}) covering cached and new tokens, "
                f"got {tuple(ctx.pad_mask.shape)}"
            )
        keys = ctx.pad_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class BertLayer(Atom):
    """One post-LN BERT encoder layer, hidden (B, T, C) -> hidden (B, T, C).

    Bidirectional by default; with `ctx.causal` it masks the future, and with `ctx.cache` it
    appends its keys/values to the session layer of atom `spec.index` and attends over all
    cached tokens (so a Nexus base LM can decode token by token).
    """

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        c, f = spec.dim("hidden"), spec.dim("intermediate")
        self.heads = spec.dim("heads")
        # head_dim is set only by structured pruning (atoms/prune.py): heads * head_dim < c
        if not spec.dim_or("head_dim", 0) and c % self.heads:
            raise ModelFormatError(
                f"atom {spec.uid}: hidden {c} not a multiple of heads {self.heads}"
            )
        self.head_dim = spec.dim_or("head_dim", c // self.heads)
        inner = self.heads * self.head_dim
        eps = float(spec.attr("eps"))
        self.act = str(spec.attr("act"))
        dt = spec.torch_dtype
        self.q = ZeroLinear(c, inner, dtype=dt)
        self.k = ZeroLinear(c, inner, dtype=dt)
        self.v = ZeroLinear(c, inner, dtype=dt)
        self.attn_out = ZeroLinear(inner, c, dtype=dt)
        self.attn_norm = nn.LayerNorm(c, eps=eps, dtype=dt)
        self.ffn_in = ZeroLinear(c, f, dtype=dt)
        self.ffn_out = ZeroLinear(f, c, dtype=dt)
        self.ffn_norm = nn.LayerNorm(c, eps=eps, dtype=dt)

    def kv_layout(self) -> KVLayout:
        return KVLayout(kv_heads=self.heads, head_dim=self.head_dim, dtype=self.spec.torch_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        h, d = self.heads, self.head_dim
        q = self.q(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(b, t, h, d).transpose(1, 2)
        v = self.v(x).view(b, t, h, d).transpose(1, 2)
        if ctx.cache is not None:
            layer = ctx.cache.layer(self.spec.index, self.spec.uid)
            k, v = layer.append(k.to(layer.dtype), v.to(layer.dtype))  # (B, H, L, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = attention_allowed(ctx, t, k.shape[2])
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        a = a.transpose(1, 2).reshape(b, t, h * d)
        x = self.attn_norm(self.attn_out(a) + x)
        y = self.ffn_out(_activation(self.act, self.ffn_in(x)))  # (B, T, C)
        out: torch.Tensor = self.ffn_norm(y + x)
        return out


class MeanPooling(Atom):
    """Hidden (B, T, C) -> pooled (B, C): mean over real tokens, then optional L2 norm.

    Exactly sentence-transformers' `Pooling(pooling_mode_mean_tokens)` followed by
    `Normalize` (F.normalize, p=2, dim=1) when the spec's `normalize` attr is true.
    """

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        if spec.attr("mode") != "mean":
            raise ModelFormatError(f"atom {spec.uid}: only mean pooling, got {spec.attr('mode')!r}")
        self.normalize = bool(spec.attr("normalize"))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[1]
        if ctx.pad_mask is None:
            mask = torch.ones(x.shape[:2], dtype=x.dtype)  # (B, T)
        else:
            mask = ctx.pad_mask[:, -t:].to(x.dtype)  # the new tokens' part of the mask
        m = mask.unsqueeze(-1).expand(x.size())  # (B, T, C)
        summed = torch.sum(x * m, 1)  # (B, C)
        count = torch.clamp(m.sum(1), min=1e-9)
        pooled = summed / count
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class ClassifierHead(Atom):
    """Pooled (B, C) -> logits (B, K): one Linear layer, an ordinary trainable module.

    Train it like any `nn.Module` (its parameters have `requires_grad=True`); start from
    `init_random(generator)` for a fresh head.
    """

    def __init__(self, spec: AtomSpec) -> None:
        super().__init__(spec)
        self.linear = ZeroLinear(spec.dim("hidden"), spec.dim("classes"), dtype=spec.torch_dtype)

    def init_random(self, generator: torch.Generator) -> ClassifierHead:
        """Fill with N(0, 0.02) weights and zero bias (BERT's initializer), in place."""
        with torch.no_grad():
            w = torch.randn(self.linear.weight.shape, generator=generator) * 0.02
            self.linear.weight.copy_(w.to(self.linear.weight.dtype))
            self.linear.bias.zero_()
        return self

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        logits: torch.Tensor = self.linear(x)  # (B, K)
        return logits


_CLASSES: dict[AtomKind, type[Atom]] = {
    AtomKind.EMBEDDING: BertEmbedding,
    AtomKind.BLOCK: BertLayer,
    AtomKind.POOLING: MeanPooling,
    AtomKind.CLS_HEAD: ClassifierHead,
}


def build_atom(spec: AtomSpec) -> Atom:
    """Rebuild one BERT atom (zero weights) from its spec alone.

    Raises:
        ModelFormatError: the spec is not a BERT atom, or lacks a dim/attr.
    """
    return build_from_table(spec, FAMILY, _CLASSES)


def init_random(atom: Atom, generator: torch.Generator) -> Atom:
    """Fill any BERT atom's weights in place: N(0, 0.02) matrices, zero biases, unit norms."""
    with torch.no_grad():
        for name, p in atom.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.02)
    return atom


# ------------------------------------------------------------------------------ models


def bert_atoms(
    cfg: BertConfig,
    *,
    model_id: str,
    dtype: str = "float32",
    pooling: bool = True,
    normalize: bool = True,
) -> list[Atom]:
    """The atoms of a BERT model (zero weights): EMBEDDING, layers 1..L, then POOLING if asked."""
    atoms: list[Atom] = [BertEmbedding(embedding_spec(cfg, model_id=model_id, dtype=dtype))]
    for i in range(1, cfg.num_hidden_layers + 1):
        atoms.append(BertLayer(layer_spec(cfg, model_id=model_id, index=i, dtype=dtype)))
    if pooling:
        atoms.append(
            MeanPooling(
                pooling_spec(
                    model_id=model_id,
                    index=len(atoms),
                    hidden=cfg.hidden_size,
                    normalize=normalize,
                    dtype=dtype,
                )
            )
        )
    return atoms


def random_bert(
    cfg: BertConfig,
    *,
    model_id: str,
    seed: int,
    dtype: str = "float32",
    pooling: bool = True,
    normalize: bool = True,
) -> Model:
    """A random-init BERT model (no tokenizer), seeded: for tests and simulations."""
    gen = torch.Generator().manual_seed(seed)
    atoms = [
        init_random(a, gen)
        for a in bert_atoms(
            cfg, model_id=model_id, dtype=dtype, pooling=pooling, normalize=normalize
        )
    ]
    return Model(model_id=model_id, family=FAMILY, config=cfg.to_dict(), atoms=atoms)


def with_classifier_head(model: Model, classes: int, *, seed: int) -> Model:
    """`model` plus a fresh CLS_HEAD atom (N(0, 0.02), seeded) on its pooled output.

    The head's family is the pooling atom's ("bert" or "cnn"), whose builder rebuilds it.

    Raises:
        UnsupportedOperation: the model does not end in a pooled output.
    """
    last = model.atoms[-1].spec
    if last.out_kind is not IOKind.POOLED or last.family not in ("bert", "cnn"):
        raise UnsupportedOperation(
            f"model {model.model_id}: a classifier head needs a bert/cnn pooled output, "
            f"last atom {last.uid} gives {last.out_kind.value}"
        )
    spec = head_spec(
        model_id=model.model_id,
        index=len(model),
        hidden=last.dim("hidden"),
        classes=classes,
        dtype=last.dtype,
        family=last.family,
    )
    head = ClassifierHead(spec).init_random(torch.Generator().manual_seed(seed))
    return model.with_atoms([*model.atoms, head])


# ------------------------------------------------------------------------------ loader

# Hugging Face tensor name (after the optional "bert." prefix) -> our parameter name.
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "norm.weight",
    "embeddings.LayerNorm.bias": "norm.bias",
}
_LAYER_NAMES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}


def hf_weight_names(cfg: BertConfig) -> dict[str, tuple[int, str]]:
    """Map every needed Hugging Face tensor name to (atom index, parameter name)."""
    names = {hf: (0, ours) for hf, ours in _EMBEDDING_NAMES.items()}
    for i in range(cfg.num_hidden_layers):
        for hf, ours in _LAYER_NAMES.items():
            for leaf in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{leaf}"] = (i + 1, f"{ours}.{leaf}")
    return names


def read_config(folder: Path) -> BertConfig:
    """Parse `folder/config.json`.

    Raises:
        ModelFormatError: missing, not JSON, or not a supported BERT config.
    """
    return BertConfig.from_hf(read_hf_config(folder))


def _read_tensors(path: Path, cfg: BertConfig) -> dict[int, dict[str, torch.Tensor]]:
    per_atom: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""
            for hf, (index, ours) in hf_weight_names(cfg).items():
                if prefix + hf not in keys:
                    raise ModelFormatError(f"weight file {path} lacks tensor {prefix + hf!r}")
                per_atom.setdefault(index, {})[ours] = f.get_tensor(prefix + hf)
    except FileNotFoundError:
        raise WeightsError(f"weight file {path} is missing") from None
    except SafetensorError as exc:
        raise WeightsError(f"weight file {path} is not valid safetensors: {exc}") from None
    return per_atom


def load_bert(
    folder: Path,
    *,
    model_id: str,
    dtype: str = "float32",
    pooling: bool = True,
    normalize: bool = True,
    max_length: int | None = None,
) -> Model:
    """Load a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json).

    Args:
        folder: the model folder; `tokenizer.json` is optional (no tokenizer without it).
        model_id: the id our atoms get (their uids start with it).
        dtype: "float32" or "bfloat16" for every atom.
        pooling: append a mean-POOLING atom (sentence embeddings).
        normalize: L2-normalise the pooled vector (sentence-transformers `Normalize`).
        max_length: tokenizer truncation; default `sentence_bert_config.json`'s
            `max_seq_length` if present, else `max_position_embeddings`.

    Returns:
        A `Model` of family "bert": EMBEDDING, L BLOCKs, then POOLING if asked.

    Raises:
        ModelFormatError, WeightsError: naming the file at fault.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    tensors = _read_tensors(folder / "model.safetensors", cfg)
    atoms = bert_atoms(cfg, model_id=model_id, dtype=dtype, pooling=pooling, normalize=normalize)
    for atom in atoms[: cfg.num_hidden_layers + 1]:
        load_state(atom, tensors[atom.spec.index], str(folder / "model.safetensors"))
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        length = max_length or _sentence_max_length(folder) or cfg.max_position_embeddings
        tokenizer = TextTokenizer.from_file(folder / "tokenizer.json", max_length=length)
    return Model(
        model_id=model_id, family=FAMILY, config=cfg.to_dict(), atoms=atoms, tokenizer=tokenizer
    )


def _sentence_max_length(folder: Path) -> int | None:
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("max_seq_length")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelFormatError(
            f"{path} is not a valid sentence-transformers config: {exc}"
        ) from None
    return value if isinstance(value, int) and value > 0 else None
