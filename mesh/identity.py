"""Node identity, signed envelopes and mesh encryption.

Owns: the Ed25519 node key and its file, signature checks, the signed `Envelope` every
application message travels in (with its verifier), the mesh-wide `MeshSecret`
(SecretBox), sealed boxes to one node, and the session crypto of direct channels
(`EphemeralKey`, `derive_session_keys`, `SessionCipher`; see `mesh.transport.direct`).

Rule 1: PyNaCl is imported here and nowhere else; nacl exceptions become `InvalidSignature`
or `DecryptionFailed` at this boundary.
Rule 2: a signature covers a domain-prefixed message (`nexus-env\\0<domain>\\0<envelope
bytes>`), so a signature made for one purpose never verifies for another.
Rule 3: `EnvelopeVerifier.open` changes no state (clock, replay cache) before every check
has passed, in this order: size, decode, signature, domain, known sender, time window,
replay. Only then are the clock and the replay cache updated.
Rule 4: never log or repr a seed, a secret or a signature.
Rule 5: a `SessionCipher` owns its nonce counter: a nonce is never reused under a key, and
a frame replayed, reordered, dropped or altered fails to open.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import hmac
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NewType

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from mesh.errors import (
    DecryptionFailed,
    InsecureKeyFile,
    InvalidSignature,
    KeyFileError,
    KeyFileExists,
    MalformedMessage,
    OversizeMessage,
    ReplayedMessage,
    StaleMessage,
    UnknownSender,
    WrongDomain,
)
from mesh.hlc import HybridClock, Timestamp, wall_ms_of
from mesh.wire import Limits, decode, encode, record

if TYPE_CHECKING:
    from collections.abc import Callable

NodeId = NewType("NodeId", bytes)  # 32-byte Ed25519 verify key

NODE_ID_BYTES = 32
SIGNATURE_BYTES = 64
SEED_BYTES = 32
NONCE_BYTES = 16
DIGEST_BYTES = 32
ENVELOPE_VERSION = 1
_KEY_MAGIC = b"nexus-ed25519-seed-v1\n"  # key file = magic + 32-byte seed
_DOMAIN_RE = re.compile(r"[a-z0-9][a-z0-9/._-]{0,63}")
_SIG_PREFIX = b"nexus-env\0"
# bytes an envelope adds around its body (measured max is ~220; rounded up generously)
_ENVELOPE_OVERHEAD = 512


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

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._sk = signing_key
        self.node_id: NodeId = NodeId(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """The key derived from a 32-byte seed (ValueError for another length)."""
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValueError(f"seed: expected {SEED_BYTES} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Handle with care; never log it."""
        return bytes(self._sk)

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of `data`."""
        return bytes(self._sk.sign(data).signature)

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
        return cls(nacl.signing.SigningKey(data[len(_KEY_MAGIC) :]))

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
        nacl.signing.VerifyKey(bytes(node_id)).verify(bytes(data), bytes(signature))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidSignature(f"signature by {short_id(node_id)} does not verify") from None


# ---------------------------------------------------------------------------------------
# Envelopes


def _check_domain(domain: str) -> None:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(
            f"envelope domain: expected [a-z0-9][a-z0-9/._-]{{0,63}}, got {domain!r:.70}"
        )


@record("env")
@dataclass(frozen=True, slots=True)
class Envelope:
    """One application message: who, for what purpose, when, and the body.

    `hlc` is a packed `Timestamp`; `nonce` is 16 random bytes, unique per sender.
    """

    version: int
    domain: str
    sender: bytes
    hlc: int
    nonce: bytes
    body: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.version != ENVELOPE_VERSION:
            raise ValueError(f"envelope version: expected {ENVELOPE_VERSION}, got {self.version}")
        _check_domain(self.domain)
        if len(self.sender) != NODE_ID_BYTES:
            raise ValueError(
                f"envelope sender: expected {NODE_ID_BYTES} bytes, got {len(self.sender)}"
            )
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"envelope nonce: expected {NONCE_BYTES} bytes, got {len(self.nonce)}")
        Timestamp.unpack(self.hlc)

    @property
    def timestamp(self) -> Timestamp:
        """The sender's HLC timestamp."""
        return Timestamp.unpack(self.hlc)


@record("signed")
@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """What `seal` puts on the wire: the exact envelope bytes and their signature."""

    envelope: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise ValueError(
                f"signature: expected {SIGNATURE_BYTES} bytes, got {len(self.signature)}"
            )


