"""Which models a node can serve or drive, and where their files are.

Rule 1: a model is a folder in the models directory in the `atoms.model.save_model`
layout (manifest.json + content-addressed weights + tokenizer.json); a host loads only the
atoms of its span, each verified against the manifest digest.
Rule 2: the built-in models are materialised on first use, deterministically (the bundled
MiniLM weights; Nexus 1.1 blocks from a fixed seed), so every node of a mesh builds
byte-identical weights and the same manifest digest without transferring a byte.
Rule 3: any other model id must be a folder the user put there (e.g. a Llama checkpoint
imported with `nexusd models import`); an unknown id is a `not_found` error naming the
directory searched.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from atoms.errors import ModelFormatError, WeightsError
from atoms.model import Model, load_model, load_span, read_manifest, save_model
from atoms.partition import ModelManifest
from atoms.span import Span
from atoms.tokenizer import TextTokenizer
from atoms.weights import FileReader, digest_hex

from .chat_template import copy_shipped
from .errors import ApiError

log = structlog.get_logger(__name__)

NEXUS_SEED = 11  # the seed of the built-in Nexus 1.1 blocks: same weights on every node
# data/models/nexus-1.1.safetensors, written by scripts/ship_default_model.py
NEXUS_SHIPPED_SHA256 = "a815ccf74416debf6d330f79315e7f2ab747c07f0260f33dd75b8ee200991364"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What the job engine needs to know of a model without loading its weights."""

    model_id: str
    family: str
    n_atoms: int
    causal: bool  # decoder (generation) vs encoder (embeddings)
    digest: str
    vocab_size: int


def _build_minilm() -> Model:
    from atoms.minilm import load_minilm

    return load_minilm(model_id="minilm")


def _build_nexus() -> Model:
    """Nexus 1.1 with the blocks and head the mesh trained (data/models/README.md)."""
    from atoms.nexus import NexusConfig, build_nexus, load_shipped, shipped_weights_path

    model = build_nexus(None, NexusConfig(), NEXUS_SEED, model_id="nexus-1.1")
    return load_shipped(model, shipped_weights_path(), NEXUS_SHIPPED_SHA256)


def _build_nexus_random() -> Model:
    from atoms.nexus import NexusConfig, build_nexus

    return build_nexus(None, NexusConfig(), NEXUS_SEED, model_id="nexus-1.1-random")


def _save(model: Model, folder: Path) -> None:
    if model.family == "nexus":
        from atoms.nexus import save_nexus

        save_nexus(model, folder)
    else:
        save_model(model, folder)


BUILTINS: dict[str, Callable[[], Model]] = {
    "minilm": _build_minilm,
    "nexus-1.1": _build_nexus,  # trained by the mesh itself
    "nexus-1.1-random": _build_nexus_random,  # the same architecture, blocks untrained
}
# What each built-in is built from: a folder materialised from another version is rebuilt
# (a node updated to new shipped weights must not keep serving the old ones). Bump a
# built-in's entry whenever its builder changes what it produces.
BUILTIN_VERSIONS: dict[str, str] = {
    "minilm": "1",
    "nexus-1.1": NEXUS_SHIPPED_SHA256,
    "nexus-1.1-random": f"seed-{NEXUS_SEED}",
}
DEFAULT_GENERATE_MODEL = "nexus-1.1"
DEFAULT_EMBED_MODEL = "minilm"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainedHead:
    """A classifier trained by `nexusd train classify`: its parent's pooled embeddings,
    then its own head atom (the last one) over `labels`."""

    parent: str
    labels: tuple[str, ...]
    index: int


