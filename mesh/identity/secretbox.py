"""Mesh encryption: the mesh-wide `MeshSecret` and sealed boxes to one node.

Rule 1: a failed decryption is `DecryptionFailed`, whatever libsodium said.
Rule 2: never log or repr a secret (a `MeshSecret` shows a fingerprint only).
"""

from __future__ import annotations

from mesh.errors import DecryptionFailed, MalformedMessage

from ._nacl import (
    SECRETBOX_KEY_BYTES,
    SECRETBOX_OVERHEAD,
    Rejected,
    SecretBox,
    random_bytes,
    seal_to_ed25519,
)
from .keys import NODE_ID_BYTES, NodeKey, digest, short_id


class MeshSecret:
    """The 32-byte mesh-wide secret: SecretBox (XSalsa20-Poly1305) with random nonces."""

    __slots__ = ("_box", "raw")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != SECRETBOX_KEY_BYTES:
            raise ValueError(f"mesh secret: expected {SECRETBOX_KEY_BYTES} bytes, got {len(raw)}")
        self.raw = raw
        self._box = SecretBox(raw)

    @classmethod
    def generate(cls) -> MeshSecret:
        """A fresh random secret."""
        return cls(random_bytes(SECRETBOX_KEY_BYTES))

    @classmethod
    def from_bytes(cls, b: bytes) -> MeshSecret:
        """Wrap an existing 32-byte secret (ValueError for another length)."""
        return cls(b)

    def encrypt(self, pt: bytes) -> bytes:
        """Return nonce (24 bytes) + ciphertext + MAC (16 bytes)."""
        return self._box.encrypt(pt)

    def decrypt(self, ct: bytes) -> bytes:
        """Authenticate and decrypt the output of `encrypt`.

        Raises:
            DecryptionFailed: too short, forged, corrupted or made with another secret.
        """
        minimum = SECRETBOX_OVERHEAD
        if len(ct) < minimum:
            raise DecryptionFailed(f"ciphertext: expected at least {minimum} bytes, got {len(ct)}")
        try:
            return self._box.decrypt(ct)
        except Rejected:
            raise DecryptionFailed(f"ciphertext of {len(ct)} bytes does not authenticate") from None

    def __repr__(self) -> str:
        return f"MeshSecret(fingerprint={digest(self.raw)[:4].hex()})"


def seal_to(recipient: bytes, data: bytes) -> bytes:
    """Encrypt `data` so that only the node `recipient` can read it (anonymous sender).

    Uses a SealedBox to the recipient's Ed25519 key converted to Curve25519.

    Raises:
        MalformedMessage: `recipient` is not a valid 32-byte Ed25519 public key.
    """
    if len(recipient) != NODE_ID_BYTES:
        raise MalformedMessage(
            f"recipient id: expected {NODE_ID_BYTES} bytes, got {len(recipient)}"
        )
    try:
        return seal_to_ed25519(recipient, data)
    except Rejected:
        raise MalformedMessage(
            f"recipient {short_id(recipient)} is not a valid Ed25519 key"
        ) from None


def open_sealed(key: NodeKey, data: bytes) -> bytes:
    """Decrypt the output of `seal_to(key.node_id, ...)`.

    Raises:
        DecryptionFailed: not sealed to this key, or corrupted.
    """
    return key.open_sealed(data)
