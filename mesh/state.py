"""The replicated state of a mesh: members, revocations, adverts, load and model manifests.

Every piece of state is a `SignedEntry` in a slot, signed by its author over
`b"nexus/state/1\\0" + mesh id + slot + author + hlc + payload`. `MeshState` keeps them in
CRDTs from `mesh/crdt.py` and is synchronous and sans-IO: entries and `now_ms` come in,
accepted entries come out (for re-gossip and persistence).

Rule 1: nothing enters the state before its signature, payload and write rules check out.
`apply` is atomic: it raises a precise `PeerProtocolError` subclass and leaves the state
unchanged, or accepts the whole batch. Inside a batch, entries are admitted in dependency
order (certificates before what they authorise) up to a fixpoint, so delivery order within
a batch never matters.
Rule 2: write rules. A node writes only its own advert and load slots, and only while it
holds a certificate valid at the entry's HLC time. Certificates, removals, revocations and
model manifests are written by admins: the founder, or a node holding a founder-issued
certificate with role "admin" valid at the entry's HLC time. Only the founder grants
"admin"; the founder cannot be revoked. Every rule depends only on the entry and on
grow-only evidence (certificates are never deleted), so admission is monotone and
`merge` is a join. Hence removing a certificate does not un-admit writes dated inside its
validity; revocation is the way to withdraw rights.
Rule 3: revocation wins. Revocations form a grow-only set; a revoked node is never a
member again, whatever arrives later. Adverts, load reports and manifests authored by a
revoked node are dropped on arrival and purged when the revocation arrives (keyed per
author, so this is the same on every replica). Certificates and removals by a revoked
author are kept as evidence but confer nothing; revocations always hold.
Rule 4: leases. `live_adverts(now_ms)` hides expired adverts; `prune(now_ms)` turns expired
adverts (and load reports older than `max_lease_ms`) into tombstones that keep the newest
stamp, so an older copy can never come back through a merge.
Rule 5: sync is compact: `digest()` is one small row per entry or LWW slot, and
`missing_for(remote)` returns what the remote lacks, in admission order.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import structlog

from mesh.crdt import AddWinsSet, Dot, GrowOnlySet, LWWMap, LWWRegister, Stamp
from mesh.errors import (
    ForbiddenWrite,
    ForeignSlot,
    FutureMessage,
    InconsistentEntry,
    NotAdmin,
    NotMember,
    PeerProtocolError,
    WrongMesh,
)
from mesh.hlc import HybridClock, Timestamp, wall_ms_of
from mesh.identity import NodeKey, digest, short_id, verify_signature
from mesh.state_records import (
    MAX_MESH_ID_BYTES,
    MAX_MODEL_ID_BYTES,
    _need,
    _need_id,
    _need_len,
)
from mesh.state_records import Advert as Advert
from mesh.state_records import HostedSpan as HostedSpan
from mesh.state_records import LoadReport as LoadReport
from mesh.state_records import MemberCert as MemberCert
from mesh.state_records import MemberRemoval as MemberRemoval
from mesh.state_records import NodeState as NodeState
from mesh.state_records import PublishedAtom as PublishedAtom
from mesh.state_records import PublishedModel as PublishedModel
from mesh.state_records import Revocation as Revocation
from mesh.state_records import SpanProfile as SpanProfile
from mesh.wire import Limits, decode, encode, record

log = structlog.get_logger(__name__)

DOMAIN = b"nexus/state/1\0"
SIGNATURE_BYTES = 64
MAX_PAYLOAD_BYTES = 64 * 1024
FP_BYTES = 8  # entry fingerprint prefix in digest rows
_PAYLOAD_LIMITS = Limits(max_bytes=MAX_PAYLOAD_BYTES)


class SlotKind(enum.IntEnum):
    """What a slot holds. The numeric order is the admission (dependency) order."""

    MEMBER = 1  # add of a MemberCert (add-wins set)
    UNMEMBER = 2  # MemberRemoval of observed certificate dots
    REVOKE = 3  # Revocation (grow-only set)
    MODEL = 4  # PublishedModel (LWW per model id and author)
    ADVERT = 5  # Advert (LWW, own slot only)
    LOAD = 6  # LoadReport (LWW, own slot only)


LWW_KINDS = frozenset({SlotKind.MODEL, SlotKind.ADVERT, SlotKind.LOAD})
_SET_KINDS = (SlotKind.MEMBER, SlotKind.UNMEMBER, SlotKind.REVOKE)
_ADMIN_KINDS = frozenset({SlotKind.MEMBER, SlotKind.UNMEMBER, SlotKind.REVOKE, SlotKind.MODEL})


@record("state_slot")
@dataclass(frozen=True, slots=True)
class Slot:
    """Where an entry lives: a kind and a key (a node id, or a UTF-8 model id for MODEL)."""

    kind: SlotKind
    key: bytes

    def __post_init__(self) -> None:
        _need(isinstance(self.kind, SlotKind), "slot kind", "a SlotKind", self.kind)
        if self.kind is SlotKind.MODEL:
            _need_len("model slot key", self.key, 1, MAX_MODEL_ID_BYTES)
            try:
                self.key.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("model slot key: expected UTF-8, got invalid bytes") from None
        else:
            _need_id(f"{self.kind.name.lower()} slot key", self.key)

    @classmethod
    def model(cls, model_id: str) -> Slot:
        """The manifest slot of a model."""
        return cls(SlotKind.MODEL, model_id.encode("utf-8"))


def signing_bytes(mesh_id: bytes, slot: Slot, author: bytes, hlc: int, payload: bytes) -> bytes:
    """The exact bytes an entry's author signs (domain + mesh id separate every other use)."""
    return b"".join(
        (
            DOMAIN,
            bytes([len(mesh_id)]),
            mesh_id,
            encode(slot),
            author,
            hlc.to_bytes(8, "big"),
            payload,
        )
    )


