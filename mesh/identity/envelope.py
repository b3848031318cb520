"""Signed envelopes: the `Envelope` every application message travels in, and its verifier.

Rule 1: a signature covers a domain-prefixed message (`nexus-env\\0<domain>\\0<envelope
bytes>`), so a signature made for one purpose never verifies for another.
Rule 2: `EnvelopeVerifier.open` changes no state (clock, replay cache) before every check
has passed, in this order: size, decode, signature, domain, known sender, time window,
replay. Only then are the clock and the replay cache updated.
Rule 3: never log or repr a signature.
"""

from __future__ import annotations

import heapq
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mesh.errors import (
    InvalidSignature,
    OversizeMessage,
    ReplayedMessage,
    StaleMessage,
    UnknownSender,
    WrongDomain,
)
from mesh.hlc import HybridClock, Timestamp, wall_ms_of
from mesh.wire import Limits, decode, encode, record

from .keys import (
    DIGEST_BYTES,
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    NodeKey,
    digest,
    short_id,
    verify_signature,
)

if TYPE_CHECKING:
    from collections.abc import Callable

NONCE_BYTES = 16
ENVELOPE_VERSION = 1
_DOMAIN_RE = re.compile(r"[a-z0-9][a-z0-9/._-]{0,63}")
_SIG_PREFIX = b"nexus-env\0"
# bytes an envelope adds around its body (measured max is ~220; rounded up generously)
_ENVELOPE_OVERHEAD = 512


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

    Signing 6 MB directly costs ~24 ms; hashing then signing ~7 ms (docs/architecture.md §2).
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
