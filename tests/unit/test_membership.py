"""Invites and the join handshake: token round trip, every refusal, the whole join."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from mesh.errors import (
    DecryptionFailed,
    InvalidSignature,
    JoinRefused,
    MalformedMessage,
    OversizeMessage,
    UnknownSender,
    WrongMesh,
)
from mesh.identity import MeshSecret, NodeKey, seal_to
from mesh.membership import (
    TOKEN_PREFIX,
    Admitter,
    Invite,
    InviteBook,
    InviteRecord,
    JoinAccept,
    JoinRefusal,
    JoinReject,
    JoinRequest,
    SignedJoinRequest,
    _proof_message,
    accept_join,
    create_invite,
    format_invite,
    invite_key_of,
    make_join_request,
    parse_invite,
)
from mesh.scoring import PeerScores, RateLimiter
from mesh.wire import decode, encode

NOW = 1_800_000_000.0
MESH = bytes(range(16))
OTHER_MESH = bytes(range(1, 17))
ADDRS = ("/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/udp/4001/quic-v1")
ADMIN = NodeKey.from_seed(b"\x01" * 32)
JOINER = NodeKey.from_seed(b"\x02" * 32)
THIEF = NodeKey.from_seed(b"\x03" * 32)
SECRET = b"\x5a" * 32


@dataclass
class Mesh:
    """An admin with an invite book and an admitter, plus knobs for the injected callables."""

    book: InviteBook = field(default_factory=InviteBook)
    mesh_secret: MeshSecret = field(default_factory=lambda: MeshSecret.from_bytes(b"\x77" * 32))
    revoked: set[bytes] = field(default_factory=set)
    admins: set[bytes] = field(default_factory=lambda: {ADMIN.node_id})
    issued: list[tuple[bytes, str, tuple[str, ...]]] = field(default_factory=list)
    scores: PeerScores = field(default_factory=PeerScores)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(1.0, 100))
    admitter: Admitter = field(init=False)

    def __post_init__(self) -> None:
        self.admitter = Admitter(
            mesh_id=MESH,
            book=self.book,
            mesh_secret=self.mesh_secret,
            founder=ADMIN.node_id,
            bootstrap=ADDRS,
            issue_cert=self.issue,
            is_revoked=self.revoked.__contains__,
            is_admin=self.admins.__contains__,
            limiter=self.limiter,
            scores=self.scores,
        )

    def issue(self, node: bytes, name: str, roles: tuple[str, ...]) -> bytes:
        self.issued.append((node, name, roles))
        return b"cert|" + node + name.encode()

    def invite(
        self,
        *,
        uses: int = 1,
        ttl_s: float = 3600,
        name: str = "",
        mesh: bytes = MESH,
        secret: bytes = SECRET,
    ) -> Invite:
        token, rec = create_invite(ADMIN, mesh, ADDRS, ttl_s, uses, name, NOW, secret=secret)
        self.book.add(rec)
        return parse_invite(token)

    def join(
        self, key: NodeKey, invite: Invite, *, at: float = NOW + 1, sender: bytes | None = None
    ) -> JoinAccept | JoinReject:
        raw = make_join_request(key, invite, "box", ("/ip4/10.0.0.2/tcp/4001",), at)
        return self.admitter.handle_join(raw, sender=sender or key.node_id, now=at)


def signed(key: NodeKey, req: JoinRequest) -> bytes:
    body = encode(req)
    return encode(SignedJoinRequest(body, key.sign(b"nexus-join-request\0" + body)))


def request_of(raw: bytes) -> JoinRequest:
    return decode(decode(raw, SignedJoinRequest).request, JoinRequest)


def sid(key: NodeKey) -> str:
    return key.node_id[:4].hex()


def refused(reply: JoinAccept | JoinReject, reason: JoinRefusal, match: str) -> None:
    assert isinstance(reply, JoinReject), reply
    assert reply.reason is reason
    assert re.search(match, reply.detail), reply.detail


# --- invite tokens ---------------------------------------------------------------------


def test_token_text_is_prefixed_lowercase_unpadded_base32() -> None:
    token, rec = create_invite(ADMIN, MESH, ADDRS, 3600, 2, "laptop", NOW, secret=SECRET)
    body = token.removeprefix(TOKEN_PREFIX)
    assert token.startswith("nexus1-") and body == body.lower() and "=" not in body
    assert set(body) <= set("abcdefghijklmnopqrstuvwxyz234567")
    inv = parse_invite(token)
    got = (inv.mesh_id, inv.bootstrap, inv.secret, inv.uses, inv.name)
    assert got == (MESH, ADDRS, SECRET, 2, "laptop")
    assert inv.issuer == ADMIN.node_id and inv.expires_ms == round(NOW * 1000) + 3_600_000
    assert rec == InviteRecord(inv.invite_key, ADMIN.node_id, inv.expires_ms, 2, "laptop")
    assert parse_invite(f"  {token.upper()}\n") == inv  # retyped / pasted tokens
    assert parse_invite(f"{token[:40]}\n  {token[40:]}") == inv  # wrapped in an email


_ADDR_CHARS = "".join(map(chr, range(0x21, 0x7F)))
_NAME_CHARS = "abcXYZ019._-"


@settings(max_examples=30, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    mesh_id=st.binary(min_size=16, max_size=16),
    secret=st.binary(min_size=32, max_size=32),
    addrs=st.lists(st.text(_ADDR_CHARS, min_size=1, max_size=80).map("/".__add__), max_size=4),
    ttl_s=st.floats(min_value=0.001, max_value=1e8),
    uses=st.integers(min_value=1, max_value=1000),
    name=st.one_of(st.just(""), st.text(_NAME_CHARS, max_size=62).map("n".__add__)),
)
def test_token_round_trip(
    seed: bytes, mesh_id: bytes, secret: bytes, addrs: list[str], ttl_s: float, uses: int, name: str
) -> None:
    key = NodeKey.from_seed(seed)
    token, rec = create_invite(key, mesh_id, tuple(addrs), ttl_s, uses, name, NOW, secret=secret)
    inv = parse_invite(token)
    assert (inv.mesh_id, inv.bootstrap, inv.secret, inv.uses, inv.name, inv.issuer) == (
        mesh_id,
        tuple(addrs),
        secret,
        uses,
        name,
        key.node_id,
    )
    assert format_invite(inv) == token
    assert rec.invite_key == inv.invite_key and rec.uses_left == uses


def _tokenize(raw: bytes) -> str:
    return TOKEN_PREFIX + base64.b32encode(raw).decode().rstrip("=").lower()


def test_parse_invite_bad_prefix() -> None:
    with pytest.raises(MalformedMessage, match=r"expected prefix 'nexus1-', got 'nexus2-abc'"):
        parse_invite("nexus2-abc")


@pytest.mark.parametrize("body", ["a", "abc", "abcdef", "ab!cd", "ab1cd"])
def test_parse_invite_bad_base32(body: str) -> None:
    with pytest.raises(MalformedMessage, match="invite token: invalid base32"):
        parse_invite(TOKEN_PREFIX + body)


def test_parse_invite_bad_encoding() -> None:
    with pytest.raises(MalformedMessage, match=r"invite token: (invalid msgpack|truncated)"):
        parse_invite(_tokenize(b"\xc1\xc1\xc1\xc1\xc1"))
    with pytest.raises(MalformedMessage, match=r"invite token: wrong record kind 'join\.reject'"):
        parse_invite(_tokenize(encode(JoinReject(JoinRefusal.STALE, "x"))))
    inv = Mesh().invite()
    short = encode(inv)[:-5]
    with pytest.raises(MalformedMessage, match="invite token: truncated"):
        parse_invite(_tokenize(short))


def test_parse_invite_oversize() -> None:
    with pytest.raises(OversizeMessage, match="invite token of 20007 chars, over the limit"):
        parse_invite(TOKEN_PREFIX + "a" * 20000)


_FORGED_CHANGES: list[dict[str, object]] = [
    {"uses": 1000},
    {"expires_ms": 2**40},
    {"bootstrap": ("/ip4/6.6.6.6/tcp/1",)},
    {"issuer": THIEF.node_id},
    {"secret": b"\x00" * 32},
]


@pytest.mark.parametrize("change", _FORGED_CHANGES)
def test_parse_invite_forged_signature(change: dict[str, object]) -> None:
    forged = replace(Mesh().invite(), **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidSignature, match="invite token: signature does not verify for"):
        parse_invite(format_invite(forged))


def test_book_stores_no_secret_and_survives_persistence() -> None:
    m = Mesh()
    inv = m.invite(uses=2)
    assert isinstance(m.join(JOINER, inv), JoinAccept)
    saved = [encode(r) for r in m.book.to_records()]
    assert all(SECRET not in b and invite_key_of(SECRET).seed not in b for b in saved)
    restored = InviteBook.from_records(decode(b, InviteRecord) for b in saved)
    assert restored.to_records() == m.book.to_records()
    m2 = Mesh(book=restored)
    assert isinstance(m2.join(THIEF, inv), JoinAccept)  # the second and last use
    refused(m2.join(NodeKey.from_seed(b"\x09" * 32), inv), JoinRefusal.USED_UP, "used 2 times")


def test_book_prune_and_cancel() -> None:
    m = Mesh()
    inv = m.invite(ttl_s=60)
    m.invite(secret=b"\x11" * 32, ttl_s=7200)
    assert m.book.prune(NOW + 61) == 1 and len(m.book) == 1
    assert not m.book.cancel(inv.invite_key)
    other = m.book.to_records()[0].invite_key
    assert m.book.cancel(other) and len(m.book) == 0


# --- the join --------------------------------------------------------------------------


def test_join_end_to_end() -> None:
    m = Mesh()
    token, rec = create_invite(ADMIN, MESH, ADDRS, 600, 1, "", NOW)  # random secret
    m.book.add(rec)
    invite = parse_invite(token)  # joiner side, from the pasted text
    raw = make_join_request(JOINER, invite, "kitchen-pi", ("/ip4/10.0.0.9/tcp/4001",), NOW + 5)
    assert invite.secret not in raw
    with capture_logs() as logs:
        reply = m.admitter.handle_join(raw, sender=JOINER.node_id, now=NOW + 6)
    assert isinstance(reply, JoinAccept)
    assert [e["event"] for e in logs] == ["join_accepted"]
    result = accept_join(JOINER, encode(reply), invite, sender=ADMIN.node_id)
    assert result.mesh_secret.raw == m.mesh_secret.raw
    assert result.cert == b"cert|" + JOINER.node_id + b"kitchen-pi"
    assert (result.mesh_id, result.founder, result.bootstrap) == (MESH, ADMIN.node_id, ADDRS)
    assert m.issued == [(JOINER.node_id, "kitchen-pi", ("member",))]
    record = m.book.get(invite.invite_key)
    assert record is not None
    assert record.uses_left == 0
    assert m.admitter.counters["accepted"] == 1


def test_issuer_name_hint_wins_over_the_joiner_name() -> None:
    m = Mesh()
    assert isinstance(m.join(JOINER, m.invite(name="alice-laptop")), JoinAccept)
    assert m.issued[0][1] == "alice-laptop"


def test_retry_by_an_admitted_joiner_spends_no_use() -> None:
    m = Mesh()
    inv = m.invite(uses=1)
    first, again = m.join(JOINER, inv), m.join(JOINER, inv, at=NOW + 2)
    assert isinstance(first, JoinAccept) and isinstance(again, JoinAccept)
    assert m.admitter.counters["accepted"] == 1 and m.admitter.counters["retried"] == 1
    refused(m.join(THIEF, inv), JoinRefusal.USED_UP, r"invite already used 1 times, no uses left")


def test_refused_expired() -> None:
    m = Mesh()
    inv = m.invite(ttl_s=60)
    raw = make_join_request(JOINER, inv, "box", (), NOW + 59)
    reply = m.admitter.handle_join(raw, sender=JOINER.node_id, now=NOW + 61)
    detail = "invite expired at 1800000060000 ms, now is 1800000061000 ms"
    refused(reply, JoinRefusal.EXPIRED, detail)
    with pytest.raises(JoinRefused, match=r"join refused \(expired\): invite expired") as err:
        make_join_request(JOINER, inv, "box", (), NOW + 61)
    assert err.value.reason is JoinRefusal.EXPIRED


def test_refused_used_up_after_n_uses() -> None:
    m = Mesh()
    inv = m.invite(uses=3)
    keys = [NodeKey.from_seed(bytes([10 + i]) * 32) for i in range(4)]
    assert all(isinstance(m.join(k, inv), JoinAccept) for k in keys[:3])
    refused(m.join(keys[3], inv), JoinRefusal.USED_UP, r"invite already used 3 times")
    assert m.admitter.counters["used_up"] == 1 and len(m.issued) == 3


def test_refused_forged_token_signature_is_an_unknown_invite() -> None:
    """A thief signs its own invite: parse_invite accepts it (it is validly signed by the
    thief), but no admin's book knows its key."""
    m = Mesh()
    token, _ = create_invite(THIEF, MESH, ADDRS, 600, 1, "", NOW, secret=b"\x44" * 32)
    reply = m.join(THIEF, parse_invite(token))
    refused(reply, JoinRefusal.NOT_A_MEMBER, "unknown or cancelled invite")


