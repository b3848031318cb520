"""Session crypto of direct channels (`mesh.transport.direct`).

A direct channel authenticates with the node keys (`keys`) and encrypts with keys derived
from an ephemeral X25519 exchange (forward secrecy: the node keys only sign). Both sides
sign the handshake transcript; the session keys are BLAKE2b(key=shared secret,
transcript) split into one key per direction, and each direction numbers its frames, so
a nonce is never reused and a replayed, reordered or dropped frame does not open.

Rule: a `SessionCipher` owns its nonce counter: a nonce is never reused under a key, and
a frame replayed, reordered, dropped or altered fails to open.
"""

from __future__ import annotations

import hashlib
import struct

from mesh.errors import DecryptionFailed, MalformedMessage

from ._nacl import AEAD_TAG_BYTES as AEAD_TAG_BYTES
from ._nacl import X25519, Rejected, aead_decrypt, aead_encrypt

X25519_BYTES = 32
SESSION_KEY_BYTES = 32
_KDF_PERSON = b"nexus-direct-kdf"  # BLAKE2b personalisation: at most 16 bytes
_MAX_FRAMES = 2**64  # the counter fills the 8 low bytes of the 12-byte nonce
_LENGTH = struct.Struct(">I")


class EphemeralKey:
    """A one-use X25519 key pair for one handshake; `public` goes on the wire."""

    __slots__ = ("_sk", "public")

    def __init__(self, pair: X25519) -> None:
        self._sk = pair
        self.public = pair.public

    @classmethod
    def generate(cls) -> EphemeralKey:
        """A fresh random key pair."""
        return cls(X25519())

    def exchange(self, peer_public: bytes) -> bytes:
        """The 32-byte X25519 shared secret with the peer's ephemeral public key.

        Raises:
            MalformedMessage: the peer's key has the wrong length or is a low-order point
                (the shared secret would be all zeros, known to anyone).
        """
        if not isinstance(peer_public, bytes) or len(peer_public) != X25519_BYTES:
            raise MalformedMessage(
                f"ephemeral key: expected {X25519_BYTES} bytes, got {len(peer_public)}"
            )
        try:
            shared = self._sk.exchange(peer_public)
        except Rejected:
            raise MalformedMessage("ephemeral key is a low-order point") from None
        if not any(shared):
            raise MalformedMessage("ephemeral key is a low-order point")
        return shared

    def __repr__(self) -> str:
        return f"EphemeralKey(public={self.public[:4].hex()})"


def derive_session_keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """Derive the two directional keys of a channel from its DH secret and transcript.

    Binding the transcript (ids, ephemeral keys, protocol) means a key is only ever
    agreed by the two parties that signed exactly that handshake.

    Args:
        shared: the X25519 shared secret (`EphemeralKey.exchange`).
        transcript: the handshake transcript both sides signed.

    Returns:
        (initiator-to-responder key, responder-to-initiator key), 32 bytes each.
    """
    if len(shared) != X25519_BYTES:
        raise ValueError(f"shared secret: expected {X25519_BYTES} bytes, got {len(shared)}")
    okm = hashlib.blake2b(
        transcript, key=shared, person=_KDF_PERSON, digest_size=2 * SESSION_KEY_BYTES
    ).digest()
    return okm[:SESSION_KEY_BYTES], okm[SESSION_KEY_BYTES:]


class SessionCipher:
    """One direction of a channel: ChaCha20-Poly1305 (IETF) with a frame-counter nonce.

    The nonce is 4 zero bytes and the 8-byte big-endian count of frames so far, kept here:
    the sender calls only `seal`, the receiver only `open`, each with its own instance.
    `open` advances the count only on success; after a failure the channel must close.
    """

    __slots__ = ("_key", "counter")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != SESSION_KEY_BYTES:
            raise ValueError(f"session key: expected {SESSION_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.counter = 0

    def _nonce(self) -> bytes:
        if self.counter >= _MAX_FRAMES:
            raise OverflowError("session cipher: frame counter exhausted; open a new channel")
        return b"\0\0\0\0" + self.counter.to_bytes(8, "big")

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt the next frame: ciphertext plus a 16-byte tag."""
        out = aead_encrypt(self._key, self._nonce(), plaintext)
        self.counter += 1
        return out

    def seal_frame(self, plaintext: bytes) -> bytes:
        """`seal`, with the ciphertext's 4-byte big-endian length in front (the direct
        channel's frame), built in one buffer: no copy of the frame to prefix it."""
        head = _LENGTH.pack(len(plaintext) + AEAD_TAG_BYTES)
        out = aead_encrypt(self._key, self._nonce(), plaintext, head)
        self.counter += 1
        return out

    def open(self, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt the next frame.

        Raises:
            DecryptionFailed: too short, altered, or not the next frame in order
                (replayed, reordered or one was dropped).
        """
        if len(ciphertext) < AEAD_TAG_BYTES:
            raise DecryptionFailed(
                f"frame {self.counter}: expected at least {AEAD_TAG_BYTES} bytes, "
                f"got {len(ciphertext)}"
            )
        try:
            out = aead_decrypt(self._key, self._nonce(), ciphertext)
        except Rejected:
            raise DecryptionFailed(
                f"frame {self.counter} of {len(ciphertext)} bytes does not authenticate "
                "(altered, replayed or out of order)"
            ) from None
        self.counter += 1
        return out

    def __repr__(self) -> str:
        return f"SessionCipher(counter={self.counter})"