@record("large")
@dataclass(frozen=True, slots=True)
class LargeBody:
    """Envelope body for a large payload sent beside the envelope (see `seal_large`)."""

    header: bytes
    payload_digest: bytes
    payload_bytes: int

    def __post_init__(self) -> None:
        if len(self.payload_digest) != DIGEST_BYTES:
            raise ValueError(
                f"payload digest: expected {DIGEST_BYTES} bytes, got {len(self.payload_digest)}"
            )
        if self.payload_bytes < 0:
            raise ValueError(f"payload size: expected >= 0, got {self.payload_bytes}")


def _signed_message(domain: str, envelope: bytes) -> bytes:
    return _SIG_PREFIX + domain.encode("ascii") + b"\0" + envelope


def seal(
    key: NodeKey,
    domain: str,
    body: bytes,
    *,
    clock: HybridClock,
    now: float,
    nonce: bytes | None = None,
) -> bytes:
    """Wrap, timestamp and sign a message body.

    Args:
        key: our node key (the sender).
        domain: the purpose, e.g. "nexus/state/1".
        body: the encoded message.
        clock: our HLC; it ticks once.
        now: wall time in seconds.
        nonce: 16 bytes; random by default (tests pass it to forge replays).

    Returns:
        The bytes to send (an encoded `SignedEnvelope`).
    """
    _check_domain(domain)
    env = Envelope(
        version=ENVELOPE_VERSION,
        domain=domain,
        sender=key.node_id,
        hlc=clock.now(now).pack(),
        nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce,
        body=body,
    )
    env_bytes = encode(env)
    return encode(SignedEnvelope(env_bytes, key.sign(_signed_message(domain, env_bytes))))


def seal_large(
    key: NodeKey,
    domain: str,
    header: bytes,
    payload: bytes,
    *,
    clock: HybridClock,
    now: float,
    nonce: bytes | None = None,
) -> bytes:
    """Sign a large payload by digest: the envelope carries BLAKE2b-256(payload), not it.

    Signing 6 MB directly costs ~24 ms; hashing then signing ~7 ms (DESIGN.md section 2).
    Send the returned envelope and the payload side by side (e.g. two frames); the
    receiver calls `EnvelopeVerifier.open_large(raw, payload, ...)`.

    Args:
        header: small encoded metadata (e.g. a request record naming the tensor).
        payload: the large bytes (e.g. `TensorBlob.data`).
        Other args: as for `seal`.
    """
    body = encode(LargeBody(header, digest(payload), len(payload)))
    return seal(key, domain, body, clock=clock, now=now, nonce=nonce)


def check_payload(
    envelope_digest: bytes, payload: bytes, *, expected_bytes: int | None = None
) -> None:
    """Check that `payload` is the one named by a digest taken from a verified envelope.

    Args:
        envelope_digest: `LargeBody.payload_digest` of an envelope that passed `open`.
        payload: the bytes received beside it.
        expected_bytes: `LargeBody.payload_bytes`, checked first (cheap) when given.

    Raises:
        InvalidSignature: wrong size or digest (the payload was not signed by the sender).
    """
    if expected_bytes is not None and len(payload) != expected_bytes:
        raise InvalidSignature(f"payload: expected {expected_bytes} bytes, got {len(payload)}")
    if not hmac.compare_digest(digest(payload), envelope_digest):
        raise InvalidSignature("payload digest does not match the signed envelope")


class _ReplayCache:
    """(sender, nonce) pairs seen inside the window, bounded by `capacity`.

    Entries expire once their timestamp leaves the window (such messages are rejected as
    stale anyway). When the cache is full of unexpired entries, the entry with the oldest
    timestamp is dropped and `floor` rises to its timestamp: from then on any message at
    or before `floor` is rejected as stale. We would rather refuse an old-but-genuine
    message than forget a nonce and accept a replay; under a flood the effective window
    shrinks, it never leaks.
    """

    __slots__ = ("_heap", "_seen", "capacity", "floor")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.floor = -1  # packed hlc; messages with hlc <= floor are refused
        self._heap: list[tuple[int, bytes, bytes]] = []  # (packed hlc, sender, nonce)
        self._seen: set[tuple[bytes, bytes]] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: tuple[bytes, bytes]) -> bool:
        return key in self._seen

    def add(self, hlc: int, sender: bytes, nonce: bytes, *, expire_before_ms: int) -> None:
        heap = self._heap
        while heap and Timestamp.unpack(heap[0][0]).wall_ms < expire_before_ms:
            _, s, n = heapq.heappop(heap)
            self._seen.discard((s, n))
        while len(heap) >= self.capacity:
            old, s, n = heapq.heappop(heap)
            self._seen.discard((s, n))
            self.floor = max(self.floor, old)
        heapq.heappush(heap, (hlc, sender, nonce))
        self._seen.add((sender, nonce))


