"""The compression pipeline: prune and/or quantise a model, and measure what it cost.

Rule 1: a compressed model is an ordinary model of new atoms (their specs say `quant`,
`group`, `heads`/`head_dim`/`intermediate`), saved and loaded like any other; its manifest
config records its figures (`figures_config`) per atom and for the whole model: bytes,
parameter count, measured time on this device, and accuracy against the original on held
out calibration text (output cosine; perplexity for language models).
Rule 2: calibration (choosing heads, neurons, GPTQ rounding) and evaluation use disjoint
paragraphs of the shipped corpus's validation split, so the accuracy is not measured on the
data the choices were fit to. Everything is deterministic: same model and settings, same
weights and the same accuracy figures (times are measured, so they vary).
Rule 3: int4 keeps the accuracy-critical atoms at int8 while the model's weight bytes stay
within `int4_budget` of the original: the atoms whose int4 output cosine is lowest are
promoted first (per-atom mixed precision, recorded in each atom's spec).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .atom import Atom, ForwardContext, IOKind
from .corpus import corpus_text, paragraphs
from .datasets import IGNORE, paragraph_examples, special_ids
from .embed import embedding_context
from .model import Model, build_atom, load_state
from .partition import ConfigValue
from .precision import cosine_report
from .prune import prunable, prune_greedy, uniform_removal
from .quant import LEVELS, quantize_atom
from .weights import canonical_bytes

PREFIX = "compress."
LM_LENGTH = 128  # tokens per calibration/evaluation paragraph of a language model


@dataclass(frozen=True, slots=True)
class CompressSettings:
    """What to do to a model.

    Args:
        model_id: the id of the derived model.
        quant: "int8", "int4" or None (no quantisation).
        group: int4 group size (32, 64 or 128).
        prune_heads / prune_ffn: fraction of heads / FFN neurons removed per block.
        int4_budget: int4 only: weight bytes allowed, as a fraction of the original's.
        calib_texts / eval_texts: paragraphs used to calibrate / to measure.
    """

    model_id: str
    quant: str | None = None
    group: int = 32
    prune_heads: float = 0.0
    prune_ffn: float = 0.0
    int4_budget: float = 0.2
    calib_texts: int = 96
    eval_texts: int = 32

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("compress: model_id must not be empty")
        if self.quant is not None and self.quant not in LEVELS:
            raise ValueError(f"compress: quant must be one of {LEVELS} or None, got {self.quant!r}")
        for name in ("prune_heads", "prune_ffn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"compress: {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.int4_budget <= 1.0:
            raise ValueError(f"compress: int4_budget must be in (0, 1], got {self.int4_budget}")
        if self.calib_texts < 1 or self.eval_texts < 1:
            raise ValueError("compress: calib_texts and eval_texts must be >= 1")


@dataclass(frozen=True, slots=True)
class AtomFigures:
    """One atom's measured figures (`cosine` of its output against the original atom's on
    the same input; `ms` one forward over the evaluation batch)."""

    index: int
    bytes: int
    params: int
    ms: float
    cosine: float


@dataclass(frozen=True, slots=True)
class Figures:
    """A whole model's figures and the original's, measured in the same run."""

    atoms: tuple[AtomFigures, ...]
    cosine: float
    cosine_min: float
    ref_bytes: int
    ref_params: int
    ref_ms: float
    perplexity: float | None = None
    ref_perplexity: float | None = None

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.atoms)

    @property
    def params(self) -> int:
        return sum(a.params for a in self.atoms)

    @property
    def ms(self) -> float:
        return sum(a.ms for a in self.atoms)


@dataclass(frozen=True, slots=True)
class Batch:
    """Token ids, their context and which (B*T) positions are real tokens."""

    ids: torch.Tensor
    ctx: ForwardContext
    real: torch.Tensor
    targets: torch.Tensor | None = None  # language models: next-token targets


def is_lm(model: Model) -> bool:
    return (
        model.atoms[-1].spec.out_kind is IOKind.LOGITS
        and model.atoms[-1].spec.kind.value == "lm_head"
    )


def text_batches(model: Model, settings: CompressSettings) -> tuple[Batch, Batch]:
    """(calibration, evaluation) batches from disjoint validation paragraphs."""
    paras = paragraphs(corpus_text("validation"))
    need = settings.eval_texts + settings.calib_texts
    if len(paras) < need:
        raise ValueError(f"compress: the corpus has {len(paras)} paragraphs, {need} needed")
    evaluation, calibration = paras[: settings.eval_texts], paras[settings.eval_texts : need]
    return _batch(model, calibration), _batch(model, evaluation)


def _batch(model: Model, texts: Sequence[str]) -> Batch:
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"compress: model {model.model_id} has no tokenizer")
    if is_lm(model):
        bos, eos = special_ids(tok)
        ex = paragraph_examples(tok.encode_untruncated(list(texts)), LM_LENGTH, bos, eos)
        assert ex.targets is not None
        width = int((ex.targets != IGNORE).sum(dim=1).max())
        ids, targets = ex.inputs[:, :width], ex.targets[:, :width]
        ctx = ForwardContext.for_tokens(ids.shape[0], width, causal=True)
        return Batch(ids, ctx, (targets != IGNORE).reshape(-1), targets)
    tb = tok.encode_batch(list(texts))
    real = (
        tb.pad_mask.reshape(-1)
        if tb.pad_mask is not None
        else torch.ones(tb.ids.numel(), dtype=torch.bool)
    )
    return Batch(tb.ids, embedding_context(tb), real.bool())


def atom_bytes(atom: Atom) -> int:
    """The size of the atom's weight file (canonical safetensors)."""
    return len(canonical_bytes(atom.state_dict()))


