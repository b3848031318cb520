"""Which compression level of a model fits a memory budget (`nexusd host --max-memory`).

Rule 1: the levels, most accurate first: fp32 (the model as saved), bf16 (the same atoms
cast when loaded), int8 and int4 (derived models `nexusd compress` built, found by their
manifest's `compress.source`, unpruned). The first that fits the budget and whose output
cosine against fp32 is at least the floor is chosen; every level passed over says why.
Rule 2: every accuracy figure is measured, never assumed: int8/int4 read the figures their
manifest records (`atoms.compress.figures_config`, measured when they were built); bf16 is
measured here on the same held-out paragraphs (`atoms.compress.measure`) when it is the
candidate. A missing int8/int4 level is built (and saved) when it is needed, so the figures
always exist before a choice is made.
Rule 3: cheap first: a level is measured or built only when every more accurate one was
passed over, so a budget that fits fp32 costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from atoms.compress import PREFIX, CompressSettings, atom_bytes, compress, measure, text_batches
from atoms.precision import model_to_dtype

from .errors import ApiError
from .model_registry import ModelRegistry

log = structlog.get_logger(__name__)

LEVELS = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True, slots=True, kw_only=True)
class Level:
    """One way to host a model: the model id and dtype to load, its weight bytes, and its
    measured output cosine (and perplexity for LMs) against the fp32 model."""

    name: str
    model_id: str
    dtype: str  # the dtype HostRequest asks for ("" = as saved)
    bytes: int
    cosine: float | None  # None: not measured (its bytes already exceed the budget)
    perplexity: float | None = None
    ref_perplexity: float | None = None

    def __post_init__(self) -> None:
        bad = self.cosine is not None and not -1.0 <= self.cosine <= 1.0 + 1e-6
        if self.name not in LEVELS or self.bytes <= 0 or bad:
            raise ValueError(f"level {self.name!r}: bad figures ({self.bytes}, {self.cosine})")

    def cost(self) -> str:
        """The measured accuracy cost, in words."""
        if self.name == "fp32":
            return "none (the model as trained)"
        if self.cosine is None:
            return "not measured"
        out = f"output cosine {self.cosine:.5f} against fp32"
        if self.perplexity is not None and self.ref_perplexity:
            change = self.perplexity / self.ref_perplexity - 1.0
            out += (
                f", perplexity {self.perplexity:.3f} vs {self.ref_perplexity:.3f} ({change:+.2%})"
            )
        return out


@dataclass(frozen=True, slots=True)
class Choice:
    chosen: Level
    passed: tuple[str, ...]  # why each more accurate level was passed over


def choose(candidates: Iterator[Level] | list[Level], budget: int, floor: float) -> Choice:
    """The first level (most accurate first) that fits `budget` bytes with cosine >= floor.

    Raises:
        ApiError(bad_request): no level qualifies (the message lists every reason).
    """
    passed: list[str] = []
    for level in candidates:
        if level.bytes > budget:
            passed.append(f"{level.name}: {level.bytes:,} bytes exceed the budget {budget:,}")
        elif level.cosine is None:  # cannot happen: only a level over budget is unmeasured
            passed.append(f"{level.name}: accuracy not measured")
        elif level.cosine < floor:
            passed.append(f"{level.name}: cosine {level.cosine:.5f} is below the floor {floor}")
        else:
            return Choice(level, tuple(passed))
    raise ApiError("bad_request", "no compression level fits: " + "; ".join(passed))


def _derived(registry: ModelRegistry, model_id: str, quant: str) -> str | None:
    """The id of an unpruned `quant` model `nexusd compress` built from `model_id`."""
    for mid in registry.available():
        cfg = dict(registry.manifest(mid).config)
        if (
            cfg.get(PREFIX + "source") == model_id
            and cfg.get(PREFIX + "quant") == quant
            and not cfg.get(PREFIX + "prune_heads")
            and not cfg.get(PREFIX + "prune_ffn")
        ):
            return mid
    return None


def _from_manifest(registry: ModelRegistry, name: str, mid: str) -> Level:
    cfg = dict(registry.manifest(mid).config)

    def num(key: str) -> float | None:
        v = cfg.get(PREFIX + key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    return Level(
        name=name,
        model_id=mid,
        dtype="",
        bytes=int(num("bytes") or 0),
        cosine=float(num("cosine") or 0.0),
        perplexity=num("perplexity"),
        ref_perplexity=num("ref_perplexity"),
    )


def levels(
    registry: ModelRegistry,
    model_id: str,
    *,
    budget: int | None = None,
    on_build: Callable[[str], None] | None = None,
) -> Iterator[Level]:
    """The levels of `model_id`, most accurate first, each measured or built only when the
    caller asks for the next one (rule 3); bf16's accuracy is not measured when its bytes
    exceed `budget` already."""
    saved = sum(e.nbytes for e in registry.manifest(model_id).atoms)
    yield Level(name="fp32", model_id=model_id, dtype="float32", bytes=saved, cosine=1.0)
    model = registry.load_model(model_id)
    settings = CompressSettings(model_id=f"{model_id}-bf16")
    _, evaluation = text_batches(model, settings)
    half = model_to_dtype(model, "bfloat16")
    half_bytes = sum(atom_bytes(a) for a in half.atoms)
    if budget is not None and half_bytes > budget:
        yield Level(name="bf16", model_id=model_id, dtype="bfloat16", bytes=half_bytes, cosine=None)
    else:
        figs = measure(model, half, evaluation, repeats=1)
        yield Level(
            name="bf16",
            model_id=model_id,
            dtype="bfloat16",
            bytes=figs.bytes,
            cosine=figs.cosine,
            perplexity=figs.perplexity,
            ref_perplexity=figs.ref_perplexity,
        )
    for quant in ("int8", "int4"):
        mid = _derived(registry, model_id, quant)
        if mid is None:
            mid = f"{model_id}-{quant}"
            if on_build is not None:
                on_build(mid)
            derived, _ = compress(model, CompressSettings(model_id=mid, quant=quant))
            registry.save(derived)
            log.info("fit_level_built", model=model_id, level=quant, derived=mid)
        yield _from_manifest(registry, quant, mid)
