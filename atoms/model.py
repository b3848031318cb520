"""The model: an ordered list of atoms plus identity, config and tokenizer; and its folder form.

Rule 1: a `Model` is atoms 0..N-1 of one model id, in order, whose input/output kinds chain;
any contiguous slice of it is a `Span` (`model.span(start, end)`).
Rule 2: on disk a model is a folder: `manifest.json` (a `ModelManifest`), `weights/` (a
content-addressed `WeightStore`, one file per atom) and `tokenizer.json`. A host reads only
the manifest and the weight files of its own span (`load_span`).
Rule 3: an atom is rebuilt from its spec by its family's builder (`FAMILY_BUILDERS`, a fixed
table of module and function names, imported on first use) and then given its weights;
every weight file is verified against its digest before use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog

from .atom import Atom, AtomSpec
from .errors import ModelFormatError, WeightsError
from .partition import AtomEntry, ConfigValue, ModelManifest, TokenizerEntry
from .quant import quantize_modules
from .span import Span
from .tokenizer import TextTokenizer
from .weights import FileReader, WeightStore, digest_hex

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

# family -> (module in this package, function(spec) -> Atom). Immutable on purpose: adding a
# family is a code change, never a runtime registration.
FAMILY_BUILDERS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "bert": ("bert", "build_atom"),
        "cnn": ("conv", "build_atom"),
        "llama": ("llama", "llama_atom_from_spec"),
        "nexus": ("nexus", "nexus_atom_from_spec"),
    }
)

AtomBuilder = Callable[[AtomSpec], Atom]
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_DIR = "weights"


def read_hf_config(folder: Path) -> dict[str, object]:
    """Read `folder/config.json`.

    Raises:
        ModelFormatError: missing or not a JSON object.
    """
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no config.json in the model folder") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def build_atom(spec: AtomSpec) -> Atom:
    """Build an atom (placeholder weights) from its spec with its family's builder.

    Raises:
        ModelFormatError: no builder for `spec.family`, or the builder rejects the spec.
    """
    try:
        module_name, func_name = FAMILY_BUILDERS[spec.family]
    except KeyError:
        raise ModelFormatError(
            f"atom {spec.uid}: unknown family {spec.family!r}, known {sorted(FAMILY_BUILDERS)}"
        ) from None
    module = importlib.import_module(f"{__package__}.{module_name}")
    builder: AtomBuilder = getattr(module, func_name)
    atom = builder(spec)
    try:
        quantize_modules(atom)  # a spec with attr `quant`: packed buffers (atoms/quant.py)
    except ValueError as exc:
        raise ModelFormatError(str(exc)) from None
    return atom


def load_state(atom: Atom, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `atom` (cast to its dtype), requiring exactly its tensor names and shapes.

    Raises:
        ModelFormatError: a name is missing or extra, or a shape differs; names `source`.
    """
    own = atom.state_dict()
    if set(own) != set(state):
        raise ModelFormatError(
            f"{source}: atom {atom.spec.uid} expects tensors {sorted(own)}, got {sorted(state)}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ModelFormatError(
                f"{source}: atom {atom.spec.uid} tensor {name} expected shape "
                f"{tuple(own[name].shape)}, got {tuple(tensor.shape)}"
            )
    atom.load_state_dict({n: t.to(own[n].dtype) for n, t in state.items()}, strict=True)


class Model:
    """A whole model held in this process.

    Args:
        model_id: the id every atom's spec carries.
        family: "bert", "llama", "nexus", "cnn", ...
        config: the family config as a flat name -> scalar mapping (kept read-only).
        atoms: atoms 0..N-1 in order.
        tokenizer: for text models; None otherwise.

    Raises:
        ValueError: the atoms are not 0..N-1 of `model_id`, or their kinds do not chain.
    """

    def __init__(
        self,
        *,
        model_id: str,
        family: str,
        config: Mapping[str, ConfigValue],
        atoms: Sequence[Atom],
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        if not model_id:
            raise ValueError("model_id must not be empty")
        if atoms and atoms[0].spec.index != 0:
            raise ValueError(f"model {model_id}: first atom is {atoms[0].spec.uid}, not index 0")
        Span(atoms)  # validates ids, contiguity and kind chaining
        if atoms[0].spec.model_id != model_id:
            raise ValueError(f"model {model_id}: atoms belong to {atoms[0].spec.model_id!r}")
        self.model_id = model_id
        self.family = family
        self.config: Mapping[str, ConfigValue] = MappingProxyType(dict(sorted(config.items())))
        self.atoms: tuple[Atom, ...] = tuple(atoms)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.atoms)

    @property
    def specs(self) -> tuple[AtomSpec, ...]:
        return tuple(a.spec for a in self.atoms)

    def span(self, start: int = 0, end: int | None = None) -> Span:
        """Atoms [start, end) as a `Span` sharing this model's modules (end defaults to N).

        Raises:
            ValueError: not a non-empty range inside the model.
        """
        stop = len(self.atoms) if end is None else end
        if not 0 <= start < stop <= len(self.atoms):
            raise ValueError(
                f"span [{start}, {stop}) is not inside model {self.model_id} "
                f"of {len(self.atoms)} atoms"
            )
        return Span(self.atoms[start:stop])

    def with_atoms(self, atoms: Sequence[Atom]) -> Model:
        """A model with the same id, family, config and tokenizer but other atoms
        (a head appended, atoms converted to another dtype, ...)."""
        return Model(
            model_id=self.model_id,
            family=self.family,
            config=self.config,
            atoms=atoms,
            tokenizer=self.tokenizer,
        )

    def __repr__(self) -> str:
        kinds = ",".join(a.spec.kind.value for a in self.atoms)
        return f"Model({self.model_id!r}, family={self.family!r}, atoms=[{kinds}])"