def atom_params(atom: Atom) -> int:
    """Parameters the atom computes with (a packed int4 byte holds two)."""
    total = 0
    for name, t in atom.state_dict().items():
        if name.endswith((".scale", ".low")):
            continue
        total += t.numel() * (2 if t.dtype == torch.uint8 else 1)
    return total


def _rows(out: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    if out.dim() == 3:
        return out.reshape(-1, out.shape[-1])[real]
    return out


@torch.no_grad()
def _chain(atoms: Sequence[Atom], batch: Batch) -> list[torch.Tensor]:
    """The inputs of every atom, then the final output, along `atoms` on `batch`."""
    xs = [batch.ids]
    for atom in atoms:
        xs.append(atom(xs[-1], batch.ctx))
    return xs


def _time_ms(atom: Atom, x: torch.Tensor, ctx: ForwardContext, repeats: int) -> float:
    with torch.inference_mode():
        atom(x, ctx)  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            atom(x, ctx)
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def perplexity(atoms: Sequence[Atom], batch: Batch) -> float:
    """exp(mean next-token NLL) of an LM over the real tokens of `batch`."""
    assert batch.targets is not None
    logits = _chain(atoms, batch)[-1]
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE
    )
    return math.exp(float(loss))


def measure(reference: Model, candidate: Model, batch: Batch, *, repeats: int = 3) -> Figures:
    """Figures of `candidate` against `reference` on the evaluation `batch`.

    Raises:
        ValueError: the two models have different atom counts.
    """
    if len(reference.atoms) != len(candidate.atoms):
        raise ValueError("compress: the models to compare differ in atom count")
    xs = _chain(reference.atoms, batch)
    figs = []
    ref_ms = 0.0
    for i, (ref, cand) in enumerate(zip(reference.atoms, candidate.atoms, strict=True)):
        x = xs[i].to(cand.spec.torch_dtype) if xs[i].is_floating_point() else xs[i]
        with torch.no_grad():
            out = cand(x, batch.ctx)
        cos = cosine_report(_rows(xs[i + 1], batch.real), _rows(out, batch.real)).mean
        ms = _time_ms(cand, x, batch.ctx, repeats)
        ref_ms += _time_ms(ref, xs[i], batch.ctx, repeats)
        figs.append(
            AtomFigures(i, atom_bytes(cand), atom_params(cand), round(ms, 3), round(cos, 6))
        )
    final = _chain(candidate.atoms, batch)[-1]
    whole = cosine_report(_rows(xs[-1], batch.real), _rows(final, batch.real))
    ppl = ref_ppl = None
    if batch.targets is not None:
        ppl = round(perplexity(candidate.atoms, batch), 4)
        ref_ppl = round(perplexity(reference.atoms, batch), 4)
    return Figures(
        atoms=tuple(figs),
        cosine=round(whole.mean, 6),
        cosine_min=round(whole.min, 6),
        ref_bytes=sum(atom_bytes(a) for a in reference.atoms),
        ref_params=sum(atom_params(a) for a in reference.atoms),
        ref_ms=round(ref_ms, 3),
        perplexity=ppl,
        ref_perplexity=ref_ppl,
    )


def figures_config(
    figs: Figures, settings: CompressSettings, source: str
) -> dict[str, ConfigValue]:
    """The manifest config entries recording `figs` (all under `compress.`)."""
    out: dict[str, ConfigValue] = {
        "source": source,
        "quant": settings.quant or "none",
        "group": settings.group,
        "prune_heads": settings.prune_heads,
        "prune_ffn": settings.prune_ffn,
        "bytes": figs.bytes,
        "params": figs.params,
        "ms": figs.ms,
        "cosine": figs.cosine,
        "cosine_min": figs.cosine_min,
        "ref_bytes": figs.ref_bytes,
        "ref_params": figs.ref_params,
        "ref_ms": figs.ref_ms,
        "perplexity": figs.perplexity,
        "ref_perplexity": figs.ref_perplexity,
    }
    for a in figs.atoms:
        for key in ("bytes", "params", "ms", "cosine"):
            out[f"atom.{a.index:03d}.{key}"] = getattr(a, key)
    return {PREFIX + k: v for k, v in out.items()}


