"""The one home of PyNaCl (libsodium): every call the identity package makes into it.

Rule 1: nothing else in the project imports nacl (tests/unit/test_layering.py checks);
`keys`, `secretbox` and `session` call these wrappers.
Rule 2: nacl's exceptions end here: a refusal is `Rejected`, which each caller turns into
its own `mesh.errors` error with the context it knows (whose key, which frame).
Rule 3: key material stays inside these objects; none has a repr that shows it.
"""

from __future__ import annotations

import ctypes

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

SECRETBOX_KEY_BYTES: int = nacl.secret.SecretBox.KEY_SIZE
SECRETBOX_OVERHEAD: int = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
AEAD_TAG_BYTES: int = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES


class Rejected(Exception):
    """libsodium refused: a key, signature or ciphertext that is not valid."""


def random_bytes(n: int) -> bytes:
    return bytes(nacl.utils.random(n))


class Ed25519:
    """An Ed25519 signing key: from a 32-byte seed, or fresh."""

    __slots__ = ("_sk",)

    def __init__(self, seed: bytes | None = None) -> None:
        self._sk = (
            nacl.signing.SigningKey.generate() if seed is None else nacl.signing.SigningKey(seed)
        )

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)

    @property
    def public(self) -> bytes:
        return bytes(self._sk.verify_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte detached signature of `data`."""
        return bytes(self._sk.sign(data).signature)

    def open_sealed(self, data: bytes) -> bytes:
        """Open a sealed box made for our key (`seal_to_ed25519`); `Rejected` otherwise."""
        private = self._sk.to_curve25519_private_key()
        try:
            return bytes(nacl.public.SealedBox(private).decrypt(data))
        except (nacl.exceptions.CryptoError, ValueError):
            raise Rejected("sealed box does not open") from None

    def __repr__(self) -> str:
        return "Ed25519(...)"


def ed25519_verify(public: bytes, data: bytes, signature: bytes) -> None:
    """Raise `Rejected` unless `signature` is `public`'s signature of `data`."""
    try:
        nacl.signing.VerifyKey(bytes(public)).verify(bytes(data), bytes(signature))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise Rejected("signature does not verify") from None


def seal_to_ed25519(public: bytes, data: bytes) -> bytes:
    """A sealed box (anonymous sender) to the Curve25519 form of an Ed25519 public key;
    `Rejected` if `public` is not a valid Ed25519 key."""
    try:
        curve = nacl.signing.VerifyKey(bytes(public)).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError):
        raise Rejected("not a valid Ed25519 key") from None
    return bytes(nacl.public.SealedBox(curve).encrypt(data))


class SecretBox:
    """XSalsa20-Poly1305 under one 32-byte key, random nonces."""

    __slots__ = ("_box",)

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)

    def encrypt(self, plaintext: bytes) -> bytes:
        """nonce (24 bytes) + ciphertext + MAC (16 bytes)."""
        return bytes(self._box.encrypt(plaintext))

    def decrypt(self, ciphertext: bytes) -> bytes:
        try:
            return bytes(self._box.decrypt(ciphertext))
        except nacl.exceptions.CryptoError:
            raise Rejected("ciphertext does not authenticate") from None

    def __repr__(self) -> str:
        return "SecretBox(...)"


class X25519:
    """A fresh X25519 key pair."""

    __slots__ = ("_sk", "public")

    def __init__(self) -> None:
        self._sk = nacl.public.PrivateKey.generate()
        self.public = bytes(self._sk.public_key)

    def exchange(self, peer_public: bytes) -> bytes:
        """The raw shared secret; `Rejected` where libsodium refuses the point."""
        try:
            return bytes(nacl.bindings.crypto_scalarmult(bytes(self._sk), peer_public))
        except nacl.exceptions.CryptoError:
            raise Rejected("low-order point") from None

    def __repr__(self) -> str:
        return f"X25519(public={self.public[:4].hex()})"


