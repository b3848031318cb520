"""The join protocol shell (`/nexus/join/1`): the admin's handler and the joiner's client.

The decisions are in the sans-IO `mesh.membership` (`Admitter`, `make_join_request`,
`accept_join`); this module only moves one request frame and one reply frame, and keeps
the admin's invite book on disk. It also defines `MeshIdentity`, what joining yields.

Rule 1: the protocol is open to non-members (`open_to_all=True`), so it is rate-limited per
remote and globally before anything is read, the request is read with its own 16 KiB limit
(refused on the length prefix), and a node that is not an admin answers `NOT_A_MEMBER`
without looking at the request. Every refusal is logged with its reason and counted.
Rule 2: one request and one reply per stream, each under a read deadline; nothing waits
forever on a silent peer.
Rule 3: the invite book file holds no secret (only public invite keys, see
`mesh.membership`), is written atomically (temp file + rename, mode 0600), and a file we
cannot parse is an error, never silently replaced.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import MalformedMessage, OversizeMessage, TransportBroken
from mesh.hlc import HybridClock, Timestamp, wall_ms_of
from mesh.identity import MeshSecret, NodeKey, short_id
from mesh.membership import (
    Admitter,
    Invite,
    InviteBook,
    InviteRecord,
    IssueCert,
    JoinAccept,
    JoinRefusal,
    JoinReject,
    JoinResult,
    accept_join,
    create_invite,
    make_join_request,
    parse_invite,
)
from mesh.scoring import PeerScores, RateLimiter
from mesh.state import MeshState, SignedEntry
from mesh.transport.base import Stream, Transport
from mesh.wire import decode, encode

log = structlog.get_logger(__name__)

JOIN_PROTOCOL = "/nexus/join/1"
MAX_REQUEST_BYTES = 16 * 1024
MAX_REPLY_BYTES = 256 * 1024  # a JoinAccept: certificate entry, sealed secret, bootstrap


async def serve_join(
    stream: Stream,
    admitter: Admitter | None,
    *,
    limiter: RateLimiter,
    global_limiter: RateLimiter,
    wall: Callable[[], float],
    on_accept: Callable[[], Awaitable[None]],
    refuse: Callable[[bytes, str, str], None],
) -> None:
    """Answer one join request on an inbound stream.

    Order (Rule 1): the rate limit is charged before a byte of the request is read; the
    request is then read with a limit of `MAX_REQUEST_BYTES`, so a larger frame is refused
    on its length prefix (`OversizeMessage`, the stream is reset) and never buffered.

    Args:
        stream: the inbound stream (the remote is authenticated, maybe not a member).
        admitter: our admission machine, or None when we are not an admin of a mesh.
        limiter, global_limiter: the join buckets (per remote, global); the admitter is
            told the attempt was charged here.
        wall: wall clock in seconds.
        on_accept: awaited after a `JoinAccept` was sent (persist the spent invite use).
        refuse: `(peer, reason, detail)`, told of each refusal decided here (it logs and
            counts it); the admitter logs and counts its own.

    Raises:
        TransportBroken: the joiner vanished or missed the read deadline.
        OversizeMessage: the request was announced over `MAX_REQUEST_BYTES`.
    """
    peer = stream.remote_id
    now = wall()
    if not (limiter.allow(("join", peer), now) and global_limiter.allow(("join", None), now)):
        refuse(peer, JoinRefusal.RATE_LIMITED.value, "too many join attempts")
        refusal = JoinReject(JoinRefusal.RATE_LIMITED, "too many join attempts; try again later")
        await stream.send(encode(refusal))
        return
    raw = await stream.receive(max_bytes=MAX_REQUEST_BYTES)
    if admitter is None:
        refuse(peer, JoinRefusal.NOT_A_MEMBER.value, "this node is not an admin of a mesh")
        reply: JoinAccept | JoinReject = JoinReject(
            JoinRefusal.NOT_A_MEMBER, "this node is not an admin of a mesh; dial the invite issuer"
        )
        await stream.send(encode(reply))
        return
    reply = admitter.handle_join(raw, sender=peer, now=wall(), rate_checked=True)
    await stream.send(encode(reply))
    if isinstance(reply, JoinAccept):
        await on_accept()


async def request_join(
    transport: Transport,
    key: NodeKey,
    invite: Invite,
    name: str,
    *,
    wall: Callable[[], float],
    timeout_s: float,
) -> JoinResult:
    """Dial the invite's issuer, send our join request and read its answer.

    Args:
        transport: our transport (we are not a member yet: only open protocols answer).
        key: our node key.
        invite: a parsed invite (`parse_invite`).
        name: the member name we ask for.
        wall: wall clock in seconds.
        timeout_s: deadline for the reply.

    Returns:
        The join result (certificate entry bytes, mesh secret, founder, bootstrap).

    Raises:
        JoinRefused: the issuer refused (`.reason`), or the invite expired by our clock.
        TransportBroken: the issuer is unreachable or did not answer in time.
        MalformedMessage: a bootstrap address that names another node than the issuer.
        PeerProtocolError: a malformed or forged reply.
    """
    try:
        await transport.connect(invite.issuer, list(invite.bootstrap))
    except ValueError as exc:  # an address naming another node, or not an address at all
        raise MalformedMessage(
            f"invite token: bootstrap address is not valid for the invite's issuer "
            f"{short_id(invite.issuer)} ({exc}); the invite is not usable"
        ) from None
    request = make_join_request(key, invite, name, tuple(transport.listen_addrs()), wall())
    stream = await transport.open_stream(invite.issuer, JOIN_PROTOCOL)
    try:
        await stream.send(request)
        reply = await stream.receive(timeout_s=timeout_s, max_bytes=MAX_REPLY_BYTES)
    finally:
        await close_bounded(stream.aclose)
    return accept_join(key, reply, invite, sender=stream.remote_id)


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """Which mesh this node belongs to: id, founder (root admin) and the mesh secret."""

    mesh_id: bytes
    founder: bytes
    secret: MeshSecret = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 < len(self.mesh_id) <= 64:
            raise ValueError(f"mesh_id: expected 1..64 bytes, got {len(self.mesh_id)}")
        if len(self.founder) != 32:
            raise ValueError(f"founder: expected 32 bytes, got {len(self.founder)}")


async def join_handshake(
    transport: Transport,
    key: NodeKey,
    token: str,
    name: str,
    *,
    wall: Callable[[], float],
    timeout_s: float,
    clock: HybridClock,
    max_drift_ms: int,
    max_lease_ms: int,
) -> tuple[Invite, JoinResult, MeshState]:
    """Parse a token, run the handshake with its issuer, and start our mesh state.

    The state holds our certificate when its issuer is the founder; a certificate from
    another admin needs that admin's own certificate first, which the caller's first
    anti-entropy pull brings. `clock` observes the certificate's HLC, so our own writes
    are stamped after it (inside the certificate's validity).

    Raises:
        As for `request_join`, plus MalformedMessage for a token or certificate that
        does not decode, InvalidSignature for a forged token.
    """
    invite = parse_invite(token)
    with trio.fail_after(4 * timeout_s):
        result = await request_join(transport, key, invite, name, wall=wall, timeout_s=timeout_s)
    cert = decode(result.cert, SignedEntry)
    state = MeshState(
        mesh_id=result.mesh_id,
        founder=result.founder,
        max_drift_ms=max_drift_ms,
        max_lease_ms=max_lease_ms,
    )
    clock.observe(Timestamp.unpack(cert.hlc), wall())
    state.apply([cert], wall_ms_of(wall()), skip_invalid=True)
    return invite, result, state


class InviteDesk:
    """The admin side of joining for one node: invite book (and its file), join rate
    limits, the `Admitter`, and the `/nexus/join/1` handler.

    Args:
        key: our node key (signs invites).
        listen_addrs: our current addresses (the invite's and accept's bootstrap).
        wall: wall clock in seconds.
        invites_path: JSON file of the book, or None to keep it in memory only.
        attempts_per_minute: join attempts allowed per remote (10 x that globally).
        window_s: accepted clock distance of a join request.
        timeout_s: deadline for one whole join exchange on the admin side.
        scores: misbehaving joiners are penalised here.
    """

    def __init__(
        self,
        *,
        key: NodeKey,
        listen_addrs: Callable[[], list[str]],
        wall: Callable[[], float],
        invites_path: Path | None,
        attempts_per_minute: int,
        window_s: float,
        timeout_s: float,
        scores: PeerScores,
    ) -> None:
        self._key, self._addrs, self._wall, self._path = key, listen_addrs, wall, invites_path
        self.book = load_invite_book(invites_path)
        rate = attempts_per_minute / 60.0
        self.limiter = RateLimiter(rate, min(3, attempts_per_minute))
        self.global_limiter = RateLimiter(10 * rate, 10 * attempts_per_minute)
        self._window_s, self._timeout_s, self._scores = window_s, timeout_s, scores
        self.admitter: Admitter | None = None
        self.refusals: Counter[str] = Counter()  # refusals decided before the admitter

    def bootstrap(self) -> tuple[str, ...]:
        """Our addresses as an invite carries them (at most 16)."""
        return tuple(self._addrs()[:16])

    def open_admitter(
        self,
        *,
        mesh_id: bytes,
        secret: MeshSecret,
        founder: bytes,
        issue_cert: IssueCert,
        is_revoked: Callable[[bytes], bool],
        is_admin: Callable[[bytes], bool],
    ) -> Admitter:
        """The admitter of our mesh (built on first use, then reused with its counters)."""
        if self.admitter is None:
            self.admitter = Admitter(
                mesh_id=mesh_id,
                book=self.book,
                mesh_secret=secret,
                founder=founder,
                bootstrap=self.bootstrap(),
                issue_cert=issue_cert,
                is_revoked=is_revoked,
                is_admin=is_admin,
                limiter=self.limiter,
                global_limiter=self.global_limiter,
                window_s=self._window_s,
                scores=self._scores,
            )
        return self.admitter

    async def serve(self, stream: Stream, admitter: Admitter | None) -> None:
        """Answer one join stream (None: we are no admin, refuse with NOT_A_MEMBER).

        A request announced over `MAX_REQUEST_BYTES` is refused (logged, counted, scored)
        on its length prefix.

        Raises:
            TransportBroken: the joiner vanished or the deadline passed.
        """
        try:
            with trio.fail_after(self._timeout_s):
                await serve_join(
                    stream,
                    admitter,
                    limiter=self.limiter,
                    global_limiter=self.global_limiter,
                    wall=self._wall,
                    on_accept=self.save,
                    refuse=self.refuse,
                )
        except OversizeMessage as exc:  # refused on the length prefix; the stream is reset
            self.refuse(stream.remote_id, "oversize", str(exc))
        except trio.TooSlowError as exc:
            raise TransportBroken(f"join from {short_id(stream.remote_id)}: deadline") from exc

    def refuse(self, peer: bytes, reason: str, detail: str) -> None:
        """Log and count a join refused before the admitter saw it; score what is abuse."""
        self.refusals[reason] += 1
        log.warning("join_refused", peer=short_id(peer), reason=reason, detail=detail)
        if reason in ("oversize", JoinRefusal.RATE_LIMITED.value):
            self._scores.penalise(peer, reason, now=self._wall())

    async def create(self, mesh_id: bytes, ttl_s: float, uses: int, name: str) -> str:
        """Issue an invite (the caller checked we are an admin); return its token.

        Raises:
            ValueError: ttl_s, uses or name out of range.
        """
        token, rec = create_invite(
            self._key, mesh_id, self.bootstrap(), ttl_s, uses, name, self._wall()
        )
        self.book.add(rec)
        await self.save()
        return token

    async def save(self) -> None:
        """Write the book to its file (if any), off the event loop."""
        if self._path is not None:
            await trio.to_thread.run_sync(save_invite_book, self._path, self.book)

    def __repr__(self) -> str:
        return f"InviteDesk(invites={len(self.book)}, path={str(self._path)!r})"


# ---------------------------------------------------------------------------------------
# The admin's invite book on disk (JSON; public data only, see Rule 3)


def _record_to_json(rec: InviteRecord) -> dict[str, object]:
    return {
        "invite_key": rec.invite_key.hex(),
        "issuer": rec.issuer.hex(),
        "expires_ms": rec.expires_ms,
        "uses_left": rec.uses_left,
        "name": rec.name,
        "admitted": [n.hex() for n in rec.admitted],
    }


def _record_from_json(row: object) -> InviteRecord:
    if not isinstance(row, dict):
        raise MalformedMessage(f"invite book row: expected an object, got {type(row).__name__}")
    try:
        return InviteRecord(
            invite_key=bytes.fromhex(row["invite_key"]),
            issuer=bytes.fromhex(row["issuer"]),
            expires_ms=int(row["expires_ms"]),
            uses_left=int(row["uses_left"]),
            name=str(row["name"]),
            admitted=tuple(bytes.fromhex(n) for n in row["admitted"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"invite book row: {type(exc).__name__}: {exc}") from None


def load_invite_book(path: Path | None) -> InviteBook:
    """Read the invite book (an empty book when `path` is None or does not exist).

    Raises:
        MalformedMessage: the file exists but is not a valid invite book.
    """
    if path is None or not path.exists():
        return InviteBook()
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MalformedMessage(f"invite book {path}: not JSON ({exc})") from None
    if not isinstance(rows, list):
        got = type(rows).__name__
        raise MalformedMessage(f"invite book {path}: expected a JSON list, got {got}")
    return InviteBook.from_records(_record_from_json(r) for r in rows)


def save_invite_book(path: Path, book: InviteBook) -> None:
    """Write the invite book atomically with mode 0600 (blocking: call it off the loop)."""
    data = json.dumps([_record_to_json(r) for r in book.to_records()], indent=1)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