def save_model(model: Model, folder: Path) -> ModelManifest:
    """Write a model folder: weights (content-addressed), tokenizer.json and manifest.json.

    Returns:
        The manifest written.
    """
    folder = Path(folder)
    store = WeightStore(folder / WEIGHTS_DIR)
    entries = []
    for atom in model.atoms:
        ref = store.put(atom.state_dict())
        entries.append(
            AtomEntry(atom.spec.index, atom.spec.kind, ref.digest, ref.nbytes, atom.spec)
        )
    tok_entry = None
    if model.tokenizer is not None:
        raw = model.tokenizer.to_json().encode()
        (folder / TOKENIZER_FILE).write_bytes(raw)
        tok_entry = TokenizerEntry(
            digest_hex(raw), model.tokenizer.max_length, model.tokenizer.padding_side
        )
    manifest = ModelManifest(
        model_id=model.model_id,
        family=model.family,
        config=tuple(sorted(model.config.items())),
        atoms=tuple(entries),
        tokenizer=tok_entry,
    )
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    log.info(
        "model_saved",
        model_id=model.model_id,
        atoms=len(entries),
        digest=manifest.digest[:12],
        bytes=sum(e.nbytes for e in entries),
    )
    return manifest


def read_manifest(folder: Path) -> ModelManifest:
    """Read `folder/manifest.json`.

    Raises:
        ModelFormatError: missing or invalid.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelFormatError(f"model folder {folder} has no {MANIFEST_FILE}") from None
    return ModelManifest.from_json(text)


def load_atoms(
    folder: Path,
    entries: Sequence[AtomEntry],
    *,
    build: AtomBuilder = build_atom,
    reader: FileReader | None = None,
) -> list[Atom]:
    """Build the atoms of `entries` and load their verified weights from `folder/weights`
    (read with `reader`, e.g. decrypting files sealed at rest; default: plain files).

    Raises:
        WeightsError: a weight file is missing or corrupt (the message names it).
        ModelFormatError: a spec cannot be built or its weights do not fit it.
    """
    store = WeightStore(Path(folder) / WEIGHTS_DIR, reader=reader)
    atoms = []
    for entry in entries:
        atom = build(entry.spec)
        load_state(atom, store.get(entry.digest), str(store.path(entry.digest)))
        atom.eval()
        atoms.append(atom)
    return atoms


def frozen_prefix(config: Mapping[str, ConfigValue], n_atoms: int) -> int:
    """How many leading atoms of a model never train (their parameters are frozen):

    - a Nexus model with `freeze_base`: its pretrained base (`base_layers` + 1 atoms);
    - a classifier trained by `train classify` (`head_of` names its parent): all but its head;
    - anything else: none.
    """
    base = config.get("base_layers")
    if config.get("freeze_base") is True and isinstance(base, int) and not isinstance(base, bool):
        return min(n_atoms, base + 1)
    if isinstance(config.get("head_of"), str):
        return max(0, n_atoms - 1)
    return 0


def apply_frozen(atoms: Sequence[Atom], config: Mapping[str, ConfigValue], n_atoms: int) -> None:
    """Mark the parameters of the model's frozen prefix (`frozen_prefix`) as not trainable."""
    prefix = frozen_prefix(config, n_atoms)
    for atom in atoms:
        if atom.spec.index < prefix:
            atom.requires_grad_(False)


def load_span(
    folder: Path,
    start: int,
    end: int,
    *,
    build: AtomBuilder = build_atom,
    reader: FileReader | None = None,
) -> Span:
    """Load only atoms [start, end) of the model in `folder`: what one host serves.

    Raises:
        ValueError: the range is not inside the model.
        WeightsError, ModelFormatError: as `load_atoms`.
    """
    manifest = read_manifest(folder)
    atoms = load_atoms(folder, manifest.entries(start, end), build=build, reader=reader)
    apply_frozen(atoms, dict(manifest.config), len(manifest.atoms))
    return Span(atoms)


def load_model(
    folder: Path, *, build: AtomBuilder = build_atom, reader: FileReader | None = None
) -> Model:
    """Load a whole saved model, tokenizer included (its file verified by digest).

    Raises:
        WeightsError: a weight or tokenizer file is missing or corrupt.
        ModelFormatError: as `load_atoms`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    atoms = load_atoms(folder, manifest.atoms, build=build, reader=reader)
    apply_frozen(atoms, dict(manifest.config), len(manifest.atoms))
    tokenizer = None
    if manifest.tokenizer is not None:
        tokenizer = _load_tokenizer(folder / TOKENIZER_FILE, manifest.tokenizer)
    return Model(
        model_id=manifest.model_id,
        family=manifest.family,
        config=dict(manifest.config),
        atoms=atoms,
        tokenizer=tokenizer,
    )


def _load_tokenizer(path: Path, entry: TokenizerEntry) -> TextTokenizer:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"tokenizer file {path} is missing") from None
    got = digest_hex(raw)
    if got != entry.digest:
        raise WeightsError(f"tokenizer file {path} is corrupt: expected {entry.digest}, got {got}")
    return TextTokenizer.from_json(
        raw.decode(), max_length=entry.max_length, padding_side=entry.padding_side
    )