@record("state_entry")
@dataclass(frozen=True, slots=True)
class SignedEntry:
    """One signed write: `payload` is the encoded record of the slot's kind."""

    slot: Slot
    author: bytes
    hlc: int
    payload: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _need_id("entry author", self.author)
        _need(0 <= self.hlc < 1 << 63, "entry hlc", "a packed HLC in 0..2**63-1", self.hlc)
        _need_len("entry payload", self.payload, 0, MAX_PAYLOAD_BYTES)
        _need_len("entry signature", self.signature, SIGNATURE_BYTES, SIGNATURE_BYTES)

    @property
    def dot(self) -> Dot:
        """The (author, hlc) tag of this write."""
        return (self.author, self.hlc)

    @property
    def wall_ms(self) -> int:
        """Physical part of the entry's HLC, in ms."""
        return Timestamp.unpack(self.hlc).wall_ms


Payload = MemberCert | MemberRemoval | Revocation | PublishedModel | Advert | LoadReport
_PAYLOAD: dict[SlotKind, type[Payload]] = {
    SlotKind.MEMBER: MemberCert,
    SlotKind.UNMEMBER: MemberRemoval,
    SlotKind.REVOKE: Revocation,
    SlotKind.MODEL: PublishedModel,
    SlotKind.ADVERT: Advert,
    SlotKind.LOAD: LoadReport,
}


DigestRow = tuple[int, bytes, bytes, int, bytes]


@record("state_digest")
@dataclass(frozen=True, slots=True)
class StateDigest:
    """Summary of a state for anti-entropy: one row per set entry or LWW register.

    A row is (kind, slot key, author or b"" when the author is the key, packed hlc,
    first 8 bytes of the entry's BLAKE2b-256). Tombstones appear too, so a peer does not
    resend what we pruned.
    """

    rows: tuple[DigestRow, ...]


@dataclass(frozen=True, slots=True)
class _Held:
    """An accepted entry with its decoded payload and fingerprint (both derived, cached)."""

    entry: SignedEntry
    payload: Payload = field(compare=False)
    fp: bytes = field(compare=False)


_LwwKey = tuple[SlotKind, bytes, bytes]  # (kind, slot key, author): one LWW register each


