"""Files encrypted at rest under a key derived from the mesh secret (`SealedFiles`).

Format: a 36-byte header (magic `NXSEAL2\\n` for AES-256-GCM, the default where the CPU
has AES-NI, or `NXSEAL1\\n` for ChaCha20-Poly1305; chunk size u32, plaintext size u64,
random salt 16 bytes), then the plaintext in chunks of `chunk` bytes, each sealed (16-byte
tag) under a key of its own file: BLAKE2b(key=the at-rest key, the header + the file's
name up to its first dot, i.e. the content digest a weight file is named by), with nonce =
chunk index (8 bytes) + a last-chunk flag (4 bytes).

Rule 1: authenticated: a flipped byte, a truncated, extended or reordered file, a chunk
moved between files, a file renamed to another digest or a header edited all fail to open
(`DecryptionFailed`, naming the file); the key is never derived without the mesh secret.
So a sealed file that opens holds what a holder of the mesh secret sealed under that name
(weight files are verified against their digest before they are sealed).
Rule 2: chunked: sealing, opening and serving a range never hold more than the plaintext
plus one chunk; a download writes pieces at their chunk positions, in any order.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from io import BufferedReader
from pathlib import Path

from mesh.errors import DecryptionFailed

from ._nacl import (
    AEAD_TAG_BYTES,
    Rejected,
    aead_decrypt,
    aead_encrypt,
    aes256gcm_available,
    aes256gcm_decrypt_into,
    aes256gcm_encrypt,
    fresh_bytes,
    random_bytes,
)

MAGIC_CHACHA = b"NXSEAL1\n"
MAGIC_AES = b"NXSEAL2\n"
MAGIC = MAGIC_AES if aes256gcm_available() else MAGIC_CHACHA  # what new files get
MAGIC_BYTES = 8
HEADER_BYTES = MAGIC_BYTES + 4 + 8 + 16
CHUNK_BYTES = 1 << 20
_PERSON = b"nexus-at-rest"  # BLAKE2b personalisation of the at-rest key (<= 16 bytes)


def is_sealed(path: Path) -> bool:
    """True if the file starts with the sealed-file magic."""
    try:
        with open(path, "rb") as f:
            return is_sealed_prefix(f.read(MAGIC_BYTES))
    except OSError:
        return False


def is_sealed_prefix(head: bytes) -> bool:
    """True if `head` (a file's first bytes) is a sealed file's magic."""
    return head[:MAGIC_BYTES] in (MAGIC_AES, MAGIC_CHACHA)


def _n_chunks(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


class SealedFiles:
    """Seal and open files with the at-rest key of one mesh secret (never shown)."""

    __slots__ = ("_key",)

    def __init__(self, mesh_secret: bytes) -> None:
        if len(mesh_secret) != 32:
            raise ValueError(f"mesh secret: expected 32 bytes, got {len(mesh_secret)}")
        self._key = hashlib.blake2b(mesh_secret, digest_size=32, person=_PERSON).digest()

    def __repr__(self) -> str:
        return "SealedFiles(...)"

    # ---- header and chunks -------------------------------------------------------------

    @staticmethod
    def new_header(size: int, chunk: int = CHUNK_BYTES) -> bytes:
        return MAGIC + chunk.to_bytes(4, "big") + size.to_bytes(8, "big") + random_bytes(16)

    @staticmethod
    def parse_header(header: bytes, path: Path) -> tuple[int, int]:
        """(chunk, size) of a header, or DecryptionFailed naming `path`."""
        if len(header) != HEADER_BYTES or not is_sealed_prefix(header):
            raise DecryptionFailed(f"weight file {path} is not a sealed file (bad header)")
        chunk = int.from_bytes(header[8:12], "big")
        size = int.from_bytes(header[12:20], "big")
        if not 1 <= chunk <= 1 << 26 or size >= 1 << 48:
            raise DecryptionFailed(f"weight file {path}: corrupt header")
        return chunk, size

    def _file_key(self, header: bytes, path: Path) -> bytes:
        bind = path.name.partition(".")[0].encode()  # "<digest>.safetensors[.part]"
        return hashlib.blake2b(header + bind, key=self._key, digest_size=32).digest()

    @staticmethod
    def _nonce(index: int, last: bool) -> bytes:
        return index.to_bytes(8, "big") + (b"\0\0\0\1" if last else b"\0\0\0\0")

    @staticmethod
    def chunk_offset(header_chunk: int, index: int) -> int:
        return HEADER_BYTES + index * (header_chunk + AEAD_TAG_BYTES)

    def seal_chunk(self, header: bytes, index: int, data: bytes, path: Path) -> bytes:
        """Chunk `index` of the file at `path` (its name binds the key) with `header`."""
        chunk, size = self.parse_header(header, path)
        last = index == _n_chunks(size, chunk) - 1
        return self._seal(header, self._file_key(header, path), self._nonce(index, last), data)

    @staticmethod
    def _seal(header: bytes, key: bytes, nonce: bytes, data: bytes) -> bytes:
        if header.startswith(MAGIC_AES):
            return aes256gcm_encrypt(key, nonce, data)
        return aead_encrypt(key, nonce, data)

    # ---- whole files -------------------------------------------------------------------

    def write(self, path: Path, data: bytes) -> None:
        """Seal `data` into `path` (written to a temporary file, then renamed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self.new_header(len(data))
        key = self._file_key(header, path)
        n = _n_chunks(len(data), CHUNK_BYTES)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".seal-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                view = memoryview(data)
                for i in range(n):
                    part = bytes(view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES])
                    f.write(self._seal(header, key, self._nonce(i, i == n - 1), part))
            os.replace(tmp, path)
        except BaseException:  # cleanup, then re-raise: not a boundary
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, path: Path) -> int:
        """The plaintext size recorded in a sealed file's header."""
        with open(path, "rb") as f:
            return self.parse_header(f.read(HEADER_BYTES), path)[1]

    def read(self, path: Path) -> bytes:
        """The whole plaintext of a sealed file, chunk by chunk into one buffer.

        Raises:
            DecryptionFailed: not a sealed file, or any part of it does not authenticate
                (the message names the file and the chunk).
            OSError: unreadable.
        """
        with open(path, "rb") as f:
            return self.read_open(f, path)

    def read_open(self, f: BufferedReader, path: Path) -> bytes:
        """As `read`, from a file opened at its start (one inode, whatever renames)."""
        header = f.read(HEADER_BYTES)
        chunk, size = self.parse_header(header, path)
        if not header.startswith(MAGIC_AES):
            buf = bytearray(size)
            self._read_into(f, path, header, 0, _n_chunks(size, chunk), buf, 0)
            out = bytes(buf)
        else:  # decrypted straight into the bytes object returned: one copy of the plaintext
            out = fresh_bytes(size)
            self._read_into(f, path, header, 0, _n_chunks(size, chunk), out, 0)
        if f.read(1):
            raise DecryptionFailed(f"weight file {path} is corrupt: data after the end")
        return out

    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset+length) (the chunks that hold them, verified)."""
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
            chunk, size = self.parse_header(header, path)
            if offset + length > size:
                raise DecryptionFailed(f"weight file {path}: range past the end")
            first, last = offset // chunk, max(offset, offset + length - 1) // chunk
            buf = bytearray((last - first + 1) * chunk)
            got = self._read_into(f, path, header, first, last + 1, buf, 0)
        lo = offset - first * chunk
        return bytes(buf[lo : lo + length]) if got else b""

    def _read_into(
        self,
        f: BufferedReader,
        path: Path,
        header: bytes,
        first: int,
        end: int,
        out: bytes | bytearray,
        at: int,
    ) -> int:
        """Decrypt chunks [first, end) into `out[at:]` (a bytes `out`: AES files only,
        a fresh object from `fresh_bytes`)."""
        chunk, size = self.parse_header(header, path)
        n = _n_chunks(size, chunk)
        key = self._file_key(header, path)
        f.seek(self.chunk_offset(chunk, first))
        aes = header.startswith(MAGIC_AES)
        buf = bytearray(chunk + AEAD_TAG_BYTES)  # one buffer for every sealed chunk
        pos = at
        for i in range(first, end):
            plain_len = min(chunk, size - i * chunk) if i < n - 1 else size - (n - 1) * chunk
            got = f.readinto(memoryview(buf)[: plain_len + AEAD_TAG_BYTES])
            sealed = memoryview(buf)[:got]
            nonce = self._nonce(i, i == n - 1)
            try:
                if aes:
                    pos += aes256gcm_decrypt_into(key, nonce, sealed, out, pos)
                    continue
                plain = aead_decrypt(key, nonce, bytes(sealed))
            except Rejected:
                raise DecryptionFailed(
                    f"weight file {path} is corrupt or sealed with another mesh secret "
                    f"(chunk {i} of {n} does not authenticate)"
                ) from None
            assert isinstance(out, bytearray)
            out[pos : pos + len(plain)] = plain
            pos += len(plain)
        return pos - at

    def verify_digest(self, path: Path) -> str:
        """BLAKE2b-256 hex of the plaintext, decrypting chunk by chunk (bounded memory)."""
        h = hashlib.blake2b(digest_size=32)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
            chunk, size = self.parse_header(header, path)
            buf = bytearray(chunk)
            for i in range(_n_chunks(size, chunk)):
                got = self._read_into(f, path, header, i, i + 1, buf, 0)
                h.update(memoryview(buf)[:got])
        return h.hexdigest()