def test_refused_tampered_proof() -> None:
    m = Mesh()
    inv = m.invite()
    req = request_of(make_join_request(JOINER, inv, "box", (), NOW))
    proof = req.invite_secret_proof
    bad = replace(req, invite_secret_proof=bytes([proof[0] ^ 1]) + proof[1:])
    reply = m.admitter.handle_join(signed(JOINER, bad), sender=JOINER.node_id, now=NOW)
    refused(reply, JoinRefusal.FORGED, r"invite proof does not verify for joiner [0-9a-f]{8}")
    record = m.book.get(inv.invite_key)
    assert record is not None
    assert record.uses_left == 1


def test_refused_stolen_proof_replayed_for_another_key() -> None:
    m = Mesh()
    inv = m.invite()
    stolen = request_of(make_join_request(JOINER, inv, "box", (), NOW))
    mine = replace(stolen, joiner=THIEF.node_id)  # the proof names JOINER
    refused(
        m.admitter.handle_join(signed(THIEF, mine), sender=THIEF.node_id, now=NOW),
        JoinRefusal.FORGED,
        "invite proof does not verify",
    )


def test_refused_bad_joiner_signature() -> None:
    m = Mesh()
    inv = m.invite()
    outer = decode(make_join_request(JOINER, inv, "box", (), NOW), SignedJoinRequest)
    raw = encode(replace(outer, signature=THIEF.sign(b"nexus-join-request\0" + outer.request)))
    refused(
        m.admitter.handle_join(raw, sender=JOINER.node_id, now=NOW),
        JoinRefusal.FORGED,
        r"join request signature does not verify for joiner [0-9a-f]{8}",
    )


