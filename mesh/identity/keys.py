"""Node keys: the Ed25519 key of a node (its id), its key file, and signature checks.

Rule 1: the node id is the Ed25519 verify key; a seed never appears in a repr or a log.
Rule 2: a key file is written atomically with mode 0600 and refused on load when group or
others can read it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import NewType

from mesh.errors import (
    DecryptionFailed,
    InsecureKeyFile,
    InvalidSignature,
    KeyFileError,
    KeyFileExists,
)

from ._nacl import Ed25519, Rejected, ed25519_verify

NodeId = NewType("NodeId", bytes)  # 32-byte Ed25519 verify key

NODE_ID_BYTES = 32
SIGNATURE_BYTES = 64
SEED_BYTES = 32
DIGEST_BYTES = 32
_KEY_MAGIC = b"nexus-ed25519-seed-v1\n"  # key file = magic + 32-byte seed


def short_id(node_id: bytes) -> str:
    """First 8 hex chars of a node id, for logs and tables."""
    return bytes(node_id[:4]).hex()


def digest(data: bytes) -> bytes:
    """BLAKE2b-256 of `data`."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


class NodeKey:
    """The Ed25519 signing key of this node. Its verify key is the node id.

    Build with `generate`, `from_seed` or `load`. The seed never appears in repr or logs.
    """

    __slots__ = ("_sk", "node_id")

    def __init__(self, signing_key: Ed25519) -> None:
        self._sk = signing_key
        self.node_id: NodeId = NodeId(signing_key.public)

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key."""
        return cls(Ed25519())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """The key derived from a 32-byte seed (ValueError for another length)."""
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValueError(f"seed: expected {SEED_BYTES} bytes, got {len(seed)}")
        return cls(Ed25519(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Handle with care; never log it."""
        return self._sk.seed

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of `data`."""
        return self._sk.sign(data)

    def open_sealed(self, data: bytes) -> bytes:
        """Decrypt a sealed box made for this key (`mesh.identity.seal_to`).

        Raises:
            DecryptionFailed: not sealed to this key, or corrupted.
        """
        try:
            return self._sk.open_sealed(data)
        except Rejected:
            raise DecryptionFailed(
                f"sealed box of {len(data)} bytes does not open with our key"
            ) from None

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write the key file with mode 0600, atomically.

        The key is written to a temp file in the same directory (created O_EXCL, 0600,
        fsynced), then linked into place with `os.link`, which fails if `path` exists:
        no window in which another writer can be overwritten. With `force`, `os.replace`.

        Raises:
            KeyFileExists: `path` exists and `force` is false.
            OSError: the directory is not writable, and so on.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask can only remove bits; make it exact
                os.write(fd, _KEY_MAGIC + self.seed)
                os.fsync(fd)
            finally:
                os.close(fd)
            if force:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise KeyFileExists(
                        f"key file {path} already exists; refusing to overwrite (use force)"
                    ) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKey:
        """Read a key file written by `save`.

        Raises:
            InsecureKeyFile: the file is accessible by group or others.
            KeyFileError: not a regular file, or wrong size or format.
            FileNotFoundError: no such file.
        """
        path = Path(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path}: expected a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise InsecureKeyFile(
                    f"key file {path} has mode {mode:04o}, expected 0600 (owner only); "
                    f"fix with: chmod 600 {path}"
                )
            expected = len(_KEY_MAGIC) + SEED_BYTES
            if st.st_size != expected:
                raise KeyFileError(f"key file {path}: expected {expected} bytes, got {st.st_size}")
            data = os.read(fd, expected)
        finally:
            os.close(fd)
        if not data.startswith(_KEY_MAGIC):
            raise KeyFileError(f"key file {path}: not a nexus Ed25519 key file (bad header)")
        return cls(Ed25519(data[len(_KEY_MAGIC) :]))

    def __repr__(self) -> str:
        return f"NodeKey(node_id={short_id(self.node_id)})"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename itself is done
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def verify_signature(node_id: bytes, data: bytes, signature: bytes) -> None:
    """Check an Ed25519 detached signature.

    Raises:
        InvalidSignature: wrong key or signature length, or the signature does not verify.
    """
    if len(node_id) != NODE_ID_BYTES:
        raise InvalidSignature(f"signer id: expected {NODE_ID_BYTES} bytes, got {len(node_id)}")
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature(f"signature: expected {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        ed25519_verify(node_id, data, signature)
    except Rejected:
        raise InvalidSignature(f"signature by {short_id(node_id)} does not verify") from None
