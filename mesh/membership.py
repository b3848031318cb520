"""Invites and the join handshake (sans-IO): tokens, the issuer's invite book, admission.

Flow (docs/architecture.md §2): an admin calls `create_invite` and hands the token text to a person;
the joiner's daemon `parse_invite`s it, dials a bootstrap address, sends
`make_join_request(...)` on the join protocol; the admin's shell feeds those bytes to
`Admitter.handle_join`, sends back the encoded `JoinAccept`/`JoinReject`, and the joiner
calls `accept_join`, which opens the sealed mesh secret.

Invite secret scheme. The token carries a random 32-byte secret. Both sides derive an
Ed25519 *invite key* from it (seed = BLAKE2b-256(secret, person="nexus-invite-key")). The
issuer's book keeps only the invite key's public half; the joiner proves possession of
the secret by signing `nexus-join\\0 | mesh_id | joiner id | timestamp_ms` with the
derived private key. This is strictly better than a MAC keyed by BLAKE2b(secret): a thief
of the issuer's invite book learns public keys only and cannot forge a join. The proof
names the joiner, and the whole request is signed by the joiner's node key, so an
intercepted request cannot be replayed for another key; the secret itself never travels.

Rule 1: no I/O, no clock reads, no global randomness: callers pass `now` (seconds) and
the only randomness is the invite secret (`secrets`, or injected by tests).
Rule 2: a join request changes nothing until every check has passed; an invite use is
spent only when a `JoinAccept` is produced. A retry by a joiner the invite already
admitted is answered again without spending another use (the reply may have been lost).
Rule 3: every refusal carries a precise `JoinRefusal` and detail, is counted in
`Admitter.counters` and logged at WARNING; never log secrets, proofs or signatures.
Rule 4: domain separation: invite signatures, join proofs and joiner signatures each
sign a distinct prefix, so none can stand in for another (or for an envelope).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import structlog

from mesh.errors import (
    InvalidSignature,
    JoinRefusal,
    JoinRefused,
    MalformedMessage,
    OversizeMessage,
    UnknownSender,
    WrongMesh,
)
from mesh.hlc import wall_ms_of
from mesh.identity import (
    NODE_ID_BYTES,
    SIGNATURE_BYTES,
    MeshSecret,
    NodeKey,
    open_sealed,
    seal_to,
    short_id,
    verify_signature,
)
from mesh.scoring import PeerScores, RateLimiter
from mesh.wire import Limits, decode, decode_any, encode, record

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "nexus1-"
MESH_ID_BYTES = 16
INVITE_SECRET_BYTES = 32
MAX_BOOTSTRAP = 16
MAX_ADDR_CHARS = 256
MAX_USES = 1000
MAX_DETAIL_CHARS = 512
MAX_INVITE_BYTES = 8192
MAX_TOKEN_CHARS = len(TOKEN_PREFIX) + (MAX_INVITE_BYTES * 8 + 4) // 5
_LIMITS = Limits(max_bytes=MAX_INVITE_BYTES, max_depth=3, max_items=MAX_BOOTSTRAP + 16)
_REPLY_LIMITS = Limits(max_bytes=64 * 1024, max_depth=3, max_items=MAX_BOOTSTRAP + 16)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ADDR_RE = re.compile(rf"/[\x21-\x7e]{{1,{MAX_ADDR_CHARS - 1}}}")
_INVITE_KEY_PERSON = b"nexus-invite-key"  # BLAKE2b personalisation: exactly 16 bytes
_INVITE_SIG = b"nexus-invite\0"
_JOIN_PROOF = b"nexus-join\0"
_JOIN_SIG = b"nexus-join-request\0"
_MS = struct.Struct(">q")


# ---------------------------------------------------------------------------------------
# Field checks shared by the records


def _check_bytes(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{what}: expected {size} bytes, got {len(value)}")


def _check_name(what: str, name: str, *, allow_empty: bool) -> None:
    if (name or not allow_empty) and not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what}: expected 1-63 chars of [A-Za-z0-9._-], got {name!r:.80}")


def _check_addrs(what: str, addrs: tuple[str, ...]) -> None:
    if len(addrs) > MAX_BOOTSTRAP:
        raise ValueError(f"{what}: expected at most {MAX_BOOTSTRAP} addresses, got {len(addrs)}")
    for addr in addrs:
        if not _ADDR_RE.fullmatch(addr):
            raise ValueError(
                f"{what}: expected multiaddrs ('/ip4/...', printable ASCII, at most "
                f"{MAX_ADDR_CHARS} chars), got {addr!r:.80}"
            )


def _check_uses(what: str, uses: int, *, minimum: int) -> None:
    if not minimum <= uses <= MAX_USES:
        raise ValueError(f"{what}: expected {minimum}..{MAX_USES}, got {uses}")


def _check_ms(what: str, ms: int) -> None:
    if not 0 <= ms < 2**62:
        raise ValueError(f"{what}: expected ms since the epoch >= 0, got {ms}")


def invite_key_of(secret: bytes) -> NodeKey:
    """The Ed25519 invite key derived from an invite secret (see the module docstring)."""
    _check_bytes("invite secret", secret, INVITE_SECRET_BYTES)
    seed = hashlib.blake2b(secret, digest_size=32, person=_INVITE_KEY_PERSON).digest()
    return NodeKey.from_seed(seed)


# ---------------------------------------------------------------------------------------
# Invites


@record("invite.terms")
@dataclass(frozen=True, slots=True)
class _InviteTerms:
    """Everything an invite signature covers (an `Invite` minus its signature)."""

    mesh_id: bytes
    bootstrap: tuple[str, ...]
    secret: bytes = field(repr=False)
    expires_ms: int
    uses: int
    issuer: bytes
    name: str


@record("invite")
@dataclass(frozen=True, slots=True)
class Invite:
    """What an invite token carries; signed by `issuer` over every other field.

    Attributes:
        mesh_id: the mesh to join (16 bytes).
        bootstrap: multiaddrs of members to dial (the issuer's first).
        secret: one-time 32-byte secret; whoever holds the token may join.
        expires_ms: wall time (ms) after which the issuer refuses it.
        uses: how many nodes may join with it.
        issuer: node id of the admin that keeps the matching `InviteRecord`.
        name: suggested member name ("" for none).
        signature: Ed25519 by `issuer` over `nexus-invite\\0` + the encoded terms.
    """

    mesh_id: bytes
    bootstrap: tuple[str, ...]
    secret: bytes = field(repr=False)
    expires_ms: int
    uses: int
    issuer: bytes
    name: str
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes("invite mesh_id", self.mesh_id, MESH_ID_BYTES)
        _check_addrs("invite bootstrap", self.bootstrap)
        _check_bytes("invite secret", self.secret, INVITE_SECRET_BYTES)
        _check_ms("invite expires_ms", self.expires_ms)
        _check_uses("invite uses", self.uses, minimum=1)
        _check_bytes("invite issuer", self.issuer, NODE_ID_BYTES)
        _check_name("invite name", self.name, allow_empty=True)
        _check_bytes("invite signature", self.signature, SIGNATURE_BYTES)

    def signed_bytes(self) -> bytes:
        """The exact bytes the issuer signs (domain prefix + encoded terms)."""
        terms = _InviteTerms(
            self.mesh_id,
            self.bootstrap,
            self.secret,
            self.expires_ms,
            self.uses,
            self.issuer,
            self.name,
        )
        return _INVITE_SIG + encode(terms)

    @property
    def invite_key(self) -> bytes:
        """Public half of the invite key: what the issuer's book stores."""
        return bytes(invite_key_of(self.secret).node_id)

    def expired(self, now: float) -> bool:
        """True once `now` (seconds) is past `expires_ms`."""
        return wall_ms_of(now) > self.expires_ms


@record("invite.entry")
@dataclass(frozen=True, slots=True)
class InviteRecord:
    """The issuer's memory of one invite. Holds no secret (see the module docstring).

    Attributes:
        invite_key: public invite key derived from the secret; the book's index.
        issuer: node id that signed the invite.
        expires_ms: as in the invite.
        uses_left: joins still allowed.
        name: member name given to joiners ("" lets the joiner choose).
        admitted: node ids already admitted with it (answered again on a retry).
    """

    invite_key: bytes
    issuer: bytes
    expires_ms: int
    uses_left: int
    name: str
    admitted: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_bytes("invite record invite_key", self.invite_key, NODE_ID_BYTES)
        _check_bytes("invite record issuer", self.issuer, NODE_ID_BYTES)
        _check_ms("invite record expires_ms", self.expires_ms)
        _check_uses("invite record uses_left", self.uses_left, minimum=0)
        _check_name("invite record name", self.name, allow_empty=True)
        if len(self.admitted) > MAX_USES:
            raise ValueError(
                f"invite record admitted: expected at most {MAX_USES}, got {len(self.admitted)}"
            )
        for node in self.admitted:
            _check_bytes("invite record admitted id", node, NODE_ID_BYTES)


def format_invite(invite: Invite) -> str:
    """Token text for an invite: "nexus1-" + lowercase unpadded RFC 4648 base32."""
    b32 = base64.b32encode(encode(invite)).decode("ascii").rstrip("=").lower()
    return TOKEN_PREFIX + b32


def create_invite(
    key: NodeKey,
    mesh_id: bytes,
    bootstrap: tuple[str, ...],
    ttl_s: float,
    uses: int,
    name: str,
    now: float,
    *,
    secret: bytes | None = None,
) -> tuple[str, InviteRecord]:
    """Make and sign an invite.

    Args:
        key: the issuing admin's node key.
        mesh_id: 16-byte mesh id.
        bootstrap: multiaddrs the joiner should dial.
        ttl_s: lifetime in seconds (> 0).
        uses: how many nodes may join with it (1..MAX_USES).
        name: member name for the joiner ("" to let the joiner choose).
        now: wall time in seconds.
        secret: 32 bytes; fresh from `secrets` by default (tests pass one).

    Returns:
        The token text to hand out, and the record to add to the issuer's `InviteBook`.

    Raises:
        ValueError: any argument out of range (the message names it).
    """
    if not 0 < ttl_s < 10 * 365 * 86400:
        raise ValueError(f"invite ttl_s: expected 0 < ttl_s < 10 years, got {ttl_s!r}")
    secret = secrets.token_bytes(INVITE_SECRET_BYTES) if secret is None else secret
    expires_ms = wall_ms_of(now) + round(ttl_s * 1000)
    terms = (mesh_id, tuple(bootstrap), secret, expires_ms, uses, key.node_id, name)
    unsigned = Invite(*terms, signature=bytes(SIGNATURE_BYTES))
    invite = replace(unsigned, signature=key.sign(unsigned.signed_bytes()))
    entry = InviteRecord(invite.invite_key, key.node_id, expires_ms, uses, name)
    log.info("invite_created", issuer=short_id(key.node_id), uses=uses, expires_ms=expires_ms)
    return format_invite(invite), entry


def parse_invite(token: str) -> Invite:
    """Decode token text and check the issuer's signature.

    Whitespace anywhere and letter case are ignored (tokens get wrapped and retyped).

    Returns:
        The invite. Expiry is not checked here (no clock); see `Invite.expired`.

    Raises:
        OversizeMessage: longer than any valid token.
        MalformedMessage: wrong prefix, invalid base32, or bytes that are not an invite.
        InvalidSignature: the signature does not verify for the named issuer.
    """
    text = "".join(token.split()).lower()
    if len(text) > MAX_TOKEN_CHARS:
        raise OversizeMessage(
            f"invite token of {len(text)} chars, over the limit of {MAX_TOKEN_CHARS}"
        )
    if not text.startswith(TOKEN_PREFIX):
        raise MalformedMessage(f"invite token: expected prefix {TOKEN_PREFIX!r}, got {text[:12]!r}")
    body = text[len(TOKEN_PREFIX) :].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(f"invite token: invalid base32 ({exc})") from None
    try:
        invite = decode(raw, Invite, limits=_LIMITS)
    except MalformedMessage as exc:
        raise MalformedMessage(f"invite token: {exc}") from None
    try:
        verify_signature(invite.issuer, invite.signed_bytes(), invite.signature)
    except InvalidSignature:
        raise InvalidSignature(
            f"invite token: signature does not verify for issuer {short_id(invite.issuer)}"
        ) from None
    return invite


class InviteBook:
    """The issuer's outstanding invites, indexed by invite key. Persist with `to_records`.

    Args:
        records: entries to start with (e.g. `from_records` of what was saved).
    """

    def __init__(self, records: Iterable[InviteRecord] = ()) -> None:
        self._entries: dict[bytes, InviteRecord] = {}
        for rec in records:
            self.add(rec)

    @classmethod
    def from_records(cls, records: Iterable[InviteRecord]) -> InviteBook:
        """Rebuild a book from `to_records` output."""
        return cls(records)

    def to_records(self) -> tuple[InviteRecord, ...]:
        """Every entry, ordered by invite key (each is a wire record: `wire.encode` it)."""
        return tuple(self._entries[k] for k in sorted(self._entries))

    def add(self, rec: InviteRecord) -> None:
        """Add or replace the entry for `rec.invite_key`."""
        self._entries[rec.invite_key] = rec

    def get(self, invite_key: bytes) -> InviteRecord | None:
        """The entry for an invite key, or None."""
        return self._entries.get(invite_key)

    def cancel(self, invite_key: bytes) -> bool:
        """Withdraw an invite. Returns whether it was in the book."""
        return self._entries.pop(invite_key, None) is not None

    def prune(self, now: float) -> int:
        """Drop expired and used-up entries. Returns how many were dropped."""
        now_ms = wall_ms_of(now)
        drop = [k for k, r in self._entries.items() if r.expires_ms < now_ms or r.uses_left == 0]
        for k in drop:
            del self._entries[k]
        return len(drop)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"InviteBook(invites={len(self._entries)})"


# ---------------------------------------------------------------------------------------
# Join handshake records


@record("join.request")
@dataclass(frozen=True, slots=True)
class JoinRequest:
    """A joiner's request, carried inside `SignedJoinRequest`.

    Attributes:
        mesh_id: mesh from the invite.
        invite_key: public invite key (tells the admin which invite; reveals no secret).
        invite_secret_proof: invite-key signature over
            `nexus-join\\0 | mesh_id | joiner | timestamp_ms (int64 BE)`.
        joiner: the joiner's node id.
        name: the name the joiner asks for.
        addrs: the joiner's listen multiaddrs.
        timestamp_ms: joiner's wall time.
    """

    mesh_id: bytes
    invite_key: bytes
    invite_secret_proof: bytes = field(repr=False)
    joiner: bytes
    name: str
    addrs: tuple[str, ...]
    timestamp_ms: int

    def __post_init__(self) -> None:
        _check_bytes("join mesh_id", self.mesh_id, MESH_ID_BYTES)
        _check_bytes("join invite_key", self.invite_key, NODE_ID_BYTES)
        _check_bytes("join proof", self.invite_secret_proof, SIGNATURE_BYTES)
        _check_bytes("join joiner", self.joiner, NODE_ID_BYTES)
        _check_name("join name", self.name, allow_empty=False)
        _check_addrs("join addrs", self.addrs)
        _check_ms("join timestamp_ms", self.timestamp_ms)


def _proof_message(mesh_id: bytes, joiner: bytes, timestamp_ms: int) -> bytes:
    return _JOIN_PROOF + mesh_id + joiner + _MS.pack(timestamp_ms)


@record("join.signed")
@dataclass(frozen=True, slots=True)
class SignedJoinRequest:
    """What travels: the encoded `JoinRequest` and the joiner's signature over
    `nexus-join-request\\0` + those exact bytes."""

    request: bytes
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes("join request signature", self.signature, SIGNATURE_BYTES)


@record("join.accept")
@dataclass(frozen=True, slots=True)
class JoinAccept:
    """The admin's yes.

    Attributes:
        mesh_id: the mesh joined.
        cert: opaque member certificate / state entry (from the injected `issue_cert`).
        sealed_mesh_secret: the mesh secret, `seal_to(joiner, ...)`.
        founder: node id of the mesh founder (the root of admin trust).
        bootstrap: members to connect to next.
    """

    mesh_id: bytes
    cert: bytes = field(repr=False)
    sealed_mesh_secret: bytes = field(repr=False)
    founder: bytes
    bootstrap: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_bytes("join accept mesh_id", self.mesh_id, MESH_ID_BYTES)
        if not self.cert:
            raise ValueError("join accept cert: expected non-empty bytes, got 0 bytes")
        _check_bytes("join accept founder", self.founder, NODE_ID_BYTES)
        _check_addrs("join accept bootstrap", self.bootstrap)


@record("join.reject")
@dataclass(frozen=True, slots=True)
class JoinReject:
    """The admin's no, with the reason and an explanation for the operator."""

    reason: JoinRefusal
    detail: str

    def __post_init__(self) -> None:
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise ValueError(
                f"join reject detail: expected <= {MAX_DETAIL_CHARS} chars, got {len(self.detail)}"
            )


# ---------------------------------------------------------------------------------------
# Joiner side


@dataclass(frozen=True, slots=True)
class JoinResult:
    """What a successful join yields (not a wire record: it holds the open secret)."""

    mesh_id: bytes
    cert: bytes = field(repr=False)
    mesh_secret: MeshSecret
    founder: bytes
    bootstrap: tuple[str, ...]


def make_join_request(
    key: NodeKey, invite: Invite, name: str, addrs: tuple[str, ...], now: float
) -> bytes:
    """Build the signed join request to send to the invite's issuer.

    Args:
        key: the joiner's node key.
        invite: from `parse_invite`.
        name: the member name to ask for (the issuer's name hint wins if it set one).
        addrs: our listen multiaddrs.
        now: wall time in seconds.

    Returns:
        Encoded `SignedJoinRequest` bytes.

    Raises:
        JoinRefused: EXPIRED, when the invite has already expired by our clock.
        ValueError: invalid name or addrs.
    """
    if invite.expired(now):
        raise JoinRefused(
            JoinRefusal.EXPIRED,
            f"invite expired at {invite.expires_ms} ms, our clock is {wall_ms_of(now)} ms",
        )
    ts = wall_ms_of(now)
    proof = invite_key_of(invite.secret).sign(_proof_message(invite.mesh_id, key.node_id, ts))
    req = JoinRequest(invite.mesh_id, invite.invite_key, proof, key.node_id, name, tuple(addrs), ts)
    req_bytes = encode(req)
    return encode(SignedJoinRequest(req_bytes, key.sign(_JOIN_SIG + req_bytes)))


def accept_join(key: NodeKey, reply: bytes, invite: Invite, *, sender: bytes) -> JoinResult:
    """Read the admin's reply to our join request.

    Args:
        key: our node key (the sealed mesh secret opens with it).
        reply: the encoded `JoinAccept` or `JoinReject`.
        invite: the invite we joined with.
        sender: the transport-authenticated id of the peer that replied; it must be the
            invite's issuer (only the issuer holds the invite book).

    Returns:
        The certificate bytes, the mesh secret, the founder and bootstrap addresses.

    Raises:
        JoinRefused: the admin sent a `JoinReject` (`.reason`, `.detail`).
        UnknownSender: the reply came from someone other than the issuer.
        MalformedMessage: not a join reply, or a sealed secret of the wrong size.
        WrongMesh: an accept for another mesh.
        DecryptionFailed: the sealed secret was not sealed to our key.
    """
    if not hmac.compare_digest(sender, invite.issuer):
        raise UnknownSender(
            f"join reply from {short_id(sender)}, "
            f"expected the invite issuer {short_id(invite.issuer)}"
        )
    msg = decode_any(reply, (JoinAccept, JoinReject), limits=_REPLY_LIMITS)
    if isinstance(msg, JoinReject):
        raise JoinRefused(msg.reason, msg.detail)
    assert isinstance(msg, JoinAccept)  # decode_any returns one of the expected types
    if msg.mesh_id != invite.mesh_id:
        raise WrongMesh(
            f"join accept for mesh {msg.mesh_id.hex()}, expected {invite.mesh_id.hex()}"
        )
    raw_secret = open_sealed(key, msg.sealed_mesh_secret)
    try:
        secret = MeshSecret.from_bytes(raw_secret)
    except ValueError as exc:
        raise MalformedMessage(f"join accept sealed secret: {exc}") from None
    return JoinResult(msg.mesh_id, msg.cert, secret, msg.founder, msg.bootstrap)


# ---------------------------------------------------------------------------------------
# Admin side


class _Refusal(Exception):
    """Internal: one failed admission check (turned into a `JoinReject`)."""

    def __init__(self, reason: JoinRefusal, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS]


# refusals that are misbehaviour, and the `PeerScores` reason they count as; the others
# (expired, used up, revoked, unknown invite) happen to honest operators too
_PENALTY: dict[JoinRefusal, str] = {
    JoinRefusal.FORGED: "join_forged",
    JoinRefusal.MALFORMED: "malformed",
    JoinRefusal.WRONG_MESH: "wrong_mesh",
    JoinRefusal.STALE: "stale",
    JoinRefusal.RATE_LIMITED: "rate_limited",
}

IssueCert = Callable[[bytes, str, tuple[str, ...]], bytes]


class Admitter:
    """Admits joiners against this admin's invite book (the admin side of the handshake).

    Args:
        mesh_id: our mesh.
        book: our invite book; entries are updated in place when a use is spent.
        mesh_secret: sealed to each admitted joiner.
        founder: the founder's node id, sent to joiners.
        bootstrap: addresses sent to joiners.
        issue_cert: `(node_id, name, roles) -> bytes`, the encoded certificate entry.
        is_revoked: whether a node id is in the revocation set.
        is_admin: whether a node id is (still) an admin; invites of a former admin fail.
        limiter: per-sender bucket (default: 3 at once, then one per 10 s).
        global_limiter: one bucket for all joins (default: 20 at once, then 2 per s).
        window_s: accepted distance between a request's timestamp and our clock.
        roles: roles put in new certificates.
        scores: if given, misbehaving senders are penalised here (`_PENALTY`).

    Attributes:
        counters: refusals by `JoinRefusal` value, plus "accepted" and "retried".
    """

    def __init__(
        self,
        *,
        mesh_id: bytes,
        book: InviteBook,
        mesh_secret: MeshSecret,
        founder: bytes,
        bootstrap: tuple[str, ...],
        issue_cert: IssueCert,
        is_revoked: Callable[[bytes], bool],
        is_admin: Callable[[bytes], bool],
        limiter: RateLimiter | None = None,
        global_limiter: RateLimiter | None = None,
        window_s: float = 300.0,
        roles: tuple[str, ...] = ("member",),
        scores: PeerScores | None = None,
    ) -> None:
        _check_bytes("admitter mesh_id", mesh_id, MESH_ID_BYTES)
        _check_bytes("admitter founder", founder, NODE_ID_BYTES)
        _check_addrs("admitter bootstrap", bootstrap)
        if not window_s > 0:
            raise ValueError(f"window_s: expected > 0, got {window_s!r}")
        self.mesh_id = mesh_id
        self.book = book
        self._mesh_secret = mesh_secret
        self.founder = founder
        self.bootstrap = tuple(bootstrap)
        self._issue_cert = issue_cert
        self._is_revoked = is_revoked
        self._is_admin = is_admin
        self.limiter = RateLimiter(0.1, 3) if limiter is None else limiter
        self.global_limiter = RateLimiter(2.0, 20) if global_limiter is None else global_limiter
        self.window_ms = round(window_s * 1000)
        self.roles = tuple(roles)
        self.scores = scores
        self.counters: dict[str, int] = {r.value: 0 for r in JoinRefusal}
        self.counters.update(accepted=0, retried=0)

    def handle_join(
        self, raw: bytes, *, sender: bytes, now: float, rate_checked: bool = False
    ) -> JoinAccept | JoinReject:
        """Decide on one join request. Encode the result with `wire.encode` and send it.

        Args:
            raw: the bytes received on the join protocol.
            sender: the transport-authenticated peer id they came from.
            now: wall time in seconds.
            rate_checked: the caller charged `limiter` and `global_limiter` for this
                attempt before reading it (`mesh.join.serve_join` does).

        Returns:
            A `JoinAccept` (a use was spent, or a retry by an admitted joiner) or a
            `JoinReject` with the first failed check, in this order: rate limit, decode,
            sender == joiner, joiner signature, mesh, time window, invite known, invite
            proof, issuer still admin, joiner revoked, expiry, uses left.

        Error handling: refusals are returned, counted and logged, never raised;
        exceptions from `issue_cert` propagate (our bug) and spend no use.
        """
        try:
            reply = self._admit(raw, sender, now, rate_checked)
        except _Refusal as refusal:
            self.counters[refusal.reason.value] += 1
            log.warning(
                "join_refused",
                peer=short_id(sender),
                reason=refusal.reason.value,
                detail=refusal.detail,
            )
            penalty = _PENALTY.get(refusal.reason)
            if self.scores is not None and penalty is not None:
                self.scores.penalise(sender, penalty, now=now)
            return JoinReject(refusal.reason, refusal.detail)
        return reply

    def _admit(self, raw: bytes, sender: bytes, now: float, rate_checked: bool) -> JoinAccept:
        if not rate_checked:
            self._check_rate(sender, now)
        req = self._verified_request(raw, sender)
        self._check_fresh(req, now)
        entry = self._check_invite(req)
        if self._is_revoked(req.joiner):
            raise _Refusal(JoinRefusal.REVOKED, f"node {short_id(req.joiner)} is revoked")
        if wall_ms_of(now) > entry.expires_ms:
            raise _Refusal(
                JoinRefusal.EXPIRED,
                f"invite expired at {entry.expires_ms} ms, now is {wall_ms_of(now)} ms",
            )
        retry = req.joiner in entry.admitted
        if not retry and entry.uses_left == 0:
            used = len(entry.admitted)
            raise _Refusal(JoinRefusal.USED_UP, f"invite already used {used} times, no uses left")
        return self._grant(req, entry, retry)

    def _check_rate(self, sender: bytes, now: float) -> None:
        if not self.limiter.allow(("join", sender), now):
            raise _Refusal(
                JoinRefusal.RATE_LIMITED,
                f"too many join attempts from {short_id(sender)} "
                f"(at most {self.limiter.burst:g} at once, {self.limiter.rate_per_s:g}/s after)",
            )
        if not self.global_limiter.allow(("join", None), now):
            raise _Refusal(
                JoinRefusal.RATE_LIMITED,
                f"too many join attempts overall (at most {self.global_limiter.rate_per_s:g}/s)",
            )

    def _verified_request(self, raw: bytes, sender: bytes) -> JoinRequest:
        try:
            signed = decode(raw, SignedJoinRequest, limits=_LIMITS)
            req = decode(signed.request, JoinRequest, limits=_LIMITS)
        except MalformedMessage as exc:  # includes OversizeMessage
            raise _Refusal(JoinRefusal.MALFORMED, f"join request: {exc}") from None
        if not hmac.compare_digest(req.joiner, sender):
            raise _Refusal(
                JoinRefusal.FORGED,
                f"join request for joiner {short_id(req.joiner)} sent by transport peer "
                f"{short_id(sender)}",
            )
        try:
            verify_signature(req.joiner, _JOIN_SIG + signed.request, signed.signature)
        except InvalidSignature:
            raise _Refusal(
                JoinRefusal.FORGED,
                f"join request signature does not verify for joiner {short_id(req.joiner)}",
            ) from None
        if req.mesh_id != self.mesh_id:
            raise _Refusal(
                JoinRefusal.WRONG_MESH,
                f"join request for mesh {req.mesh_id.hex()}, this is mesh {self.mesh_id.hex()}",
            )
        return req

    def _check_fresh(self, req: JoinRequest, now: float) -> None:
        now_ms = wall_ms_of(now)
        if abs(req.timestamp_ms - now_ms) > self.window_ms:
            raise _Refusal(
                JoinRefusal.STALE,
                f"join request timestamp {req.timestamp_ms} ms is {req.timestamp_ms - now_ms:+d} "
                f"ms from our clock, outside the window of +-{self.window_ms} ms",
            )

    def _check_invite(self, req: JoinRequest) -> InviteRecord:
        entry = self.book.get(req.invite_key)
        if entry is None:
            raise _Refusal(
                JoinRefusal.NOT_A_MEMBER,
                f"unknown or cancelled invite (key {short_id(req.invite_key)})",
            )
        message = _proof_message(req.mesh_id, req.joiner, req.timestamp_ms)
        try:
            verify_signature(req.invite_key, message, req.invite_secret_proof)
        except InvalidSignature:
            raise _Refusal(
                JoinRefusal.FORGED,
                f"invite proof does not verify for joiner {short_id(req.joiner)} "
                f"(no possession of the invite secret)",
            ) from None
        if not self._is_admin(entry.issuer):
            raise _Refusal(
                JoinRefusal.NOT_A_MEMBER,
                f"invite issuer {short_id(entry.issuer)} is no longer an admin",
            )
        return entry

    def _grant(self, req: JoinRequest, entry: InviteRecord, retry: bool) -> JoinAccept:
        name = entry.name or req.name
        cert = self._issue_cert(req.joiner, name, self.roles)
        sealed = seal_to(req.joiner, self._mesh_secret.raw)
        if retry:
            self.counters["retried"] += 1
        else:
            self.book.add(
                replace(
                    entry, uses_left=entry.uses_left - 1, admitted=(*entry.admitted, req.joiner)
                )
            )
            self.counters["accepted"] += 1
        log.info("join_accepted", peer=short_id(req.joiner), name=name, retry=retry)
        return JoinAccept(self.mesh_id, cert, sealed, self.founder, self.bootstrap)

    def __repr__(self) -> str:
        return (
            f"Admitter(mesh_id={self.mesh_id.hex()}, invites={len(self.book)}, "
            f"window_ms={self.window_ms}, accepted={self.counters['accepted']}, "
            f"refused={sum(self.counters[r.value] for r in JoinRefusal)})"
        )