class EnvelopeVerifier:
    """Checks received envelopes and remembers their nonces (one per node).

    Args:
        clock: our HLC; it observes every accepted envelope and bounds future drift.
        window_s: how old an envelope may be; nonces are remembered this long.
        max_body_bytes: largest accepted body.
        replay_capacity: most nonces remembered (see `_ReplayCache` for what happens
            when it is full).

    Error handling: every rejection raises a `PeerProtocolError` subclass and leaves the
    clock and the replay cache exactly as they were; the caller logs it at WARNING.
    """

    def __init__(
        self, *, clock: HybridClock, window_s: float, max_body_bytes: int, replay_capacity: int
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: expected > 0, got {window_s!r}")
        if max_body_bytes < 0 or replay_capacity < 1:
            raise ValueError(
                f"max_body_bytes >= 0 and replay_capacity >= 1 expected, "
                f"got {max_body_bytes} and {replay_capacity}"
            )
        self._clock = clock
        self._window_ms = round(window_s * 1000)
        self.max_body_bytes = max_body_bytes
        self._limits = Limits(
            max_bytes=max_body_bytes + _ENVELOPE_OVERHEAD, max_depth=2, max_items=8
        )
        self._replay = _ReplayCache(replay_capacity)

    def open(
        self, raw: bytes, *, domain: str, now: float, is_known: Callable[[bytes], bool]
    ) -> Envelope:
        """Verify a sealed envelope and accept it.

        Args:
            raw: the bytes produced by `seal`.
            domain: the purpose this handler serves; others raise WrongDomain.
            now: wall time in seconds.
            is_known: membership check for the (verified) sender id.

        Returns:
            The envelope; its body is authentic and seen for the first time.

        Raises:
            OversizeMessage, MalformedMessage, InvalidSignature, WrongDomain, UnknownSender,
            StaleMessage, FutureMessage, ReplayedMessage: checked in this order.
        """
        env, ts = self._verify(raw, domain, now, is_known)
        self._commit(env, ts, now)
        return env

    def open_large(
        self,
        raw: bytes,
        payload: bytes,
        *,
        domain: str,
        now: float,
        is_known: Callable[[bytes], bool],
    ) -> tuple[Envelope, LargeBody]:
        """Verify an envelope made by `seal_large` together with its payload.

        State is committed only if the payload matches too.

        Returns:
            The envelope and its decoded `LargeBody` (the header is `large.header`).

        Raises:
            As for `open`, plus MalformedMessage (body is not a LargeBody) and
            InvalidSignature (payload size or digest mismatch).
        """
        env, ts = self._verify(raw, domain, now, is_known)
        large = decode(env.body, LargeBody, limits=self._limits)
        check_payload(large.payload_digest, payload, expected_bytes=large.payload_bytes)
        self._commit(env, ts, now)
        return env, large

    check_payload = staticmethod(check_payload)

    def _verify(
        self, raw: bytes, domain: str, now: float, is_known: Callable[[bytes], bool]
    ) -> tuple[Envelope, Timestamp]:
        """All checks of `open`, in order, without touching any state."""
        _check_domain(domain)
        if len(raw) > self._limits.max_bytes:
            raise OversizeMessage(
                f"envelope of {len(raw)} bytes, over the limit of {self._limits.max_bytes}"
            )
        signed = decode(raw, SignedEnvelope, limits=self._limits)
        env = decode(signed.envelope, Envelope, limits=self._limits)
        if len(env.body) > self.max_body_bytes:
            raise OversizeMessage(
                f"envelope body of {len(env.body)} bytes, over the limit of {self.max_body_bytes}"
            )
        verify_signature(env.sender, _signed_message(env.domain, signed.envelope), signed.signature)
        if env.domain != domain:
            raise WrongDomain(f"envelope for domain {env.domain!r}, expected {domain!r}")
        if not is_known(env.sender):
            raise UnknownSender(f"sender {short_id(env.sender)} is not a known member")
        ts = env.timestamp
        oldest_ms = wall_ms_of(now) - self._window_ms
        if ts.wall_ms < oldest_ms:
            raise StaleMessage(
                f"envelope from {short_id(env.sender)} at {ts.wall_ms} ms is older than "
                f"the window start {oldest_ms} ms"
            )
        self._clock.check(ts, now)
        if (env.sender, env.nonce) in self._replay:
            raise ReplayedMessage(f"nonce from {short_id(env.sender)} already seen in the window")
        if ts.pack() <= self._replay.floor:
            raise StaleMessage(
                f"envelope from {short_id(env.sender)} is older than the replay horizon "
                f"(replay cache full at {self._replay.capacity} entries)"
            )
        return env, ts

    def _commit(self, env: Envelope, ts: Timestamp, now: float) -> None:
        self._clock.observe(ts, now)
        expire_before_ms = wall_ms_of(now) - self._window_ms
        self._replay.add(env.hlc, env.sender, env.nonce, expire_before_ms=expire_before_ms)

    def __repr__(self) -> str:
        return (
            f"EnvelopeVerifier(window_ms={self._window_ms}, max_body_bytes={self.max_body_bytes}, "
            f"replay={len(self._replay)}/{self._replay.capacity}, clock={self._clock!r})"
        )


# ---------------------------------------------------------------------------------------
# Encryption


class MeshSecret:
    """The 32-byte mesh-wide secret: SecretBox (XSalsa20-Poly1305) with random nonces."""

    __slots__ = ("_box", "raw")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != nacl.secret.SecretBox.KEY_SIZE:
            raise ValueError(
                f"mesh secret: expected {nacl.secret.SecretBox.KEY_SIZE} bytes, got {len(raw)}"
            )
        self.raw = raw
        self._box = nacl.secret.SecretBox(raw)

    @classmethod
    def generate(cls) -> MeshSecret:
        """A fresh random secret."""
        return cls(nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE))

    @classmethod
    def from_bytes(cls, b: bytes) -> MeshSecret:
        """Wrap an existing 32-byte secret (ValueError for another length)."""
        return cls(b)

    def encrypt(self, pt: bytes) -> bytes:
        """Return nonce (24 bytes) + ciphertext + MAC (16 bytes)."""
        return bytes(self._box.encrypt(pt))

    def decrypt(self, ct: bytes) -> bytes:
        """Authenticate and decrypt the output of `encrypt`.

        Raises:
            DecryptionFailed: too short, forged, corrupted or made with another secret.
        """
        minimum = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
        if len(ct) < minimum:
            raise DecryptionFailed(f"ciphertext: expected at least {minimum} bytes, got {len(ct)}")
        try:
            return bytes(self._box.decrypt(ct))
        except nacl.exceptions.CryptoError:
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
        public = nacl.signing.VerifyKey(bytes(recipient)).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError):
        raise MalformedMessage(
            f"recipient {short_id(recipient)} is not a valid Ed25519 key"
        ) from None
    return bytes(nacl.public.SealedBox(public).encrypt(data))


