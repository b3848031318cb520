"""Partitioning: which host runs which contiguous span, and the manifest that describes a model.

Rule 1: pure, deterministic functions over numbers and frozen records: no nn.Module, no
I/O, no network, no global RNG. Hosts are sorted before use and ties are broken by a
seeded `random.Random`, so every node computes the same split from the same inputs.
Rule 2: a split covers atoms 0..N-1 with contiguous, non-overlapping spans; it minimises the
slowest stage (span cost / host throughput: the pipeline's rate), then prefers cut points
closest to the throughput-proportional ones; no host gets more weight bytes than its memory.
Rule 3: a `ModelManifest` names every atom's weights by content digest; its JSON form is
canonical (sorted keys, no spaces), so two hosts agree on a model by comparing `digest`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .atom import AtomKind, AtomSpec, AttrValue, IOKind
from .errors import ModelFormatError, PartitionError
from .weights import check_digest

if TYPE_CHECKING:
    from collections.abc import Sequence

MANIFEST_VERSION = 1
ConfigValue = bool | int | float | str | None
_T = TypeVar("_T")
_Best = tuple[float, float, tuple[int, ...]]  # (slowest stage, boundary deviation, cuts)


# ----------------------------------------------------------------------------- split


@dataclass(frozen=True, slots=True)
class HostCapacity:
    """What one host offers: relative throughput (any unit, same for all) and weight memory."""

    host: str
    throughput: float
    memory_bytes: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host name must not be empty")
        if not math.isfinite(self.throughput) or self.throughput < 0:
            raise ValueError(
                f"host {self.host}: throughput must be finite and >= 0, got {self.throughput}"
            )
        if self.memory_bytes < 0:
            raise ValueError(
                f"host {self.host}: memory_bytes must be >= 0, got {self.memory_bytes}"
            )


@dataclass(frozen=True, slots=True)
class SpanAssignment:
    """Host `host` runs atoms [start, end)."""

    host: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span must have 0 <= start < end, got [{self.start}, {self.end})")


def _ordered_hosts(hosts: Sequence[HostCapacity], seed: int) -> list[HostCapacity]:
    names = [h.host for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"host names must be unique, got {sorted(names)}")
    ordered = sorted((h for h in hosts if h.throughput > 0), key=lambda h: (-h.throughput, h.host))
    rng = random.Random(seed)
    out: list[HostCapacity] = []
    i = 0
    while i < len(ordered):  # shuffle each group of equal throughput, seeded
        j = i
        while j < len(ordered) and ordered[j].throughput == ordered[i].throughput:
            j += 1
        group = ordered[i:j]
        rng.shuffle(group)
        out.extend(group)
        i = j
    return out


def split_spans(
    costs: Sequence[float],
    nbytes: Sequence[int],
    hosts: Sequence[HostCapacity],
    *,
    seed: int = 0,
) -> tuple[SpanAssignment, ...]:
    """Cut N atoms into contiguous spans, one per host that gets any work.

    Args:
        costs: per-atom compute cost (any unit; see `atom_costs`).
        nbytes: per-atom weight bytes, checked against each host's `memory_bytes`.
        hosts: candidate hosts; those with throughput 0 get nothing.
        seed: breaks ties between hosts of equal throughput.

    Returns:
        Assignments in atom order, covering [0, N) exactly; hosts given no atoms are left out.

    Raises:
        PartitionError: no assignment fits the hosts' memory.
        ValueError: mismatched or invalid inputs.
    """
    n = len(costs)
    if n == 0 or len(nbytes) != n:
        raise ValueError(f"need one cost and one size per atom, got {n} costs, {len(nbytes)} sizes")
    if any(not math.isfinite(c) or c < 0 for c in costs) or any(b < 0 for b in nbytes):
        raise ValueError("atom costs must be finite and >= 0, and sizes >= 0")
    order = _ordered_hosts(hosts, seed)
    if not order:
        raise PartitionError("no host with throughput > 0")
    cum_cost = [0.0]
    cum_bytes = [0]
    for c, b in zip(costs, nbytes, strict=True):
        cum_cost.append(cum_cost[-1] + c)
        cum_bytes.append(cum_bytes[-1] + b)
    total_thr = sum(h.throughput for h in order)
    # best[j]: (slowest stage, squared boundary deviation, cuts) covering atoms [0, j) with
    # the hosts seen so far, or None when no assignment fits. O(H * N^2) DP over cut points.
    best: list[_Best | None] = [(0.0, 0.0, ())] + [None] * n
    thr_seen = 0.0
    for host in order:
        thr_seen += host.throughput
        target = cum_cost[n] * thr_seen / total_thr  # proportional cumulative cost
        nxt: list[_Best | None] = [None] * (n + 1)
        for k in range(n + 1):
            for j in range(k + 1):
                prev = best[j]
                if prev is None or cum_bytes[k] - cum_bytes[j] > host.memory_bytes:
                    continue
                stage = (cum_cost[k] - cum_cost[j]) / host.throughput
                cand = (max(prev[0], stage), prev[1] + (cum_cost[k] - target) ** 2, (*prev[2], k))
                current = nxt[k]
                if current is None or _better(cand, current):
                    nxt[k] = cand
        best = nxt
    final = best[n]
    if final is None:
        raise PartitionError(
            f"{n} atoms of {cum_bytes[n]} bytes do not fit {len(order)} hosts with "
            f"{sum(h.memory_bytes for h in order)} bytes in total "
            f"(largest atom {max(nbytes)} bytes)"
        )
    cuts = final[2]
    out: list[SpanAssignment] = []
    start = 0
    for host, end in zip(order, cuts, strict=True):
        if end > start:
            out.append(SpanAssignment(host.host, start, end))
        start = end
    return tuple(out)


def _better(a: _Best, b: _Best) -> bool:
    if not math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-12):
        return a[0] < b[0]
    return a[1] < b[1] and not math.isclose(a[1], b[1], rel_tol=1e-9, abs_tol=1e-12)


def atom_costs(manifest: ModelManifest) -> list[float]:
    """A per-token compute proxy per atom: weight bytes, except lookups and parameter-free atoms.

    An embedding reads one row per token, so its cost is its width, not its table size;
    pooling has no weights and costs its width too.
    """
    out: list[float] = []
    for e in manifest.atoms:
        if e.kind in (AtomKind.EMBEDDING, AtomKind.POOLING):
            width = next((v for n, v in e.spec.dims if n in ("hidden", "out_channels")), 1)
            out.append(float(width))
        else:
            out.append(float(e.nbytes))
    return out


# -------------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class AtomEntry:
    """One atom of a manifest: its spec and the weight file (`<digest>.safetensors`) it needs."""

    index: int
    kind: AtomKind
    digest: str
    nbytes: int
    spec: AtomSpec

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if self.index != self.spec.index or self.kind is not self.spec.kind:
            raise ValueError(
                f"atom entry {self.index}/{self.kind.value} does not match its spec {self.spec.uid}"
            )
        if self.nbytes < 0:
            raise ValueError(f"atom entry {self.index}: nbytes must be >= 0, got {self.nbytes}")


@dataclass(frozen=True, slots=True)
class TokenizerEntry:
    """The model's tokenizer file (`tokenizer.json`, verified by digest) and its settings."""

    digest: str
    max_length: int
    padding_side: str = "right"

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if self.max_length < 1 or self.padding_side not in ("left", "right"):
            raise ValueError(
                f"tokenizer entry needs max_length >= 1 and side left/right, "
                f"got {self.max_length}, {self.padding_side!r}"
            )


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """Everything a host needs to load any span of a model, given the weight files.

    Args:
        model_id, family: as in `Model`.
        config: the family config as sorted (name, value) pairs.
        atoms: one entry per atom, index 0..N-1.
        tokenizer: the tokenizer file entry, or None for models without text input.
    """

    model_id: str
    family: str
    config: tuple[tuple[str, ConfigValue], ...]
    atoms: tuple[AtomEntry, ...]
    tokenizer: TokenizerEntry | None = None

    def __post_init__(self) -> None:
        if not self.atoms:
            raise ValueError(f"manifest of {self.model_id}: no atoms")
        for i, e in enumerate(self.atoms):
            if e.index != i or e.spec.model_id != self.model_id:
                raise ValueError(f"manifest of {self.model_id}: entry {i} is atom {e.spec.uid}")
        names = [n for n, _ in self.config]
        if names != sorted(set(names)):
            raise ValueError(f"manifest config names must be unique and sorted, got {names}")

    def entries(self, start: int, end: int) -> tuple[AtomEntry, ...]:
        """The entries of span [start, end).

        Raises:
            ValueError: not a non-empty range inside the model.
        """
        if not 0 <= start < end <= len(self.atoms):
            raise ValueError(
                f"span [{start}, {end}) is not inside model {self.model_id} "
                f"of {len(self.atoms)} atoms"
            )
        return self.atoms[start:end]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, compact)."""
        obj = {
            "version": MANIFEST_VERSION,
            "model_id": self.model_id,
            "family": self.family,
            "config": [list(p) for p in self.config],
            "atoms": [_entry_json(e) for e in self.atoms],
            "tokenizer": None
            if self.tokenizer is None
            else {
                "digest": self.tokenizer.digest,
                "max_length": self.tokenizer.max_length,
                "padding_side": self.tokenizer.padding_side,
            },
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def digest(self) -> str:
        """BLAKE2b-256 hex of the canonical JSON: the model's content id."""
        return hashlib.blake2b(self.to_json().encode(), digest_size=32).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> ModelManifest:
        """Parse and validate a manifest.

        Raises:
            ModelFormatError: not JSON, an unknown version, a missing/extra/mistyped field.
        """
        try:
            obj = json.loads(text)
            _expect_keys(
                obj, {"version", "model_id", "family", "config", "atoms", "tokenizer"}, "manifest"
            )
            if obj["version"] != MANIFEST_VERSION:
                raise ModelFormatError(
                    f"manifest version {obj['version']!r} is not supported, "
                    f"expected {MANIFEST_VERSION}"
                )
            tok = obj["tokenizer"]
            if tok is not None:
                _expect_keys(tok, {"digest", "max_length", "padding_side"}, "manifest tokenizer")
            return cls(
                model_id=_typed(obj["model_id"], str, "model_id"),
                family=_typed(obj["family"], str, "family"),
                config=tuple(_pair(p, "config") for p in _typed(obj["config"], list, "config")),
                atoms=tuple(_entry_from(e) for e in _typed(obj["atoms"], list, "atoms")),
                tokenizer=None
                if tok is None
                else TokenizerEntry(
                    _typed(tok["digest"], str, "tokenizer.digest"),
                    _typed(tok["max_length"], int, "tokenizer.max_length"),
                    _typed(tok["padding_side"], str, "tokenizer.padding_side"),
                ),
            )
        except ModelFormatError:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # json, enum and record validation
            raise ModelFormatError(f"invalid model manifest: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"ModelManifest({self.model_id!r}, family={self.family!r}, atoms={len(self.atoms)}, "
            f"bytes={sum(e.nbytes for e in self.atoms)}, digest={self.digest[:12]})"
        )


def _entry_json(e: AtomEntry) -> dict[str, object]:
    s = e.spec
    return {
        "index": e.index,
        "kind": e.kind.value,
        "digest": e.digest,
        "nbytes": e.nbytes,
        "spec": {
            "kind": s.kind.value,
            "model_id": s.model_id,
            "index": s.index,
            "family": s.family,
            "dims": [list(d) for d in s.dims],
            "dtype": s.dtype,
            "in_kind": s.in_kind.value,
            "out_kind": s.out_kind.value,
            "attrs": [list(a) for a in s.attrs],
        },
    }


_SPEC_KEYS = {
    "kind",
    "model_id",
    "index",
    "family",
    "dims",
    "dtype",
    "in_kind",
    "out_kind",
    "attrs",
}


def _entry_from(obj: object) -> AtomEntry:
    _expect_keys(obj, {"index", "kind", "digest", "nbytes", "spec"}, "atom entry")
    assert isinstance(obj, dict)  # checked by _expect_keys
    raw = obj["spec"]
    _expect_keys(raw, _SPEC_KEYS, "atom spec")
    assert isinstance(raw, dict)
    spec = AtomSpec(
        kind=AtomKind(raw["kind"]),
        model_id=_typed(raw["model_id"], str, "spec.model_id"),
        index=_typed(raw["index"], int, "spec.index"),
        family=_typed(raw["family"], str, "spec.family"),
        dims=tuple(
            (n, _typed(v, int, f"dim {n}"))
            for n, v in (_pair(d, "spec.dims") for d in _typed(raw["dims"], list, "spec.dims"))
        ),
        dtype=_typed(raw["dtype"], str, "spec.dtype"),
        in_kind=IOKind(raw["in_kind"]),
        out_kind=IOKind(raw["out_kind"]),
        attrs=tuple(
            _attr(_pair(a, "spec.attrs")) for a in _typed(raw["attrs"], list, "spec.attrs")
        ),
    )
    return AtomEntry(
        index=_typed(obj["index"], int, "atom.index"),
        kind=AtomKind(obj["kind"]),
        digest=_typed(obj["digest"], str, "atom.digest"),
        nbytes=_typed(obj["nbytes"], int, "atom.nbytes"),
        spec=spec,
    )


def _expect_keys(obj: object, keys: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{what} must be a JSON object, got {type(obj).__name__}")
    if set(obj) != keys:
        raise ModelFormatError(
            f"{what}: expected keys {sorted(keys)}, missing {sorted(keys - set(obj))}, "
            f"unknown {sorted(set(obj) - keys)}"
        )


def _typed(value: object, typ: type[_T], what: str) -> _T:
    # bool is an int subclass in Python; a JSON true is never a valid count.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ModelFormatError(f"manifest {what}: expected {typ.__name__}, got {value!r}")
    return value


def _pair(value: object, what: str) -> tuple[str, ConfigValue]:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise ModelFormatError(f"manifest {what}: expected [name, value], got {value!r}")
    if value[1] is not None and not isinstance(value[1], bool | int | float | str):
        raise ModelFormatError(
            f"manifest {what}: value of {value[0]} must be a scalar, got {value[1]!r}"
        )
    return value[0], value[1]


def _attr(pair: tuple[str, ConfigValue]) -> tuple[str, AttrValue]:
    if pair[1] is None:
        raise ModelFormatError(f"manifest spec attr {pair[0]} must not be null")
    return pair[0], pair[1]
