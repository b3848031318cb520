"""Content-addressed weight store: one safetensors file per atom, named by its hash.

Rule 1: a weight file's name is the BLAKE2b-256 hex digest of its bytes, and those bytes are
the canonical safetensors encoding of the atom's state dict (`canonical_bytes`); the same
weights always give the same file name, on every host.
Rule 2: every load re-hashes the bytes and compares them with the name before anything is
decoded; a missing, unreadable or corrupt file raises `WeightsError` naming the file.
Rule 3: weights are only ever decoded with safetensors, never `torch.load` (no pickle).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import WeightsError

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
DIGEST_HEX_LEN = 64  # BLAKE2b-256
#: Reads a weight file's plaintext bytes (e.g. decrypting a file sealed at rest) verified
#: against the digest the file is named by (hashing them, or authenticating a sealed file
#: bound to that name); raises WeightsError naming the file when it cannot. Without one the
#: store reads the file as it is and hashes it.
FileReader = Callable[[Path], bytes]


def digest_hex(data: bytes) -> str:
    """BLAKE2b-256 of `data` as 64 lowercase hex characters."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def canonical_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The canonical safetensors encoding of a state dict (CPU, contiguous, no metadata).

    Tensors are cloned when they share storage (safetensors refuses aliases), so tied
    weights are stored twice; the name order does not matter (safetensors sorts).
    """
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[name] = t
    return st_save(flat)


@dataclass(frozen=True, slots=True)
class WeightRef:
    """Where an atom's weights live in a store: digest (file stem) and size in bytes."""

    digest: str
    nbytes: int

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if self.nbytes < 0:
            raise ValueError(f"weight file size must be >= 0, got {self.nbytes}")


def check_digest(digest: str) -> None:
    """Raise ValueError unless `digest` is 64 lowercase hex characters."""
    if len(digest) != DIGEST_HEX_LEN or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"weight digest must be 64 lowercase hex characters, got {digest!r}")


class WeightStore:
    """A folder of `<digest>.safetensors` files.

    Args:
        root: the folder; created on the first `put`.
        reader: how a file's bytes are read (default: as they are on disk).
    """

    def __init__(self, root: Path, *, reader: FileReader | None = None) -> None:
        self.root = Path(root)
        self._reader = reader

    def path(self, digest: str) -> Path:
        """The file that holds the weights with this digest (it may not exist)."""
        check_digest(digest)
        return self.root / f"{digest}{SUFFIX}"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, state: dict[str, torch.Tensor]) -> WeightRef:
        """Store a state dict; a no-op when the same content is already there.

        Returns:
            The `WeightRef` naming the file.
        """
        return self.put_bytes(canonical_bytes(state))

    def put_bytes(self, data: bytes, *, expect: str | None = None) -> WeightRef:
        """Store a weight file's raw bytes (e.g. received from a peer), verified first.

        Args:
            data: the file's bytes.
            expect: the digest the sender named it by; None to trust `data`'s own hash.

        Raises:
            WeightsError: `data` does not hash to `expect`, or is not valid safetensors.
        """
        digest = digest_hex(data)
        if expect is not None and digest != expect:
            raise WeightsError(
                f"weight file {expect}{SUFFIX} received corrupt: BLAKE2b-256 {digest}"
            )
        try:
            st_load(data)  # refuse to store what could never be loaded
        except SafetensorError as exc:
            raise WeightsError(
                f"weight file {digest}{SUFFIX} is not valid safetensors: {exc}"
            ) from None
        ref = WeightRef(digest, len(data))
        target = self.path(digest)
        if target.is_file() and digest_hex(target.read_bytes()) == digest:
            return ref  # already there and intact; a damaged copy is rewritten below
        self.root.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half file under a valid name.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:  # cleanup, then re-raise: not a boundary
            Path(tmp).unlink(missing_ok=True)
            raise
        return ref

    def read_bytes(self, digest: str) -> bytes:
        """The verified raw bytes of a stored weight file (to send to a peer).

        Raises:
            WeightsError: missing, unreadable or corrupt; the message names the file.
        """
        path = self.path(digest)
        try:
            if self._reader is not None:
                return self._reader(path)  # verified by the reader (see FileReader)
            data = path.read_bytes()
        except FileNotFoundError:
            raise WeightsError(f"weight file {path} is missing") from None
        except OSError as exc:
            raise WeightsError(f"weight file {path} is unreadable: {exc}") from None
        got = digest_hex(data)
        if got != digest:
            raise WeightsError(
                f"weight file {path} is corrupt: expected BLAKE2b-256 {digest}, got {got}"
            )
        return data

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        """Load and verify the state dict stored under `digest`.

        Raises:
            WeightsError: the file is missing or unreadable, its bytes do not hash to
                `digest`, or it is not a valid safetensors file; the message names the file.
        """
        data = self.read_bytes(digest)
        try:
            return st_load(data)
        except SafetensorError as exc:
            path = self.path(digest)
            raise WeightsError(f"weight file {path} is not valid safetensors: {exc}") from None

    def __repr__(self) -> str:
        return f"WeightStore({str(self.root)!r})"