def open_sealed(key: NodeKey, data: bytes) -> bytes:
    """Decrypt the output of `seal_to(key.node_id, ...)`.

    Raises:
        DecryptionFailed: not sealed to this key, or corrupted.
    """
    private = key._sk.to_curve25519_private_key()
    try:
        return bytes(nacl.public.SealedBox(private).decrypt(data))
    except (nacl.exceptions.CryptoError, ValueError):
        raise DecryptionFailed(
            f"sealed box of {len(data)} bytes does not open with our key"
        ) from None


# ---------------------------------------------------------------------------------------
# Session crypto of direct channels (mesh.transport.direct)
#
# A direct channel authenticates with the node keys above and encrypts with keys derived
# from an ephemeral X25519 exchange (forward secrecy: the node keys only sign). Both sides
# sign the handshake transcript; the session keys are BLAKE2b(key=shared secret,
# transcript) split into one key per direction, and each direction numbers its frames, so
# a nonce is never reused and a replayed, reordered or dropped frame does not open.

X25519_BYTES = 32
SESSION_KEY_BYTES = 32
AEAD_TAG_BYTES = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES
_KDF_PERSON = b"nexus-direct-kdf"  # BLAKE2b personalisation: at most 16 bytes
_MAX_FRAMES = 2**64  # the counter fills the 8 low bytes of the 12-byte nonce


class EphemeralKey:
    """A one-use X25519 key pair for one handshake; `public` goes on the wire."""

    __slots__ = ("_sk", "public")

    def __init__(self, private: nacl.public.PrivateKey) -> None:
        self._sk = private
        self.public = bytes(private.public_key)

    @classmethod
    def generate(cls) -> EphemeralKey:
        """A fresh random key pair."""
        return cls(nacl.public.PrivateKey.generate())

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
            shared = bytes(nacl.bindings.crypto_scalarmult(bytes(self._sk), peer_public))
        except nacl.exceptions.CryptoError:
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
        out = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, None, self._nonce(), self._key
        )
        self.counter += 1
        return bytes(out)

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
            out = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                bytes(ciphertext), None, self._nonce(), self._key
            )
        except nacl.exceptions.CryptoError:
            raise DecryptionFailed(
                f"frame {self.counter} of {len(ciphertext)} bytes does not authenticate "
                "(altered, replayed or out of order)"
            ) from None
        self.counter += 1
        return bytes(out)

    def __repr__(self) -> str:
        return f"SessionCipher(counter={self.counter})"