def test_refused_sender_is_not_the_joiner() -> None:
    m = Mesh()
    reply = m.join(JOINER, m.invite(), sender=THIEF.node_id)
    refused(reply, JoinRefusal.FORGED, f"joiner {sid(JOINER)} sent by transport peer {sid(THIEF)}")
    assert m.scores.score(THIEF.node_id, NOW + 1) == 30.0  # penalised as join_forged


def test_refused_wrong_mesh() -> None:
    m = Mesh()
    refused(
        m.join(JOINER, m.invite(mesh=OTHER_MESH)),
        JoinRefusal.WRONG_MESH,
        f"join request for mesh {OTHER_MESH.hex()}, this is mesh {MESH.hex()}",
    )


def test_refused_revoked() -> None:
    m = Mesh()
    m.revoked.add(JOINER.node_id)
    refused(m.join(JOINER, m.invite()), JoinRefusal.REVOKED, f"node {sid(JOINER)} is revoked")
    assert m.issued == []


def test_refused_issuer_no_longer_admin() -> None:
    m = Mesh()
    inv = m.invite()
    m.admins.clear()
    refused(
        m.join(JOINER, inv),
        JoinRefusal.NOT_A_MEMBER,
        f"invite issuer {ADMIN.node_id[:4].hex()} is no longer an admin",
    )


