"""The one home of PyNaCl (libsodium): every call the identity package makes into it.

Rule 1: nothing else in the project imports nacl (tests/unit/test_layering.py checks);
`keys`, `secretbox` and `session` call these wrappers.
Rule 2: nacl's exceptions end here: a refusal is `Rejected`, which each caller turns into
its own `mesh.errors` error with the context it knows (whose key, which frame).
Rule 3: key material stays inside these objects; none has a repr that shows it.
"""

from __future__ import annotations

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