# The AEAD of direct channels runs once per frame on the hot path of every hop: it calls
# libsodium through PyNaCl's own cffi handle, as `nacl.bindings` does, but without that
# wrapper's per-call argument checks and extra copies (5.1 -> 2.5 us for a 1.5 KB frame,
# measured; see the README speed section). The lengths it relies on are checked here.
_NONCE_BYTES: int = nacl.bindings.crypto_aead_chacha20poly1305_ietf_NPUBBYTES
_KEY_BYTES: int = nacl.bindings.crypto_aead_chacha20poly1305_ietf_KEYBYTES
_alloc = _ffi.new_allocator(should_clear_after_alloc=False)  # every byte is written


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, head: bytes = b"") -> bytes:
    """ChaCha20-Poly1305 (IETF): `head` (sent in the clear, not authenticated; e.g. a
    frame's length prefix) + ciphertext + 16-byte tag, built in one buffer."""
    if len(key) != _KEY_BYTES or len(nonce) != _NONCE_BYTES:
        raise ValueError(f"aead: key and nonce must be {_KEY_BYTES} and {_NONCE_BYTES} bytes")
    if not isinstance(plaintext, bytes):
        plaintext = bytes(plaintext)
    n, h = len(plaintext), len(head)
    out = _alloc("unsigned char[]", h + n + AEAD_TAG_BYTES)
    if h:
        _ffi.memmove(out, head, h)
    rc = _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        out + h, _ffi.NULL, plaintext, n, _ffi.NULL, 0, _ffi.NULL, nonce, key
    )
    if rc != 0:
        raise Rejected("aead encryption failed")
    sealed: bytes = _ffi.buffer(out)[:]
    return sealed


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    if len(key) != _KEY_BYTES or len(nonce) != _NONCE_BYTES:
        raise ValueError(f"aead: key and nonce must be {_KEY_BYTES} and {_NONCE_BYTES} bytes")
    if not isinstance(ciphertext, bytes):
        ciphertext = bytes(ciphertext)
    n = len(ciphertext) - AEAD_TAG_BYTES
    if n < 0:
        raise Rejected("frame shorter than the tag")
    out = _alloc("unsigned char[]", max(n, 1))
    rc = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        out, _ffi.NULL, _ffi.NULL, ciphertext, len(ciphertext), _ffi.NULL, 0, nonce, key
    )
    if rc != 0:
        raise Rejected("frame does not authenticate")
    opened: bytes = _ffi.buffer(out, n)[:]
    return opened


# AES-256-GCM for files sealed at rest (`at_rest`): with AES-NI it decrypts ~4x faster than
# ChaCha20-Poly1305, which keeps a sealed span's load within 10 % of a plaintext one.
# `aes256gcm_decrypt_into` writes the plaintext straight into the caller's buffer.
_AES_KEY_BYTES: int = _lib.crypto_aead_aes256gcm_keybytes()
_AES_NONCE_BYTES: int = _lib.crypto_aead_aes256gcm_npubbytes()


def aes256gcm_available() -> bool:
    """Whether this CPU runs libsodium's AES-256-GCM (it needs AES-NI and CLMUL)."""
    return bool(_lib.crypto_aead_aes256gcm_is_available())


def _check_aes(key: bytes, nonce: bytes) -> None:
    if not aes256gcm_available():
        raise Rejected("AES-256-GCM is not available on this CPU")
    if len(key) != _AES_KEY_BYTES or len(nonce) != _AES_NONCE_BYTES:
        raise ValueError(
            f"aes-gcm: key and nonce must be {_AES_KEY_BYTES}, {_AES_NONCE_BYTES} bytes"
        )


def aes256gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM: ciphertext plus a 16-byte tag."""
    _check_aes(key, nonce)
    n = len(plaintext)
    out = _alloc("unsigned char[]", n + AEAD_TAG_BYTES)
    rc = _lib.crypto_aead_aes256gcm_encrypt(
        out, _ffi.NULL, plaintext, n, _ffi.NULL, 0, _ffi.NULL, nonce, key
    )
    if rc != 0:
        raise Rejected("aes-gcm encryption failed")
    sealed: bytes = _ffi.buffer(out)[:]
    return sealed


def aes256gcm_decrypt_into(
    key: bytes,
    nonce: bytes,
    ciphertext: bytes | bytearray | memoryview,
    out: bytes | bytearray,
    at: int,
) -> int:
    """Authenticate and decrypt into `out[at:]`; returns the plaintext length. `Rejected`
    (nothing trustworthy written) when it does not authenticate."""
    _check_aes(key, nonce)
    n = len(ciphertext) - AEAD_TAG_BYTES
    if n < 0 or at + n > len(out):
        raise Rejected("sealed chunk shorter than its tag, or longer than its place")
    target = _ffi.from_buffer(out)  # `out` may be a bytes still being filled: see fresh_bytes
    source = _ffi.from_buffer(ciphertext)
    rc = _lib.crypto_aead_aes256gcm_decrypt(
        target + at, _ffi.NULL, _ffi.NULL, source, len(ciphertext), _ffi.NULL, 0, nonce, key
    )
    if rc != 0:
        raise Rejected("sealed chunk does not authenticate")
    return n


_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def fresh_bytes(n: int) -> bytes:
    """A new, uninitialised bytes object of `n` bytes that only the caller holds, to be
    filled in place (`aes256gcm_decrypt_into`) before it is shared: what the C API's
    PyBytes_FromStringAndSize(NULL, n) is for. It spares a sealed weight file a second copy
    of its plaintext (bytearray -> bytes) on the load path."""
    if n < 2:
        return bytes(n)  # 0 and 1 byte objects are shared singletons: never fill those
    out: bytes = _PyBytes_FromStringAndSize(None, n)
    return out