def test_refused_cancelled_invite() -> None:
    m = Mesh()
    inv = m.invite()
    m.book.cancel(inv.invite_key)
    refused(m.join(JOINER, inv), JoinRefusal.NOT_A_MEMBER, "unknown or cancelled invite")


def test_refused_rate_limited_per_peer_and_globally() -> None:
    m = Mesh(limiter=RateLimiter(rate_per_s=0.1, burst=2))
    inv = m.invite(uses=5)
    replies = [m.join(JOINER, inv, at=NOW) for _ in range(3)]
    assert [type(r) for r in replies] == [JoinAccept, JoinAccept, JoinReject]
    refused(
        replies[2],
        JoinRefusal.RATE_LIMITED,
        rf"join attempts from {sid(JOINER)} \(at most 2 at once, 0.1/s after\)",
    )
    assert isinstance(m.join(JOINER, inv, at=NOW + 10), JoinAccept)  # refilled
    m.admitter.global_limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert isinstance(m.join(THIEF, inv, at=NOW + 20), JoinAccept)
    refused(
        m.join(NodeKey.from_seed(b"\x08" * 32), inv, at=NOW + 20),
        JoinRefusal.RATE_LIMITED,
        r"too many join attempts overall",
    )
    assert m.admitter.counters["rate_limited"] == 2


@pytest.mark.parametrize(("made_at", "sign"), [(NOW - 301, "-301000"), (NOW + 301, "\\+301000")])
def test_refused_stale_timestamp(made_at: float, sign: str) -> None:
    m = Mesh()
    raw = make_join_request(JOINER, m.invite(ttl_s=7200), "box", (), made_at)
    refused(
        m.admitter.handle_join(raw, sender=JOINER.node_id, now=NOW),
        JoinRefusal.STALE,
        rf"{sign} ms from our clock, outside the window of \+-300000 ms",
    )