class ModelRegistry:
    """Model folders under `models_dir`; built-ins are created there when first needed."""

    def __init__(self, models_dir: Path, *, reader: FileReader | None = None) -> None:
        self.models_dir = models_dir
        self._manifests: dict[str, ModelManifest] = {}
        self.reader = reader  # reads weight files (decrypting those sealed at rest)
        self.on_saved: Callable[[str], None] | None = None  # a model was added (`save`)
        # model -> (what the file was when verified, its tokenizer): parsing tokenizer.json
        # costs ~16 ms, more than a short job's whole prefill on the origin
        self._tokenizers: dict[str, tuple[tuple[str, int, int], TextTokenizer]] = {}

    def __repr__(self) -> str:
        return f"ModelRegistry({self.models_dir}, loaded={sorted(self._manifests)})"

    def folder(self, model_id: str) -> Path:
        """The model's folder, materialising a built-in if needed.

        Raises:
            ApiError(not_found): neither a built-in nor a folder in the models directory.
        """
        if not model_id or "/" in model_id or model_id.startswith("."):
            raise ApiError("bad_request", f"invalid model id {model_id!r}")
        folder = self.models_dir / model_id
        if (folder / "manifest.json").is_file() and self._current(model_id):
            return folder
        if model_id not in BUILTINS:
            known = sorted(set(BUILTINS) | set(self.available()))
            raise ApiError(
                "not_found",
                f"unknown model {model_id!r}; known: {', '.join(known)} "
                f"(folders in {self.models_dir})",
            )
        self._materialise(model_id, folder)
        return folder

    def available(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if (p / "manifest.json").is_file())

    def _version_path(self, model_id: str) -> Path:
        return self.models_dir / f".{model_id}.builtin"

    def _current(self, model_id: str) -> bool:
        """Whether a built-in's folder was built from this version (other ids: always)."""
        if model_id not in BUILTINS:
            return True
        try:
            return self._version_path(model_id).read_text() == BUILTIN_VERSIONS[model_id]
        except OSError:
            return False  # materialised before versions were recorded

    def _materialise(self, model_id: str, folder: Path) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.models_dir / f".{model_id}.lock"
        with open(lock_path, "w") as lock:  # several daemons may share a models dir
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            stale = (folder / "manifest.json").is_file()
            if stale and self._current(model_id):
                return  # another process built it meanwhile
            log.info("model_materialising", model=model_id, folder=str(folder), stale=stale)
            tmp = self.models_dir / f".{model_id}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _save(BUILTINS[model_id](), tmp)
            old = self.models_dir / f".{model_id}.old{os.getpid()}"
            if stale:  # a running process keeps the files it has open
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
            version, written = self._version_path(model_id), tmp.with_suffix(".version")
            written.write_text(BUILTIN_VERSIONS[model_id])
            os.replace(written, version)
            self._manifests.pop(model_id, None)

    def save(self, model: Model) -> Path:
        """Add a model made on this node (a training result) as a folder of its own.

        Raises:
            ApiError(conflict): a model with that id exists already.
        """
        self.models_dir.mkdir(parents=True, exist_ok=True)
        folder = self.models_dir / model.model_id
        tmp = self.models_dir / f".{model.model_id}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(model, tmp)
        if (folder / "manifest.json").is_file() or model.model_id in BUILTINS:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ApiError("conflict", f"model {model.model_id!r} exists already")
        os.replace(tmp, folder)
        self._manifests.pop(model.model_id, None)
        if self.on_saved is not None:
            self.on_saved(model.model_id)
        return folder

    def forget(self, model_id: str) -> None:
        """Drop the cached manifest of `model_id` (its folder changed)."""
        self._manifests.pop(model_id, None)

    def trained_head(self, model_id: str) -> TrainedHead | None:
        """The trained classifier head of `model_id`, or None for any other model."""
        m = self.manifest(model_id)
        config = dict(m.config)
        parent, labels = config.get("head_of"), config.get("labels")
        if not isinstance(parent, str) or not isinstance(labels, str):
            return None
        names = json.loads(labels)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ApiError("internal", f"model {model_id}: its labels are not a list of names")
        return TrainedHead(parent=parent, labels=tuple(names), index=len(m.atoms) - 1)

    def manifest(self, model_id: str) -> ModelManifest:
        if model_id not in self._manifests:
            self._manifests[model_id] = read_manifest(self.folder(model_id))
        return self._manifests[model_id]

    def info(self, model_id: str) -> ModelInfo:
        m = self.manifest(model_id)
        causal = m.family in ("nexus", "llama")
        vocab = self.config_int(model_id, "vocab_size", 0)
        return ModelInfo(
            model_id=m.model_id,
            family=m.family,
            n_atoms=len(m.atoms),
            causal=causal,
            digest=m.digest,
            vocab_size=vocab,
        )

    def eos_token_ids(self, model_id: str) -> tuple[int, ...]:
        """The end-of-sequence ids the model declares (config `eos_token_ids`, "2" or
        "128001,128009": Llama imports take them from config.json or generation_config.json,
        Nexus 1.1 declares [SEP]); generation stops at any of them. () when none."""
        raw = dict(self.manifest(model_id).config).get("eos_token_ids")
        try:
            return tuple(int(i) for i in str(raw).split(",") if i.strip()) if raw else ()
        except ValueError:
            raise ApiError(
                "bad_request",
                f"model {model_id}: config eos_token_ids must be comma-separated ints, got {raw!r}",
            ) from None

    def config_int(self, model_id: str, key: str, default: int) -> int:
        """An integer of the model's config (e.g. hidden_size), or `default` if absent."""
        value = dict(self.manifest(model_id).config).get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    def load_span(self, model_id: str, start: int, end: int, dtype: str = "float32") -> Span:
        """Atoms [start, end), weights verified, computing in `dtype` (float32 or bfloat16)."""
        m = self.manifest(model_id)
        if not 0 <= start < end <= len(m.atoms):
            raise ApiError(
                "bad_request",
                f"span [{start},{end}) is not inside {model_id} of {len(m.atoms)} atoms",
            )
        if dtype not in ("float32", "bfloat16"):
            raise ApiError("bad_request", f"dtype: expected float32 or bfloat16, got {dtype!r}")
        span = load_span(self.folder(model_id), start, end, reader=self.reader)
        if dtype == "float32":
            return span
        from atoms.precision import to_dtype

        return Span([to_dtype(a, dtype) for a in span.atom_list()])

    def tokenizer(self, model_id: str) -> TextTokenizer:
        """The model's tokenizer, its file verified against the manifest. Kept parsed while
        the file stays as verified (same manifest digest, size and modification time).

        Raises:
            ApiError(bad_request): the model takes no text.
            WeightsError: the tokenizer file is missing or corrupt.
        """
        m = self.manifest(model_id)
        if m.tokenizer is None:
            raise ApiError("bad_request", f"model {model_id} has no tokenizer (it takes no text)")
        path = self.folder(model_id) / "tokenizer.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise WeightsError(f"tokenizer file {path} is missing") from None
        seen = (m.tokenizer.digest, st.st_size, st.st_mtime_ns)
        kept = self._tokenizers.get(model_id)
        if kept is not None and kept[0] == seen:
            return kept[1]
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise WeightsError(f"tokenizer file {path} is missing") from None
        if digest_hex(raw) != m.tokenizer.digest:
            raise WeightsError(f"tokenizer file {path} is corrupt (digest mismatch)")
        tok = TextTokenizer.from_json(
            raw.decode(), max_length=m.tokenizer.max_length, padding_side=m.tokenizer.padding_side
        )
        self._tokenizers[model_id] = (seen, tok)
        return tok

    def load_model(self, model_id: str) -> Model:
        return load_model(self.folder(model_id), reader=self.reader)


