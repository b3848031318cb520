"""State replication over the network: gossip deltas and anti-entropy.

Gossip: local writes are queued in a `DeltaOutbox` (sans-IO) and the node's shell flushes
it at most once per `gossip_interval_s` (~200 ms) as ONE pubsub message per flush:
`seal(key, "nexus/state/1", MeshSecret.encrypt(encode(GossipDelta(entries))))`. This keeps
each node well inside gossipsub's ~10 msg/s per topic and its 32-RPC outbound queue, and
every message far below the 1 MiB payload cap (docs/architecture.md §13).
Anti-entropy (`/nexus/sync/1`): the initiator sends its `StateDigest`; the responder answers
with its own digest and then the entries the initiator lacks in `SyncChunk`s; the initiator
applies them and pushes back what the responder lacks. One round trip repairs both sides,
whatever gossip dropped.

Rule 1: nothing from a peer reaches the state unverified: gossip passes the envelope
verifier (signature, membership, window, replay) and decryption first, and every entry
then passes `MeshState.apply` (signature and write rules), which the caller runs.
Rule 2: bounded: a delta body stays under `max_body_bytes`, a sync chunk under
`max_chunk_bytes` (itself under the transport's frame cap), and a sync session accepts at
most `MAX_SYNC_CHUNKS` chunks; each frame is read with its own limit (digest, chunk), so a
larger one is refused on its length prefix.
Rule 3: entries travel in admission order (certificates before what they authorise), so
a receiver can apply chunk by chunk.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import (
    ClosedError,
    DecryptionFailed,
    ForbiddenWrite,
    FutureMessage,
    InvalidSignature,
    MalformedMessage,
    OversizeMessage,
    PeerProtocolError,
    ReplayedMessage,
    StaleMessage,
    TransportBroken,
    UnknownSender,
    WrongDomain,
    WrongMesh,
)
from mesh.hlc import HybridClock
from mesh.identity import EnvelopeVerifier, MeshSecret, NodeKey, seal, short_id
from mesh.state import LWW_KINDS, MeshState, SignedEntry, StateDigest
from mesh.transport.base import Stream, Transport
from mesh.wire import Limits, decode, encode, record

log = structlog.get_logger(__name__)
GOSSIP_BURST = 3  # messages sent back to back before pacing applies

SYNC_PROTOCOL = "/nexus/sync/1"
GOSSIP_DOMAIN = "nexus/state/1"
MAX_SYNC_CHUNKS = 4096
# Per-entry framing overhead inside a GossipDelta/SyncChunk array (msgpack headers).
_ENTRY_OVERHEAD = 32
_DIGEST_LIMITS = Limits(max_bytes=64 * 1024 * 1024, max_depth=6, max_items=1_000_000)
_DELTA_LIMITS = Limits(max_bytes=4 * 1024 * 1024, max_depth=6, max_items=65536)


def gossip_topic(mesh_id: bytes) -> str:
    """The pubsub topic of a mesh's state deltas."""
    return f"nexus/{mesh_id.hex()}/state"