def test_refused_malformed() -> None:
    m = Mesh()
    refused(
        m.admitter.handle_join(b"\x93\x01", sender=JOINER.node_id, now=NOW),
        JoinRefusal.MALFORMED,
        "join request: ",
    )
    refused(
        m.admitter.handle_join(b"x" * 9000, sender=JOINER.node_id, now=NOW),
        JoinRefusal.MALFORMED,
        "over the limit of 8192",
    )


def test_refusals_are_counted_logged_and_change_nothing() -> None:
    m = Mesh()
    inv = m.invite()
    before = m.book.to_records()
    with capture_logs() as logs:
        m.join(JOINER, inv, sender=THIEF.node_id)
        raw = make_join_request(JOINER, inv, "box", (), NOW + 3599)
        m.admitter.handle_join(raw, sender=JOINER.node_id, now=NOW + 3601)
    refusals = [e for e in logs if e["event"] == "join_refused"]
    assert [(e["event"], e["reason"], e["log_level"]) for e in refusals] == [
        ("join_refused", "forged", "warning"),
        ("join_refused", "expired", "warning"),
    ]
    assert m.book.to_records() == before and m.issued == []
    assert {k: v for k, v in m.admitter.counters.items() if v} == {"forged": 1, "expired": 1}


# --- joiner side -----------------------------------------------------------------------


def test_joiner_raises_join_refused_with_the_reason() -> None:
    inv = Mesh().invite()
    reply = encode(JoinReject(JoinRefusal.USED_UP, "invite already used 1 times"))
    with pytest.raises(JoinRefused, match=r"join refused \(used_up\): invite already used") as err:
        accept_join(JOINER, reply, inv, sender=ADMIN.node_id)
    assert err.value.reason is JoinRefusal.USED_UP
    assert err.value.detail == "invite already used 1 times"


def test_joiner_checks_the_reply() -> None:
    m = Mesh()
    inv = m.invite()
    reply = m.join(JOINER, inv)
    assert isinstance(reply, JoinAccept)
    with pytest.raises(UnknownSender, match=f"join reply from {sid(THIEF)}, expected the invite"):
        accept_join(JOINER, encode(reply), inv, sender=THIEF.node_id)
    with pytest.raises(WrongMesh, match=f"join accept for mesh {OTHER_MESH.hex()}"):
        accept_join(JOINER, encode(replace(reply, mesh_id=OTHER_MESH)), inv, sender=ADMIN.node_id)
    with pytest.raises(DecryptionFailed):
        accept_join(THIEF, encode(reply), inv, sender=ADMIN.node_id)
    short = replace(reply, sealed_mesh_secret=seal_to(JOINER.node_id, b"\x01" * 16))
    with pytest.raises(MalformedMessage, match="sealed secret: mesh secret: expected 32 bytes"):
        accept_join(JOINER, encode(short), inv, sender=ADMIN.node_id)
    with pytest.raises(MalformedMessage, match="wrong record kind 'invite'"):
        accept_join(JOINER, encode(inv), inv, sender=ADMIN.node_id)


def test_records_validate_their_fields() -> None:
    with pytest.raises(ValueError, match=r"join name: expected 1-63 chars of .*, got 'a b'"):
        make_join_request(JOINER, Mesh().invite(), "a b", (), NOW)
    with pytest.raises(ValueError, match="invite bootstrap: expected multiaddrs"):
        create_invite(ADMIN, MESH, ("ip4/1.2.3.4",), 60, 1, "", NOW)
    with pytest.raises(ValueError, match=r"invite uses: expected 1\.\.1000, got 0"):
        create_invite(ADMIN, MESH, ADDRS, 60, 0, "", NOW)
    with pytest.raises(ValueError, match="invite mesh_id: expected 16 bytes, got 3"):
        create_invite(ADMIN, b"abc", ADDRS, 60, 1, "", NOW)
    with pytest.raises(ValueError, match="invite ttl_s: expected 0 < ttl_s"):
        create_invite(ADMIN, MESH, ADDRS, 0, 1, "", NOW)


def test_proof_message_binds_mesh_joiner_and_time() -> None:
    a = _proof_message(MESH, JOINER.node_id, 1)
    assert a.startswith(b"nexus-join\0")
    others = [(OTHER_MESH, JOINER.node_id, 1), (MESH, THIEF.node_id, 1), (MESH, JOINER.node_id, 2)]
    assert len({a, *(_proof_message(*o) for o in others)}) == 4