def import_model(folder: Path, model_id: str, models_dir: Path, *, dtype: str = "float32") -> Path:
    """Convert a local Hugging Face folder (Llama-style decoder or BERT encoder) into a model
    folder of the registry: atoms with content-addressed weights, manifest, tokenizer.

    Raises:
        ApiError(bad_request): not a folder, an unsupported architecture, or the id is taken.
        ModelFormatError, WeightsError: unreadable config or weights (named).
    """
    import json

    config = folder / "config.json"
    if not config.is_file():
        raise ApiError(
            "bad_request", f"{folder} has no config.json (expected a Hugging Face model folder)"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ApiError("bad_request", f"{config} is not a JSON object: {exc}") from None
    target = models_dir / model_id
    if target.exists():
        raise ApiError("conflict", f"model {model_id!r} already exists in {models_dir}")
    if model_type == "llama":
        from atoms.llama import load_llama

        model = load_llama(folder, model_id=model_id, dtype=dtype)
    elif model_type == "bert":
        from atoms.bert import load_bert

        model = load_bert(folder, model_id=model_id, dtype=dtype)
    else:
        raise ApiError(
            "bad_request",
            f"model_type {model_type!r} is not supported; "
            "expected 'llama' (decoder) or 'bert' (encoder)",
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".{model_id}.import{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    copy_shipped(folder, tmp)  # its chat template, for /v1/chat/completions
    os.replace(tmp, target)
    return target


def parse_host_spec(spec: str, registry: ModelRegistry) -> tuple[str, int, int]:
    """ "MODEL" or "MODEL:START-END" -> (model, start, end); END exclusive.

    Raises:
        ApiError(bad_request): a malformed spec or a range outside the model.
    """
    model_id, sep, rng = spec.partition(":")
    n = len(registry.manifest(model_id).atoms)
    if not sep:
        return model_id, 0, n
    try:
        a, b = (int(v) for v in rng.split("-", 1))
    except ValueError:
        raise ApiError("bad_request", f"host spec {spec!r}: expected MODEL:START-END") from None
    if not 0 <= a < b <= n:
        raise ApiError(
            "bad_request",
            f"host spec {spec!r}: {model_id} has atoms 0..{n - 1}, "
            f"expected 0 <= START < END <= {n}",
        )
    return model_id, a, b


__all__ = ["ModelFormatError", "ModelInfo", "ModelRegistry", "parse_host_spec"]