def _row(kind: SlotKind, key: bytes, author: bytes, hlc: int, fp: bytes) -> DigestRow:
    return (int(kind), key, b"" if author == key else author, hlc, fp[:FP_BYTES])


class MeshState:
    """The replicated state of one mesh (see the module rules).

    Args:
        mesh_id: id of the mesh; signatures and certificates are bound to it.
        founder: node id of the founder, the root admin.
        max_drift_ms: how far ahead of `now_ms` an entry's HLC may be.
        max_lease_ms: the longest advert lease (after the entry's HLC) and load report age.
    """

    def __init__(
        self,
        *,
        mesh_id: bytes,
        founder: bytes,
        max_drift_ms: int = 60_000,
        max_lease_ms: int = 600_000,
    ) -> None:
        _need_len("mesh_id", mesh_id, 1, MAX_MESH_ID_BYTES)
        _need_id("founder", founder)
        limits = (max_drift_ms, max_lease_ms)
        _need(max_drift_ms >= 0 < max_lease_ms, "max_drift_ms, max_lease_ms", ">= 0, > 0", limits)
        self.mesh_id, self.founder = bytes(mesh_id), bytes(founder)
        self.max_drift_ms, self.max_lease_ms = max_drift_ms, max_lease_ms
        self._sets: dict[SlotKind, GrowOnlySet[_Held]] = {k: GrowOnlySet() for k in _SET_KINDS}
        self._lww: LWWMap[_LwwKey, _Held] = LWWMap()
        # Derived from the sets (grow-only, so kept incrementally): node -> (issued_ms,
        # expires_ms, founder-issued admin) of every certificate ever accepted; revoked ids.
        self._windows: dict[bytes, tuple[tuple[int, int, bool], ...]] = {}
        self._revoked: frozenset[bytes] = frozenset()
        self._members: dict[bytes, tuple[MemberCert, ...]] | None = None  # lazy view

    # -- sync API -------------------------------------------------------------------------

    def apply(
        self, entries: Iterable[SignedEntry], now_ms: int, *, skip_invalid: bool = False
    ) -> list[SignedEntry]:
        """Verify and merge entries from a peer (or the store).

        Args:
            entries: signed entries in any order, duplicates allowed.
            now_ms: current wall time (only used to refuse entries from the future).
            skip_invalid: drop (and log) invalid entries instead of raising; for local
                replays such as the store, never for peers.

        Returns:
            The new entries still held afterwards, in admission order (re-gossip, persist).

        Raises:
            InvalidSignature, MalformedMessage, InconsistentEntry, WrongMesh, FutureMessage,
            ForeignSlot, NotAdmin, NotMember, ForbiddenWrite: the first invalid entry (in
            admission order); the state is then unchanged.
        """
        checked: dict[SignedEntry, _Held] = {}
        for entry in entries:
            if entry in checked or self._holds(entry):
                continue
            try:
                checked[entry] = self._check(entry, now_ms)
            except PeerProtocolError as exc:
                if not skip_invalid:
                    raise
                self._log_reject(entry, exc)
        work = self._copy()
        accepted = work._admit_all(sorted(checked.values(), key=self._held_order), skip_invalid)
        self._become(work)
        return [h.entry for h in accepted if self._holds(h.entry)]

    def digest(self) -> StateDigest:
        """Compact per-entry summary for anti-entropy (see `StateDigest`)."""
        rows = [
            _row(h.entry.slot.kind, h.entry.slot.key, h.entry.author, h.entry.hlc, h.fp)
            for h in self._held(sets_only=True)
        ]
        rows += [_row(*k, r.stamp.hlc, r.stamp.tiebreak) for k, r in self._lww.registers()]
        return StateDigest(tuple(sorted(rows)))

    def missing_for(
        self, remote: StateDigest, *, max_bytes: int | None = None
    ) -> list[SignedEntry]:
        """What a peer with digest `remote` lacks, in admission order (apply-ready).

        An LWW entry is sent unless the peer has it or something newer for the same
        (slot, author); a set entry unless the peer has that exact entry. With `max_bytes`,
        only a prefix whose encodings fit (at least one entry): any prefix applies cleanly,
        so a large sync is paged by repeating digest/missing_for.
        """
        have: dict[tuple[int, bytes, bytes], set[tuple[int, bytes]]] = {}
        for kind, key, author, hlc, fp in remote.rows:
            have.setdefault((kind, key, author or key), set()).add((hlc, fp))
        out: list[SignedEntry] = []
        for held in sorted(self._held(), key=self._held_order):
            e = held.entry
            theirs = have.get((e.slot.kind, e.slot.key, e.author), set())
            if (e.hlc, held.fp[:FP_BYTES]) in theirs:
                continue
            if e.slot.kind in LWW_KINDS and any(hlc > e.hlc for hlc, _ in theirs):
                continue
            if max_bytes is not None:
                max_bytes -= len(encode(e))
                if max_bytes < 0 and out:
                    break
            out.append(e)
        return out

    def fingerprint(self) -> bytes:
        """BLAKE2b-256 of the digest: equal fingerprints mean equal states."""
        return digest(encode(self.digest()))

    def merge(self, other: MeshState) -> MeshState:
        """Return the join of two states of the same mesh (neither is changed).

        Both inputs hold only admitted entries and admission is monotone (Rule 2), so the
        join is the union followed by the revocation purge (Rule 3), tombstones included.

        Raises:
            ValueError: the states belong to different meshes or founders.
        """
        if (self.mesh_id, self.founder) != (other.mesh_id, other.founder):
            raise ValueError("merge: expected states of the same mesh and founder, got another")
        out = self._copy()
        out._sets = {k: s.merge(other._sets[k]) for k, s in self._sets.items()}
        out._lww = self._lww.merge(other._lww)
        for held in other._sets[SlotKind.MEMBER]:
            out._index_cert(held)
        for held in other._sets[SlotKind.REVOKE]:
            out._revoke(held)
        out._lww = out._lww.without(lambda k: k[2] in out._revoked)  # both sides' revocations
        return out

    # -- local writes and time ------------------------------------------------------------

    def local_write(
        self, key: NodeKey, slot: Slot, payload: Payload, clock: HybridClock, now: float
    ) -> SignedEntry:
        """Sign `payload` into `slot` as `key`, apply it locally and return it (to gossip).

        The HLC is taken from `clock`, moved past our previous write to the same slot.

        Raises:
            TypeError: the payload type does not belong in this slot.
            ForbiddenWrite (and subclasses), WrongMesh, InconsistentEntry: we may not
                write this; the state is unchanged.
        """
        if type(payload) is not _PAYLOAD[slot.kind]:
            raise TypeError(
                f"{slot.kind.name} slot: expected {_PAYLOAD[slot.kind].__name__}, "
                f"got {type(payload).__name__}"
            )
        ts = clock.now(now)
        reg = self._lww.register((slot.kind, slot.key, key.node_id))
        if reg is not None and reg.stamp.hlc >= ts.pack():
            ts = clock.observe(Timestamp.unpack(reg.stamp.hlc), now)
        body = encode(payload)
        sig = key.sign(signing_bytes(self.mesh_id, slot, key.node_id, ts.pack(), body))
        entry = SignedEntry(slot, key.node_id, ts.pack(), body, sig)
        self.apply([entry], wall_ms_of(now))
        return entry

    def prune(self, now_ms: int) -> int:
        """Tombstone expired adverts and load reports older than `max_lease_ms` (Rule 4).

        Returns:
            How many entries became tombstones.
        """

        def expired(key: _LwwKey, held: _Held) -> bool:
            if isinstance(held.payload, Advert):
                return held.payload.lease_expires_ms <= now_ms
            if isinstance(held.payload, LoadReport):
                return held.entry.wall_ms + self.max_lease_ms <= now_ms
            return False

        pruned = self._lww.prune(expired)
        count = sum(1 for _ in self._lww.items()) - sum(1 for _ in pruned.items())
        self._lww = pruned
        return count

    # -- views ----------------------------------------------------------------------------

    def is_member(self, node_id: bytes, now_ms: int) -> bool:
        """True for the founder, or a node with a present, unexpired certificate, not revoked."""
        if node_id == self.founder or node_id in self._revoked:
            return node_id == self.founder
        return any(c.valid_at(now_ms) for c in self._present().get(node_id, ()))

    def is_revoked(self, node_id: bytes) -> bool:
        """True once any admin has revoked `node_id` (forever)."""
        return node_id in self._revoked

    def revoked(self) -> frozenset[bytes]:
        """Every revoked node id."""
        return self._revoked

    def admins(self, now_ms: int | None = None) -> frozenset[bytes]:
        """The founder plus holders of a present founder-issued admin certificate (unexpired
        at `now_ms` if given), minus revoked nodes."""
        out = {self.founder}
        for node, certs in self._present().items():
            if any(
                c.is_admin and c.issuer == self.founder and (now_ms is None or c.valid_at(now_ms))
                for c in certs
            ):
                out.add(node)
        return frozenset(out - self._revoked)

    def members(self, now_ms: int) -> dict[bytes, MemberCert]:
        """Members at `now_ms` (founder excluded unless certified) with their latest cert."""
        out: dict[bytes, MemberCert] = {}
        for node, certs in self._present().items():
            valid = [c for c in certs if c.valid_at(now_ms)]
            if valid and node not in self._revoked:
                out[node] = max(valid, key=lambda c: (c.expires_ms, c.issued_ms, encode(c)))
        return out

    def cert_dots(self, node_id: bytes) -> tuple[Dot, ...]:
        """Dots of the present certificates of `node_id` (what a MemberRemoval would cover)."""
        live = self._member_set().live()
        return tuple(sorted(dot for h, dot in live if h.entry.slot.key == node_id))

    def advert(self, node_id: bytes) -> Advert | None:
        """The newest advert of a node (even if its lease expired), or None."""
        held = self._lww.get((SlotKind.ADVERT, node_id, node_id))
        return held.payload if held is not None and isinstance(held.payload, Advert) else None

    def live_adverts(self, now_ms: int) -> dict[bytes, Advert]:
        """Adverts of current members whose lease has not expired at `now_ms`."""
        return {
            k[1]: h.payload
            for k, h in self._lww.items()
            if isinstance(h.payload, Advert)
            and h.payload.lease_expires_ms > now_ms
            and self.is_member(k[1], now_ms)
        }

    def loads(self) -> dict[bytes, LoadReport]:
        """The newest load report of every node that has one (not pruned)."""
        return {k[1]: h.payload for k, h in self._lww.items() if isinstance(h.payload, LoadReport)}

    def models(self) -> dict[str, PublishedModel]:
        """Each model's manifest: the newest write among its (non-revoked) admin authors."""
        best: dict[bytes, LWWRegister[_Held]] = {}
        for key, reg in self._lww.registers():
            if key[0] is SlotKind.MODEL and reg.value is not None:
                best[key[1]] = best[key[1]].merge(reg) if key[1] in best else reg
        # Merged live registers stay live; MODEL slots hold manifests (_check): types only.
        return {
            k.decode(): h.payload
            for k, r in best.items()
            if (h := r.value) is not None and isinstance(h.payload, PublishedModel)
        }

    def entries(self) -> list[SignedEntry]:
        """Every held entry, in admission order (tombstones have none)."""
        return [h.entry for h in sorted(self._held(), key=self._held_order)]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MeshState)
            and self.mesh_id == other.mesh_id
            and self.founder == other.founder
            and self._sets == other._sets
            and self._lww == other._lww
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sets = ", ".join(f"{k.name.lower()}={len(s)}" for k, s in self._sets.items())
        return (
            f"MeshState(mesh={self.mesh_id.hex()[:8]}, founder={short_id(self.founder)}, "
            f"{sets}, lww={len(self._lww)}, revoked={len(self._revoked)})"
        )

    # -- internals ------------------------------------------------------------------------

    def _held_order(self, held: _Held) -> tuple[int, bool, bytes, bytes, int]:
        """Admission order: by kind, founder's writes first, then slot, author, hlc."""
        e = held.entry
        return (e.slot.kind, e.author != self.founder, e.slot.key, e.author, e.hlc)

    def _held(self, *, sets_only: bool = False) -> Iterator[_Held]:
        in_sets = (h for s in self._sets.values() for h in s)
        return in_sets if sets_only else itertools.chain(in_sets, (h for _, h in self._lww.items()))

    def _holds(self, entry: SignedEntry) -> bool:
        kind = entry.slot.kind
        if kind in LWW_KINDS:
            held = self._lww.get((kind, entry.slot.key, entry.author))
            return held is not None and held.entry == entry
        return _Held(entry, None, b"") in self._sets[kind]  # type: ignore[arg-type]

    def _copy(self) -> MeshState:
        out = MeshState.__new__(MeshState)
        out.mesh_id, out.founder = self.mesh_id, self.founder
        out.max_drift_ms, out.max_lease_ms = self.max_drift_ms, self.max_lease_ms
        out._sets, out._lww = dict(self._sets), self._lww
        out._windows, out._revoked, out._members = dict(self._windows), self._revoked, None
        return out

    def _become(self, other: MeshState) -> None:
        self._sets, self._lww, self._windows = other._sets, other._lww, other._windows
        self._revoked, self._members = other._revoked, None

    def _check(self, entry: SignedEntry, now_ms: int) -> _Held:
        """Stateless checks: time, signature, payload, slot consistency (Rule 1)."""
        if not isinstance(entry, SignedEntry):
            raise TypeError(f"apply: expected SignedEntry, got {type(entry).__name__}")
        what = f"{entry.slot.kind.name.lower()} entry by {short_id(entry.author)}"
        if entry.wall_ms > now_ms + self.max_drift_ms:
            raise FutureMessage(
                f"{what}: expected hlc at most {self.max_drift_ms} ms ahead, "
                f"got {entry.wall_ms - now_ms} ms ahead"
            )
        signed = signing_bytes(self.mesh_id, entry.slot, entry.author, entry.hlc, entry.payload)
        verify_signature(entry.author, signed, entry.signature)
        payload = decode(entry.payload, _PAYLOAD[entry.slot.kind], limits=_PAYLOAD_LIMITS)
        self._check_payload(entry, payload, what)
        return _Held(entry, payload, digest(encode(entry)))

    def _check_payload(self, entry: SignedEntry, payload: Payload, what: str) -> None:
        key, author = entry.slot.key, entry.author
        subject = getattr(payload, "node_id", key)
        if subject != key:
            raise InconsistentEntry(
                f"{what}: expected payload node {short_id(key)} (the slot), got {short_id(subject)}"
            )
        mesh = getattr(payload, "mesh_id", self.mesh_id)
        if mesh != self.mesh_id:
            raise WrongMesh(f"{what}: expected mesh {self.mesh_id.hex()}, got {mesh.hex()}")
        match payload:
            case MemberCert() if payload.issuer != author:
                raise InconsistentEntry(
                    f"{what}: expected issuer = author, got issuer {short_id(payload.issuer)}"
                )
            case MemberCert() if payload.is_admin and author != self.founder:
                raise ForbiddenWrite(
                    f"{what}: only the founder grants the admin role, "
                    f"got a grant by {short_id(author)}"
                )
            case Revocation() if key == self.founder:
                raise ForbiddenWrite(f"{what}: the founder cannot be revoked")
            case Advert() | LoadReport() if author != key:
                raise ForeignSlot(
                    f"{what}: a node writes only its own slot, got a write to {short_id(key)}"
                )
            case Advert() if payload.lease_expires_ms - entry.wall_ms > self.max_lease_ms:
                lease = payload.lease_expires_ms - entry.wall_ms
                raise ForbiddenWrite(
                    f"{what}: expected lease at most {self.max_lease_ms} ms "
                    f"after the entry, got {lease} ms"
                )

    def _authorize(self, entry: SignedEntry) -> None:
        """State-dependent rules (Rule 2); a later entry of the same batch may satisfy them."""
        author, wall = entry.author, entry.wall_ms
        what = f"{entry.slot.kind.name.lower()} entry by {short_id(author)}"
        windows = self._windows.get(author, ())
        if entry.slot.kind in _ADMIN_KINDS:
            if author != self.founder and not any(a and i <= wall < e for i, e, a in windows):
                raise NotAdmin(
                    f"{what}: expected an admin at {wall} ms (founder or "
                    "founder-issued admin cert), got a non-admin"
                )
        elif author != self.founder and not any(i <= wall < e for i, e, _ in windows):
            raise NotMember(
                f"{what}: expected a member at {wall} ms, got a node with no valid certificate"
            )

    def _admit_all(self, pending: list[_Held], skip_invalid: bool) -> list[_Held]:
        """Admit checked entries up to a fixpoint (Rule 1); returns the newly added ones."""
        accepted: list[_Held] = []
        while pending:
            retry: list[_Held] = []
            errors: list[PeerProtocolError] = []
            for held in pending:
                try:
                    if self._admit(held):
                        accepted.append(held)
                except (NotAdmin, NotMember) as exc:
                    retry.append(held)
                    errors.append(exc)
            if len(retry) == len(pending):  # no progress: what is left is unauthorised
                if not skip_invalid:
                    raise errors[0]
                for held, err in zip(retry, errors, strict=True):
                    self._log_reject(held.entry, err)
                break
            pending = retry
        return accepted

    def _admit(self, held: _Held) -> bool:
        entry = held.entry
        kind = entry.slot.kind
        if kind in LWW_KINDS and entry.author in self._revoked:
            return False  # Rule 3: revocation wins, not the sender's fault
        self._authorize(entry)
        if kind in LWW_KINDS:
            reg = LWWRegister(Stamp(entry.hlc, entry.author, held.fp), held)
            lww = self._lww.put((kind, entry.slot.key, entry.author), reg)
            added, self._lww = lww is not self._lww, lww
            return added
        if held in self._sets[kind]:
            return False
        self._sets[kind] = self._sets[kind].add(held)
        self._members = None
        if kind is SlotKind.MEMBER:
            self._index_cert(held)
        elif kind is SlotKind.REVOKE:
            self._revoke(held)
        return True

    def _index_cert(self, held: _Held) -> None:
        cert = held.payload
        assert isinstance(cert, MemberCert)
        window = (cert.issued_ms, cert.expires_ms, cert.is_admin and cert.issuer == self.founder)
        known = self._windows.get(cert.node_id, ())
        if window not in known:
            self._windows[cert.node_id] = (*known, window)

    def _revoke(self, held: _Held) -> None:
        node = held.entry.slot.key
        if node in self._revoked:
            return
        self._revoked = self._revoked | {node}
        self._lww = self._lww.without(lambda k: k[2] == node)
        self._members = None
        log.info("node_revoked", node=short_id(node), by=short_id(held.entry.author))

    def _member_set(self) -> AddWinsSet[_Held]:
        """Certificates as an add-wins set; writes of revoked authors confer nothing."""
        live = [h for h in self._sets[SlotKind.MEMBER] if h.entry.author not in self._revoked]
        removed = [
            dot
            for h in self._sets[SlotKind.UNMEMBER]
            if h.entry.author not in self._revoked
            for dot in h.payload.dots  # type: ignore[union-attr]
        ]
        return AddWinsSet(((h, h.entry.dot) for h in live), removed)

    def _present(self) -> dict[bytes, tuple[MemberCert, ...]]:
        if self._members is None:
            present: dict[bytes, list[MemberCert]] = {}
            for held in self._member_set().elements():
                cert = held.payload
                assert isinstance(cert, MemberCert)
                present.setdefault(cert.node_id, []).append(cert)
            self._members = {k: tuple(v) for k, v in present.items()}
        return self._members

    @staticmethod
    def _log_reject(entry: SignedEntry, exc: PeerProtocolError) -> None:
        log.warning(
            "state_entry_rejected",
            kind=entry.slot.kind.name.lower(),
            author=short_id(entry.author),
            error=type(exc).__name__,
            reason=str(exc),
        )
