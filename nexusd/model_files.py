"""A node's model files at rest and as blobs: sealed weight files, sources to serve, sinks to fetch.

Rule 1: weight files in a node's own models directory (`<data_dir>/models`) are sealed with
a key derived from the mesh secret (`mesh.identity.at_rest`); their names stay the BLAKE2b
digest of the plaintext. They are decrypted only into memory (`WeightFiles.read`), and a
file that does not open is a `WeightsError` naming it. A models directory set in the config
(`atoms.models_dir`, possibly shared by several nodes or meshes) is left in plaintext.
Rule 2: a blob a peer asks for is a file named by its digest: a model's `manifest.json`
(its manifest digest), `tokenizer.json` (the manifest's tokenizer digest) or a weight file
(served decrypted, range by range: it travels on the mesh's encrypted channels).
Rule 3: a download lands in `<digest>.safetensors.part` (sealed chunks at their places,
with a `.idx` of the pieces stored), so an interrupted one resumes; only a verified whole
becomes the weight file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from atoms.errors import WeightsError
from atoms.model import MANIFEST_FILE, TOKENIZER_FILE, WEIGHTS_DIR, read_manifest
from atoms.weights import SUFFIX, digest_hex
from mesh.blobs import PIECE_BYTES, piece_range
from mesh.errors import DecryptionFailed
from mesh.identity.at_rest import (
    CHUNK_BYTES,
    HEADER_BYTES,
    MAGIC_BYTES,
    SealedFiles,
    is_sealed,
    is_sealed_prefix,
)

from .model_registry import ModelRegistry
from .paths import NodePaths

log = structlog.get_logger(__name__)
assert PIECE_BYTES == CHUNK_BYTES  # a fetched piece is sealed as one chunk


class WeightFiles:
    """Reads, seals and serves the weight files of one node.

    Args:
        sealer: the at-rest cipher of the mesh secret; None outside a mesh (nothing opens).
        seal_new: whether files this node writes are sealed (its own models directory).
    """

    def __init__(self, sealer: SealedFiles | None, *, seal_new: bool) -> None:
        self.sealer = sealer
        self.seal_new = seal_new and sealer is not None

    def __repr__(self) -> str:
        return f"WeightFiles(key={'yes' if self.sealer else 'no'}, seal_new={self.seal_new})"

    def read(self, path: Path) -> bytes:
        """The verified plaintext of a weight file (see `atoms.weights.FileReader`): a plain
        file is hashed against its name; a sealed one is authenticated, its key bound to
        that name (`mesh.identity.at_rest`), so it is not hashed again.

        Raises:
            WeightsError: sealed and no mesh secret, or it does not open (names the file).
            FileNotFoundError: missing.
        """
        with open(path, "rb") as f:  # one open: a file sealed meanwhile is read whole
            if not is_sealed_prefix(f.read(MAGIC_BYTES)):
                f.seek(0)
                data = f.read()
                got = digest_hex(data)
                if got != path.name.removesuffix(SUFFIX):
                    raise WeightsError(f"weight file {path} is corrupt: its BLAKE2b is {got}")
                return data
            if self.sealer is None:
                raise WeightsError(
                    f"weight file {path} is encrypted at rest and this node has no mesh secret"
                )
            f.seek(0)
            try:
                return self.sealer.read_open(f, path)
            except DecryptionFailed as exc:
                raise WeightsError(str(exc)) from None

    def set_secret(self, mesh_secret: bytes, *, seal_new: bool) -> None:
        """Use the at-rest key of this mesh secret (after joining a mesh)."""
        self.sealer = SealedFiles(mesh_secret)
        self.seal_new = seal_new

    def seal_folder(self, folder: Path) -> int:
        """Seal every plaintext weight file of a model folder in place (each verified
        against its name first); returns how many were sealed."""
        if not self.seal_new or self.sealer is None:
            return 0
        count = 0
        for path in sorted((folder / WEIGHTS_DIR).glob(f"*{SUFFIX}")):
            if is_sealed(path):
                continue
            data = path.read_bytes()
            if digest_hex(data) != path.name.removesuffix(SUFFIX):
                raise WeightsError(f"weight file {path} is corrupt (digest mismatch)")
            self.sealer.write(path, data)
            count += 1
        if count:
            log.info("weights_sealed", folder=str(folder), files=count)
        return count

    def source(self, path: Path) -> FileSource | None:
        """A blob source over a file (decrypting a sealed one), or None if unreadable."""
        try:
            if is_sealed(path):
                if self.sealer is None:
                    return None
                return FileSource(path, self.sealer.size(path), self.sealer)
            return FileSource(path, path.stat().st_size, None)
        except (OSError, DecryptionFailed):
            return None


@dataclass(frozen=True, slots=True)
class FileSource:
    """One file served as a blob (`mesh.blobs.BlobSource`)."""

    path: Path
    size: int
    sealer: SealedFiles | None

    def read(self, offset: int, length: int) -> bytes:
        if self.sealer is not None:
            return self.sealer.read_range(self.path, offset, length)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def resolve_blob(registry: ModelRegistry, files: WeightFiles, digest: bytes) -> FileSource | None:
    """The local file a blob digest names (Rule 2), or None."""
    want = digest.hex()
    for model_id in registry.available():
        folder = registry.models_dir / model_id
        try:
            m = registry.manifest(model_id)
        except Exception:  # boundary: a broken folder serves nothing, others still do
            continue
        if m.digest == want:
            return files.source(folder / MANIFEST_FILE)
        if m.tokenizer is not None and m.tokenizer.digest == want:
            return files.source(folder / TOKENIZER_FILE)
        if any(e.digest == want for e in m.atoms):
            path = folder / WEIGHTS_DIR / f"{want}{SUFFIX}"
            if path.is_file():
                return files.source(path)
    return None


def has_weights(folder: Path, digest: str) -> bool:
    return (folder / WEIGHTS_DIR / f"{digest}{SUFFIX}").is_file()


class PartSink:
    """A weight file being downloaded (`mesh.blobs.PieceSink`; Rule 3)."""

    def __init__(self, target: Path, digest: str, size: int, files: WeightFiles) -> None:
        if files.sealer is None:
            raise WeightsError("a download needs the mesh secret (to seal its pieces)")
        self.target = target
        self.digest = digest
        self.size = size
        self.files = files
        self.sealer: SealedFiles = files.sealer
        self.part = target.with_name(target.name + ".part")
        self.idx = target.with_name(target.name + ".part.idx")

    def _header(self) -> bytes | None:
        try:
            with open(self.part, "rb") as f:
                header = f.read(HEADER_BYTES)
            chunk, size = self.sealer.parse_header(header, self.part)
        except (OSError, DecryptionFailed):
            return None
        return header if (chunk, size) == (CHUNK_BYTES, self.size) else None

    def stored(self) -> set[int]:
        if self._header() is None:
            self.discard()
            return set()
        try:
            raw = self.idx.read_bytes()
        except FileNotFoundError:
            return set()
        return {int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw) - 3, 4)}

    def write(self, index: int, data: bytes) -> None:
        header = self._header()
        if header is None:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            header = self.sealer.new_header(self.size)
            with open(self.part, "wb") as f:
                f.write(header)
            self.idx.unlink(missing_ok=True)
        _, length = piece_range(self.size, index)
        if len(data) != length:
            raise WeightsError(f"piece {index} of {self.target.name}: {len(data)} bytes")
        with open(self.part, "r+b") as f:
            f.seek(self.sealer.chunk_offset(CHUNK_BYTES, index))
            f.write(self.sealer.seal_chunk(header, index, data, self.part))
        with open(self.idx, "ab") as f:
            f.write(index.to_bytes(4, "big"))

    def verify(self) -> bool:
        try:
            return self.sealer.verify_digest(self.part) == self.digest
        except (OSError, DecryptionFailed) as exc:
            log.warning("weights_part_unreadable", file=str(self.part), reason=str(exc))
            return False

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.idx.unlink(missing_ok=True)

    def commit(self) -> None:
        if self.files.seal_new:
            os.replace(self.part, self.target)
        else:
            data = self.sealer.read(self.part)
            tmp = self.target.with_name(self.target.name + ".plain")
            tmp.write_bytes(data)
            os.replace(tmp, self.target)
            self.part.unlink(missing_ok=True)
        self.idx.unlink(missing_ok=True)


def weight_files(paths: NodePaths, *, seal_new: bool) -> WeightFiles:
    """The weight files of a node: sealed with its mesh secret's key when it has one and
    `seal_new` (its own models directory, Rule 1)."""
    secret = paths.mesh_secret
    sealer = SealedFiles(secret.read_bytes()) if secret.is_file() else None
    return WeightFiles(sealer, seal_new=seal_new)


def node_registry(models_dir: Path, paths: NodePaths, *, own: bool) -> ModelRegistry:
    """A registry over a node's models directory that opens its sealed weight files (for
    the CLI's offline commands: compress, distill students, --max-memory levels)."""
    return ModelRegistry(models_dir, reader=weight_files(paths, seal_new=own).read)


def blake2b_hex(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def manifest_of(folder: Path) -> str:
    """The digest of a model folder's manifest."""
    return read_manifest(folder).digest