@record("sync.delta")
@dataclass(frozen=True, slots=True)
class GossipDelta:
    """The plaintext of one gossip message: a few new entries, in admission order."""

    entries: tuple[SignedEntry, ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("gossip delta: expected at least one entry, got none")


@record("sync.chunk")
@dataclass(frozen=True, slots=True)
class SyncChunk:
    """Part of an anti-entropy answer; `last` marks the final chunk of one direction."""

    entries: tuple[SignedEntry, ...]
    last: bool


def entry_size(entry: SignedEntry) -> int:
    """Encoded size bound of one entry (for batching without encoding twice)."""
    return len(entry.payload) + len(entry.slot.key) + len(entry.signature) + 64 + _ENTRY_OVERHEAD


def chunk_entries(entries: Iterable[SignedEntry], max_bytes: int) -> list[tuple[SignedEntry, ...]]:
    """Split entries, order kept, into batches of at most `max_bytes` (estimated) each.

    An entry larger than `max_bytes` on its own still gets a batch of its own (entries are
    capped at 64 KiB by `mesh.state`, far below any sane `max_bytes`).
    """
    out: list[tuple[SignedEntry, ...]] = []
    batch: list[SignedEntry] = []
    size = 0
    for entry in entries:
        n = entry_size(entry)
        if batch and size + n > max_bytes:
            out.append(tuple(batch))
            batch, size = [], 0
        batch.append(entry)
        size += n
    if batch:
        out.append(tuple(batch))
    return out


class DeltaOutbox:
    """Local writes waiting to be gossiped; coalesced so one flush is one message.

    A newer write to the same LWW slot replaces an older pending one (only the newest
    matters to receivers); set entries are all kept.

    Args:
        max_bytes: most (estimated) plaintext bytes taken per flush.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1024:
            raise ValueError(f"outbox max_bytes: expected >= 1024, got {max_bytes}")
        self.max_bytes = max_bytes
        self._pending: dict[tuple[int, bytes, bytes, int], SignedEntry] = {}

    def put(self, entries: Iterable[SignedEntry]) -> None:
        """Queue entries for the next flush."""
        for e in entries:
            lww = e.slot.kind in LWW_KINDS
            key = (int(e.slot.kind), e.slot.key, e.author, 0 if lww else e.hlc)
            old = self._pending.get(key)
            if old is None or old.hlc < e.hlc:
                self._pending[key] = e

    def take(self) -> tuple[SignedEntry, ...]:
        """Remove and return the next batch (admission order), empty if nothing is pending."""
        if not self._pending:
            return ()
        ordered = sorted(self._pending.items(), key=lambda kv: (kv[0][0], kv[1].hlc))
        out: list[SignedEntry] = []
        size = 0
        for key, entry in ordered:
            n = entry_size(entry)
            if out and size + n > self.max_bytes:
                break
            out.append(entry)
            size += n
            del self._pending[key]
        return tuple(out)

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"DeltaOutbox(pending={len(self._pending)}, max_bytes={self.max_bytes})"


def seal_delta(
    key: NodeKey,
    secret: MeshSecret,
    entries: tuple[SignedEntry, ...],
    *,
    clock: HybridClock,
    now: float,
) -> bytes:
    """Encrypt and sign a batch of entries as one gossip message."""
    body = secret.encrypt(encode(GossipDelta(entries)))
    return seal(key, GOSSIP_DOMAIN, body, clock=clock, now=now)


def open_delta(
    raw: bytes,
    *,
    verifier: EnvelopeVerifier,
    secret: MeshSecret,
    now: float,
    is_known: Callable[[bytes], bool],
    limits: Limits,
) -> tuple[bytes, tuple[SignedEntry, ...]]:
    """Verify, decrypt and decode one gossip message.

    Returns:
        The envelope's (verified) sender and its entries.

    Raises:
        PeerProtocolError subclasses from the verifier, `DecryptionFailed`, or
        `MalformedMessage`; nothing is changed by a rejected message.
    """
    env = verifier.open(raw, domain=GOSSIP_DOMAIN, now=now, is_known=is_known)
    delta = decode(secret.decrypt(env.body), GossipDelta, limits=limits)
    return env.sender, delta.entries


Ingest = Callable[[list[SignedEntry], bytes], Awaitable[None]]
Reject = Callable[[bytes, PeerProtocolError, str], Awaitable[None]]

_REJECTIONS: tuple[tuple[type[PeerProtocolError], str, str | None], ...] = (
    (OversizeMessage, "oversize", "oversize"),
    (DecryptionFailed, "decryption_failed", "malformed"),
    (WrongDomain, "wrong_domain", "invalid_signature"),
    (InvalidSignature, "invalid_signature", "invalid_signature"),
    (UnknownSender, "unknown_sender", None),
    (ReplayedMessage, "replay", None),
    (StaleMessage, "stale", None),
    (FutureMessage, "future", "future"),
    (WrongMesh, "wrong_mesh", "wrong_mesh"),
    (ForbiddenWrite, "forbidden_write", "forbidden_write"),
    (MalformedMessage, "malformed", "malformed"),
)


def classify_rejection(exc: PeerProtocolError) -> tuple[str, str | None]:
    """(counter reason, `PeerScores` penalty reason or None) for a rejected peer message.

    Replays, stale messages and not-yet-known senders are counted but not scored: an
    honest network produces them (gossipsub re-delivery, lag before a certificate arrives).
    """
    for cls, reason, penalty in _REJECTIONS:
        if isinstance(exc, cls):
            return reason, penalty
    return "protocol_error", "malformed"


class Replicator:
    """The gossip and anti-entropy shell of one node's state (see the module docstring).

    Args:
        key: our node key (signs gossip envelopes).
        transport: the node's transport.
        mesh_id, secret: our mesh (topic name, payload encryption).
        state: our replicated state.
        clock, verifier: our HLC and envelope verifier.
        is_known: admission test for envelope senders.
        ingest: verifies and merges entries from a peer (raises PeerProtocolError).
        reject: counts/scores a rejected message from a peer.
        wall: wall clock in seconds.
        interval_s: at most one gossip message per this period.
        max_bytes: plaintext bytes per gossip message.
        chunk_bytes: largest anti-entropy chunk.
        timeout_s: deadline for one whole anti-entropy exchange.

    Error handling: gossip rejections go to `reject` and never stop the receiver; a failed
    publish is logged (anti-entropy repairs it). `sync_with` raises to the caller.
    """

    def __init__(
        self,
        *,
        key: NodeKey,
        transport: Transport,
        mesh_id: bytes,
        secret: MeshSecret,
        state: MeshState,
        clock: HybridClock,
        verifier: EnvelopeVerifier,
        is_known: Callable[[bytes], bool],
        ingest: Ingest,
        reject: Reject,
        wall: Callable[[], float],
        interval_s: float,
        max_bytes: int,
        chunk_bytes: int,
        timeout_s: float,
    ) -> None:
        self._key, self._transport, self._secret, self._state = key, transport, secret, state
        self.topic = gossip_topic(mesh_id)
        self._clock, self._verifier, self._is_known = clock, verifier, is_known
        self._ingest, self._reject, self._wall = ingest, reject, wall
        self._interval_s, self._chunk_bytes, self._timeout_s = interval_s, chunk_bytes, timeout_s
        self.outbox = DeltaOutbox(max_bytes)
        self._wake = trio.Event()
        self._generation = 0
        self._digest: tuple[int, StateDigest, bytes] | None = None

    def changed(self) -> None:
        """Tell the replicator the state changed (invalidates the cached digest)."""
        self._generation += 1

    def _our_digest(self) -> tuple[StateDigest, bytes]:
        cached = self._digest
        if cached is None or cached[0] != self._generation:
            d = self._state.digest()
            cached = self._digest = (self._generation, d, encode(d))
        return cached[1], cached[2]

    def queue(self, entries: Iterable[SignedEntry]) -> None:
        """Gossip these (local) entries with the next flush."""
        self.outbox.put(entries)
        self._wake.set()

    async def run_receiver(self, sub: trio.MemoryReceiveChannel[tuple[bytes, bytes]]) -> None:
        """Verify, decrypt and ingest every gossip message of our topic; never returns."""
        async for author, raw in sub:
            try:
                sender, entries = open_delta(
                    raw,
                    verifier=self._verifier,
                    secret=self._secret,
                    now=self._wall(),
                    is_known=self._is_known,
                    limits=_DELTA_LIMITS,
                )
                if sender != author:
                    raise InvalidSignature(
                        f"gossip by {short_id(author)} carries an envelope of {short_id(sender)}"
                    )
                await self._ingest(list(entries), author)
            except PeerProtocolError as exc:
                await self._reject(author, exc, "gossip")

    async def run_sender(self) -> None:
        """Publish queued entries, coalesced, at most `GOSSIP_BURST` messages per
        `GOSSIP_BURST * interval_s`; never returns.

        Pacing keeps us inside gossipsub's ~10 msg/s per topic, but as a burst allowance
        rather than a sleep after every publish: an isolated change goes out at once
        (bench/converge measured 160 ms of pure waiting with the sleep-after-publish).
        """
        sent: deque[float] = deque(maxlen=GOSSIP_BURST)
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self.outbox:
                if len(sent) == GOSSIP_BURST:
                    await trio.sleep_until(sent[0] + GOSSIP_BURST * self._interval_s)
                batch = self.outbox.take()
                if not batch:
                    break
                raw = seal_delta(
                    self._key, self._secret, batch, clock=self._clock, now=self._wall()
                )
                sent.append(trio.current_time())
                try:
                    await self._transport.publish(self.topic, raw)
                except (TransportBroken, OversizeMessage) as exc:  # anti-entropy repairs it
                    log.warning("gossip_publish_failed", entries=len(batch), error=str(exc))

    async def run_anti_entropy(
        self,
        *,
        interval_s: float,
        rng: random.Random,
        pool: Callable[[], list[bytes]],
        connect: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Every ~`interval_s` (jittered), sync with a random peer from `pool()`; never returns.

        The pool should hold any member with a known address, not only connected ones:
        after a partition heals, this is what makes the two sides meet again even when
        each side's peer slots are full.
        """
        while True:
            await trio.sleep(interval_s * (0.8 + 0.4 * rng.random()))
            peers = pool()
            if not peers:
                continue
            peer = rng.choice(peers)
            try:
                await connect(peer)
                await self.sync_with(peer)
            except (TransportBroken, ClosedError) as exc:
                log.debug("anti_entropy_failed", peer=short_id(peer), error=str(exc))
            except PeerProtocolError as exc:
                await self._reject(peer, exc, "sync")

    async def sync_with(self, peer: bytes) -> tuple[int, int]:
        """One anti-entropy exchange with a connected member, as the initiator.

        Returns:
            (entries received, entries sent).

        Raises:
            TransportBroken: unreachable, stream failure or the deadline passed.
            PeerProtocolError: the peer sent something invalid (caller scores it).
        """
        try:
            with trio.fail_after(self._timeout_s):
                stream = await self._transport.open_stream(peer, SYNC_PROTOCOL)
                try:
                    _, raw = self._our_digest()
                    await stream.send(raw)
                    theirs = await stream.receive(max_bytes=_DIGEST_LIMITS.max_bytes)
                    got = await self._receive_entries(stream)
                    sent = await self._send_missing(stream, theirs, raw)
                finally:
                    await close_bounded(stream.aclose)
        except trio.TooSlowError as exc:
            raise TransportBroken(f"sync with {short_id(peer)}: deadline passed") from exc
        log.debug("anti_entropy", peer=short_id(peer), received=got, sent=sent)
        return got, sent

    async def serve_sync(self, stream: Stream) -> None:
        """Answer one anti-entropy exchange (the `/nexus/sync/1` handler).

        Raises:
            TransportBroken: stream failure or the deadline passed.
            PeerProtocolError: after `reject` scored the peer (the stream is then reset).
        """
        try:
            with trio.fail_after(self._timeout_s):
                theirs = await stream.receive(max_bytes=_DIGEST_LIMITS.max_bytes)
                _, raw = self._our_digest()
                await stream.send(raw)
                await self._send_missing(stream, theirs, raw)
                await self._receive_entries(stream)
        except PeerProtocolError as exc:
            await self._reject(stream.remote_id, exc, "sync")
            raise
        except trio.TooSlowError as exc:
            raise TransportBroken(f"sync from {short_id(stream.remote_id)}: deadline") from exc

    async def _send_missing(self, stream: Stream, theirs: bytes, ours: bytes) -> int:
        # Equal encodings are equal digests (deterministic encoding): nothing to compute.
        missing: list[SignedEntry] = []
        if theirs != ours:
            remote = decode(theirs, StateDigest, limits=_DIGEST_LIMITS)
            missing = self._state.missing_for(remote)
        chunks = chunk_entries(missing, self._chunk_bytes) or [()]
        for i, chunk in enumerate(chunks):
            await stream.send(encode(SyncChunk(chunk, i == len(chunks) - 1)))
        return len(missing)

    async def _receive_entries(self, stream: Stream) -> int:
        limits = Limits(max_bytes=self._chunk_bytes + 256 * 1024, max_depth=6, max_items=65536)
        total = 0
        for _ in range(MAX_SYNC_CHUNKS):
            raw = await stream.receive(max_bytes=limits.max_bytes)
            chunk = decode(raw, SyncChunk, limits=limits)
            if chunk.entries:
                await self._ingest(list(chunk.entries), stream.remote_id)
                total += len(chunk.entries)
            if chunk.last:
                return total
        raise MalformedMessage(
            f"sync from {short_id(stream.remote_id)}: expected at most {MAX_SYNC_CHUNKS} chunks"
        )

    def __repr__(self) -> str:
        return (
            f"Replicator(topic={self.topic!r}, pending={len(self.outbox)}, "
            f"generation={self._generation})"
        )