def renamed_atom(atom: Atom, model_id: str) -> Atom:
    """A copy of `atom` whose spec names `model_id`."""
    new = build_atom(dataclasses.replace(atom.spec, model_id=model_id))
    load_state(new, atom.state_dict(), f"renaming {atom.spec.uid}")
    new.eval()
    return new


def has_weights(atom: Atom) -> bool:
    """Whether the atom has a Linear layer or a table that quantisation would pack."""
    return any(isinstance(m, nn.Linear | nn.Embedding) for m in atom.modules())


def prune_model(model: Model, settings: CompressSettings, calib: Batch) -> list[Atom]:
    """The model's atoms with every block pruned (`atoms.prune.prune_greedy`: the same
    fractions of each block's heads / neurons), each block in order on the output of the
    already pruned ones. A model-wide budget spread by measured error (`atoms.prune.plan`)
    measured worse on MiniLM (cosine 0.931 against 0.940), so it is not used."""
    if settings.prune_heads == 0 and settings.prune_ffn == 0:
        return list(model.atoms)
    xs = _chain(model.atoms, calib)
    xp = calib.ids
    out = []
    for i, atom in enumerate(model.atoms):
        new = atom
        if prunable(atom):
            removal = uniform_removal(atom, heads=settings.prune_heads, ffn=settings.prune_ffn)
            new = prune_greedy(atom, removal, (xs[i], xp, calib.ctx))
        with torch.no_grad():
            xp = new(xp, calib.ctx)
        out.append(new)
    return out


def quantize_model(
    atoms: Sequence[Atom], settings: CompressSettings, calib: Batch, ref_bytes: int
) -> list[Atom]:
    """The atoms quantised to `settings.quant` (int4 with GPTQ on `calib`, and the least
    accurate atoms promoted to int8 within the byte budget: module Rule 3)."""
    level = settings.quant
    assert level is not None
    xs = _chain(atoms, calib)
    out = [
        quantize_atom(a, level, settings.group, (xs[i], calib.ctx) if level == "int4" else None)
        if has_weights(a)
        else a
        for i, a in enumerate(atoms)
    ]
    if level != "int4":
        return out
    cosines = []
    for i, q in enumerate(out):
        with torch.no_grad():
            got = q(xs[i], calib.ctx)
        cosines.append(cosine_report(_rows(xs[i + 1], calib.real), _rows(got, calib.real)).mean)
    budget = settings.int4_budget * ref_bytes
    total = sum(atom_bytes(a) for a in out)
    for i in sorted(
        (j for j in range(len(out)) if has_weights(atoms[j])), key=lambda j: cosines[j]
    ):
        promoted = quantize_atom(atoms[i], "int8")
        extra = atom_bytes(promoted) - atom_bytes(out[i])
        if total + extra <= budget:
            out[i], total = promoted, total + extra
    return out


def compress(model: Model, settings: CompressSettings) -> tuple[Model, Figures]:
    """Prune then quantise `model` as `settings` say, and measure the result.

    Returns:
        The derived model (its config holds the figures, `figures_config`) and the figures.

    Raises:
        ValueError: bad settings, or a model without a tokenizer.
    """
    calib, evaluation = text_batches(model, settings)
    ref_bytes = sum(atom_bytes(a) for a in model.atoms)
    atoms = prune_model(model, settings, calib)
    if settings.quant is not None:
        atoms = quantize_model(atoms, settings, calib, ref_bytes)
    atoms = [renamed_atom(a, settings.model_id) for a in atoms]
    candidate = Model(
        model_id=settings.model_id,
        family=model.family,
        config=model.config,
        atoms=atoms,
        tokenizer=model.tokenizer,
    )
    figs = measure(model, candidate, evaluation)
    config = {k: v for k, v in model.config.items() if not k.startswith(PREFIX)}
    config.update(figures_config(figs, settings, model.model_id))
    derived = Model(
        model_id=settings.model_id,
        family=model.family,
        config=config,
        atoms=atoms,
        tokenizer=model.tokenizer,
    )
    return derived, figs


def recheck(reference: Model, derived: Model, settings: CompressSettings) -> Figures:
    """Re-measure a saved derived model against its original (the manifest's figures'
    accuracy and sizes must come out equal)."""
    _, evaluation = text_batches(reference, settings)
    return measure(reference, derived, evaluation, repeats=1)
