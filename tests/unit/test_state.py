"""MeshState: write rules, revocation, leases, merge laws and sync convergence."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from mesh.errors import (
    ForbiddenWrite,
    ForeignSlot,
    FutureMessage,
    InconsistentEntry,
    InvalidSignature,
    MalformedMessage,
    NotAdmin,
    NotMember,
    PeerProtocolError,
    WrongMesh,
)
from mesh.hlc import HybridClock, Timestamp
from mesh.identity import NodeKey
from mesh.state import (
    Advert,
    HostedSpan,
    LoadReport,
    MemberCert,
    MemberRemoval,
    MeshState,
    NodeState,
    Payload,
    PublishedAtom,
    PublishedModel,
    Revocation,
    SignedEntry,
    Slot,
    SlotKind,
    StateDigest,
    signing_bytes,
)
from mesh.wire import decode, encode

MESH = b"mesh-test"
NOW_MS = 10_000_000  # far past every test HLC: nothing is "from the future"
FOREVER = 10**12
KEYS = [NodeKey.from_seed(bytes([i + 1]) * 32) for i in range(7)]
FOUNDER, ADMIN, ADMIN2, M1, M2, M3, OUTSIDER = KEYS
ADMINS = (FOUNDER, ADMIN, ADMIN2)
NODES = (ADMIN, ADMIN2, M1, M2, M3)
LAWS = settings(max_examples=40, deadline=None)


def hlc(wall_ms: int, counter: int = 0) -> int:
    return Timestamp(wall_ms, counter).pack()


@functools.lru_cache(maxsize=4096)  # signing is the cost: reuse across examples
def entry(key: NodeKey, slot: Slot, payload: Payload, at: int, mesh: bytes = MESH) -> SignedEntry:
    body = encode(payload)
    signature = key.sign(signing_bytes(mesh, slot, key.node_id, at, body))
    return SignedEntry(slot, key.node_id, at, body, signature)


def cert(
    issuer: NodeKey,
    node: NodeKey,
    at: int,
    *,
    admin: bool = False,
    expires_ms: int = FOREVER,
    mesh: bytes = MESH,
) -> SignedEntry:
    roles = ("admin",) if admin else ()
    payload = MemberCert(mesh, node.node_id, "n", roles, 0, expires_ms, issuer.node_id)
    return entry(issuer, Slot(SlotKind.MEMBER, node.node_id), payload, at)


def advert(node: NodeKey, at: int, lease_ms: int, *, slot_of: NodeKey | None = None) -> SignedEntry:
    payload = Advert(
        (HostedSpan("m", 0, 2, "float32"),),
        1 << 30,
        4096,
        ("fp16",),
        ("/ip4/127.0.0.1/tcp/4001",),
        NodeState.ONLINE,
        lease_ms,
    )
    return entry(node, Slot(SlotKind.ADVERT, (slot_of or node).node_id), payload, at)


def load(node: NodeKey, at: int, depth: int = 0) -> SignedEntry:
    payload = LoadReport(depth, 0.25, (("m", 0, 100.0),), ((FOUNDER.node_id, 2.5),))
    return entry(node, Slot(SlotKind.LOAD, node.node_id), payload, at)


def revoke(author: NodeKey, node: NodeKey, at: int) -> SignedEntry:
    payload = Revocation(MESH, node.node_id, "test", 0)
    return entry(author, Slot(SlotKind.REVOKE, node.node_id), payload, at)


def model(author: NodeKey, model_id: str, at: int, family: str = "bert") -> SignedEntry:
    payload = PublishedModel(
        family, '{"layers": 2}', (PublishedAtom(0, "embed", b"\x01" * 32, 10),)
    )
    return entry(author, Slot.model(model_id), payload, at)


def removal(
    author: NodeKey, node: NodeKey, dots: tuple[tuple[bytes, int], ...], at: int
) -> SignedEntry:
    payload = MemberRemoval(node.node_id, dots)
    return entry(author, Slot(SlotKind.UNMEMBER, node.node_id), payload, at)


def fresh() -> MeshState:
    return MeshState(mesh_id=MESH, founder=FOUNDER.node_id)


def base_entries() -> list[SignedEntry]:
    """A founder-certified admin and member, each with an advert."""
    return [
        cert(FOUNDER, ADMIN, hlc(100), admin=True),
        cert(FOUNDER, M1, hlc(100)),
        advert(M1, hlc(200), 5_000),
    ]


def based() -> MeshState:
    state = fresh()
    state.apply(base_entries(), NOW_MS)
    return state


# -- accepted writes -----------------------------------------------------------------------


def test_apply_accepts_a_batch_in_any_order_and_returns_new_entries() -> None:
    entries = base_entries()
    state = fresh()
    accepted = state.apply(list(reversed(entries)), NOW_MS)  # advert before the cert it needs
    assert set(accepted) == set(entries)
    assert state.apply(entries, NOW_MS) == [], "duplicates came back as new"
    assert state.is_member(M1.node_id, 1_000) and not state.is_member(M2.node_id, 1_000)
    assert state.admins() == frozenset({FOUNDER.node_id, ADMIN.node_id})
    assert set(state.live_adverts(1_000)) == {M1.node_id}


def test_admin_writes_certs_and_models_members_write_own_slots() -> None:
    state = based()
    accepted = state.apply(
        [cert(ADMIN, M2, hlc(300)), model(ADMIN, "minilm", hlc(300)), load(M2, hlc(400), depth=3)],
        NOW_MS,
    )
    assert len(accepted) == 3
    assert state.loads()[M2.node_id].queue_depth == 3
    assert state.models()["minilm"].family == "bert"
    assert state.members(1_000).keys() == {ADMIN.node_id, M1.node_id, M2.node_id}


def test_local_write_signs_applies_and_moves_hlc_past_previous_write() -> None:
    state = based()
    clock = HybridClock(max_drift_s=5)
    first = state.local_write(
        M1, Slot(SlotKind.LOAD, M1.node_id), LoadReport(1, 0.5, (), ()), clock, 1.0
    )
    slow_clock = HybridClock(max_drift_s=5)  # a restarted node whose clock went back
    second = state.local_write(
        M1, Slot(SlotKind.LOAD, M1.node_id), LoadReport(2, 0.5, (), ()), slow_clock, 0.5
    )
    assert second.hlc > first.hlc
    assert state.loads()[M1.node_id].queue_depth == 2
    with pytest.raises(TypeError, match=r"LOAD slot: expected LoadReport, got Revocation"):
        state.local_write(
            M1, Slot(SlotKind.LOAD, M1.node_id), Revocation(MESH, M1.node_id, "", 0), clock, 1.0
        )


# -- write rules: each rejection has its own error -----------------------------------------

REJECTIONS = [
    pytest.param(
        lambda: advert(M1, hlc(300), 5_000, slot_of=M2),
        ForeignSlot,
        r"advert entry by \w+: a node writes only its own slot",
        id="foreign-advert",
    ),
    pytest.param(
        lambda: load(M2, hlc(300)),
        NotMember,
        r"load entry by \w+: expected a member at 300 ms",
        id="non-member-load",
    ),
    pytest.param(
        lambda: cert(M1, M2, hlc(300)),
        NotAdmin,
        r"member entry by \w+: expected an admin at 300 ms",
        id="non-admin-cert",
    ),
    pytest.param(
        lambda: revoke(M1, ADMIN, hlc(300)),
        NotAdmin,
        r"revoke entry by \w+: expected an admin",
        id="non-admin-revoke",
    ),
    pytest.param(
        lambda: model(M1, "minilm", hlc(300)),
        NotAdmin,
        r"model entry by \w+: expected an admin",
        id="non-admin-model",
    ),
    pytest.param(
        lambda: cert(ADMIN, M2, hlc(300), admin=True),
        ForbiddenWrite,
        r"only the founder grants the admin role",
        id="admin-grant-by-non-founder",
    ),
    pytest.param(
        lambda: revoke(ADMIN, FOUNDER, hlc(300)),
        ForbiddenWrite,
        r"the founder cannot be revoked",
        id="revoke-founder",
    ),
    pytest.param(
        lambda: advert(M1, hlc(300), 300 + 600_001),
        ForbiddenWrite,
        r"expected lease at most 600000 ms after the entry, got 600001 ms",
        id="lease",
    ),
    pytest.param(
        lambda: cert(FOUNDER, M2, hlc(300), mesh=b"other"),
        WrongMesh,
        r"expected mesh 6d6573682d74657374, got 6f74686572",
        id="wrong-mesh",
    ),
    pytest.param(
        lambda: entry(
            FOUNDER,
            Slot(SlotKind.MEMBER, M2.node_id),
            MemberCert(MESH, M3.node_id, "n", (), 0, 1, FOUNDER.node_id),
            hlc(300),
        ),
        InconsistentEntry,
        r"expected payload node \w+ \(the slot\)",
        id="cert-slot",
    ),
    pytest.param(
        lambda: entry(
            FOUNDER,
            Slot(SlotKind.MEMBER, M2.node_id),
            MemberCert(MESH, M2.node_id, "n", (), 0, 1, ADMIN.node_id),
            hlc(300),
        ),
        InconsistentEntry,
        r"expected issuer = author",
        id="cert-issuer",
    ),
    pytest.param(
        lambda: entry(
            M1, Slot(SlotKind.LOAD, M1.node_id), Revocation(MESH, M1.node_id, "", 0), hlc(300)
        ),
        MalformedMessage,
        r"wrong record kind 'revocation', expected 'load_report'",
        id="payload-kind",
    ),
    pytest.param(
        lambda: advert(M1, hlc(NOW_MS + 60_001), NOW_MS + 70_000),
        FutureMessage,
        r"expected hlc at most 60000 ms ahead, got 60001 ms ahead",
        id="future",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), REJECTIONS)
def test_write_rule_rejections_leave_state_unchanged(
    make: Callable[[], SignedEntry], error: type[PeerProtocolError], message: str
) -> None:
    state = based()
    before = state.fingerprint()
    with pytest.raises(error, match=message):
        state.apply([advert(M1, hlc(250), 6_000), make()], NOW_MS)  # good entry first: atomic
    assert state.fingerprint() == before


def test_tampered_or_foreign_mesh_signatures_are_invalid() -> None:
    good = advert(M1, hlc(300), 5_000)
    tampered = SignedEntry(good.slot, good.author, good.hlc + 1, good.payload, good.signature)
    with pytest.raises(InvalidSignature, match=r"signature by \w{8} does not verify"):
        based().apply([tampered], NOW_MS)
    other_mesh = MeshState(mesh_id=b"other", founder=FOUNDER.node_id)
    with pytest.raises(InvalidSignature, match=r"does not verify"):
        other_mesh.apply([cert(FOUNDER, M1, hlc(100))], NOW_MS)


def test_admin_rights_are_judged_at_the_entry_time() -> None:
    state = fresh()
    state.apply([cert(FOUNDER, ADMIN, hlc(100), admin=True, expires_ms=1_000)], NOW_MS)
    state.apply([cert(ADMIN, M1, hlc(999))], NOW_MS)
    with pytest.raises(NotAdmin, match=r"expected an admin at 1000 ms"):
        state.apply([cert(ADMIN, M2, hlc(1_000))], NOW_MS)


def test_skip_invalid_drops_and_logs_instead_of_raising() -> None:
    state = fresh()
    with capture_logs() as logs:
        accepted = state.apply(
            [cert(FOUNDER, M1, hlc(100)), load(M2, hlc(300))], NOW_MS, skip_invalid=True
        )
    assert accepted == [cert(FOUNDER, M1, hlc(100))]
    assert [(e["event"], e["error"]) for e in logs] == [("state_entry_rejected", "NotMember")]


# -- revocation -------------------------------------------------------------------------


def test_revocation_purges_and_blocks_the_node_forever() -> None:
    state = based()
    state.apply([load(M1, hlc(300)), model(ADMIN, "x", hlc(300))], NOW_MS)
    state.apply([revoke(ADMIN, M1, hlc(400))], NOW_MS)
    assert not state.is_member(M1.node_id, 1_000) and state.is_revoked(M1.node_id)
    assert M1.node_id not in state.live_adverts(1_000) and M1.node_id not in state.loads()
    # later writes of or about the revoked node: dropped, never a member again
    assert state.apply([advert(M1, hlc(500), 5_000), cert(FOUNDER, M1, hlc(500))], NOW_MS) == [
        cert(FOUNDER, M1, hlc(500))
    ]
    assert not state.is_member(M1.node_id, 1_000) and M1.node_id not in state.members(1_000)


def test_revoked_admin_loses_its_manifests_and_an_older_one_returns() -> None:
    older, newer = model(FOUNDER, "x", hlc(300), "bert"), model(ADMIN, "x", hlc(400), "llama")
    state = based()
    state.apply([older, newer], NOW_MS)
    assert state.models()["x"].family == "llama"
    state.apply([revoke(FOUNDER, ADMIN, hlc(500))], NOW_MS)
    assert state.models()["x"].family == "bert"
    assert state.admins() == frozenset({FOUNDER.node_id})


def test_certs_by_a_revoked_admin_confer_nothing() -> None:
    state = based()
    state.apply([cert(ADMIN, M2, hlc(300)), revoke(FOUNDER, ADMIN, hlc(400))], NOW_MS)
    assert not state.is_member(M2.node_id, 1_000)


def test_revocations_by_a_later_revoked_admin_still_hold() -> None:
    state = based()
    state.apply([revoke(ADMIN, M1, hlc(300)), revoke(FOUNDER, ADMIN, hlc(400))], NOW_MS)
    assert state.revoked() == frozenset({M1.node_id, ADMIN.node_id})
    assert not state.is_member(M1.node_id, 1_000)


# -- add-wins membership ------------------------------------------------------------------


def test_removal_removes_observed_certs_and_concurrent_re_add_wins() -> None:
    state = based()
    dots = state.cert_dots(M1.node_id)
    assert dots == ((FOUNDER.node_id, hlc(100)),)
    concurrent = based()
    concurrent.apply([cert(ADMIN, M1, hlc(150))], NOW_MS)  # a renewal the remover never saw
    state.apply([removal(ADMIN, M1, dots, hlc(160))], NOW_MS)
    assert not state.is_member(M1.node_id, 1_000)
    assert state.merge(concurrent).is_member(M1.node_id, 1_000)
    assert concurrent.merge(state).is_member(M1.node_id, 1_000)


# -- leases and pruning -----------------------------------------------------------------


def test_lease_expiry_prune_and_no_resurrection() -> None:
    state = based()  # M1's advert lease ends at 5_000 ms
    holder = based()
    assert M1.node_id in state.live_adverts(4_999)
    assert state.live_adverts(5_000) == {}
    assert state.prune(4_999) == 0 and state.prune(5_000) == 1
    assert state.advert(M1.node_id) is None
    assert state.apply([advert(M1, hlc(200), 5_000)], NOW_MS) == [], "old advert came back"
    assert holder.missing_for(state.digest()) == [], "peer would resend what we pruned"
    assert state.merge(holder).advert(M1.node_id) is None
    renewed = advert(M1, hlc(6_000), 9_000)
    assert state.apply([renewed], NOW_MS) == [renewed]
    assert set(state.live_adverts(6_000)) == {M1.node_id}


def test_prune_drops_old_load_reports() -> None:
    state = based()
    state.apply([load(M1, hlc(300))], NOW_MS)
    assert state.prune(300 + 600_000 - 1) == 1  # the advert only
    assert state.prune(300 + 600_000) == 1 and state.loads() == {}


# -- sync API --------------------------------------------------------------------------------


def test_digest_is_compact_and_round_trips_on_the_wire() -> None:
    state = based()
    for i, node in enumerate((M2, M3)):
        state.apply(
            [
                cert(FOUNDER, node, hlc(100)),
                advert(node, hlc(200 + i), 5_000),
                load(node, hlc(300)),
            ],
            NOW_MS,
        )
    raw = encode(state.digest())
    assert decode(raw, StateDigest) == state.digest()
    assert len(raw) < 100 * len(state.digest().rows)  # under 100 bytes per row
    assert fresh().missing_for(state.digest()) == []
    assert state.missing_for(fresh().digest()) == state.entries()


def test_missing_for_sends_only_newer_lww_entries() -> None:
    old, new = based(), based()
    new.apply([advert(M1, hlc(300), 5_000)], NOW_MS)
    assert new.missing_for(old.digest()) == [advert(M1, hlc(300), 5_000)]
    assert old.missing_for(new.digest()) == []


def test_paged_sync_applies_page_by_page() -> None:
    source = based()
    for node in (ADMIN, M2, M3):
        source.apply(
            [cert(FOUNDER, node, hlc(100)), advert(node, hlc(200), 5_000), load(node, hlc(300))],
            NOW_MS,
        )
    source.apply([model(ADMIN, "x", hlc(300))], NOW_MS)
    replica, pages = fresh(), 0
    while page := source.missing_for(replica.digest(), max_bytes=600):
        assert len(page) == 1 or sum(len(encode(e)) for e in page) <= 600
        replica.apply(page, NOW_MS)  # strict: every prefix is self-sufficient
        pages += 1
    assert replica == source and pages > 3


# -- merge laws and convergence (Hypothesis) -------------------------------------------------

# ("kind", *arguments): one random operation, see to_entry and build
EntryOp = (
    tuple[Literal["cert"], NodeKey, NodeKey, bool, int]
    | tuple[Literal["remove", "revoke"], NodeKey, NodeKey, int]
    | tuple[Literal["advert", "load"], NodeKey, int, int]
    | tuple[Literal["model"], NodeKey, str, int]
)
Op = EntryOp | tuple[Literal["prune"], int]
key_of = st.sampled_from
walls = st.integers(100, 104)
ops = st.one_of(
    st.tuples(st.just("cert"), key_of(ADMINS), key_of(NODES), st.booleans(), walls),
    st.tuples(st.just("remove"), key_of(ADMINS), key_of(NODES), walls),
    st.tuples(st.just("revoke"), key_of(ADMINS), key_of(NODES), walls),
    st.tuples(st.just("advert"), key_of(NODES), walls, st.sampled_from([150, 5_000])),
    st.tuples(st.just("load"), key_of(NODES), walls, st.integers(0, 2)),
    st.tuples(st.just("model"), key_of(ADMINS), st.sampled_from(["a", "b"]), walls),
    st.tuples(st.just("prune"), st.sampled_from([200, 4_000, 6_000])),
)


def to_entry(state: MeshState, op: EntryOp) -> SignedEntry | None:
    match op:
        case ("cert", issuer, node, is_admin, wall):
            return cert(issuer, node, hlc(wall, 1), admin=is_admin and issuer is FOUNDER)
        case ("remove", author, node, wall):
            dots = state.cert_dots(node.node_id)
            return removal(author, node, dots, hlc(wall, 2)) if dots else None
        case ("revoke", author, node, wall):
            return revoke(author, node, hlc(wall, 3))
        case ("advert", node, wall, lease):
            return advert(node, hlc(wall), lease)
        case ("load", node, wall, depth):
            return load(node, hlc(wall), depth)
        case ("model", author, model_id, wall):
            return model(author, model_id, hlc(wall))
    return None


def build(op_list: list[Op], *, allow_prune: bool = True) -> MeshState:
    """A state reached by random operations (invalid ones are dropped, as a replica would)."""
    state = based()
    for op in op_list:
        match op:
            case ("prune", at):
                if allow_prune:
                    state.prune(at)
            case _:
                made = to_entry(state, op)
                if made is not None:
                    state.apply([made], NOW_MS, skip_invalid=True)
    return state


op_lists = st.lists(ops, max_size=8)


@LAWS
@given(op_lists, op_lists, op_lists)
def test_mesh_state_merge_laws(a_ops: list[Op], b_ops: list[Op], c_ops: list[Op]) -> None:
    a, b, c = build(a_ops), build(b_ops), build(c_ops)
    ab, ba = a.merge(b), b.merge(a)
    assert ab == ba and ab.fingerprint() == ba.fingerprint(), "not commutative"
    assert ab.merge(c) == a.merge(b.merge(c)), "not associative"
    assert a.merge(a) == a, "not idempotent"
    assert ab.digest() == ba.digest()


@LAWS
@given(op_lists, op_lists, op_lists, st.randoms(use_true_random=False))
def test_any_delivery_order_converges(
    a_ops: list[Op], b_ops: list[Op], c_ops: list[Op], rnd: random.Random
) -> None:
    states = [build(o, allow_prune=False) for o in (a_ops, b_ops, c_ops)]
    joined = states[0].merge(states[1]).merge(states[2])
    pool = [e for s in states for e in s.entries()]
    pool += rnd.sample(pool, k=min(5, len(pool)))  # duplicates
    # one batch, any permutation: identical state
    for _ in range(2):
        rnd.shuffle(pool)
        replica = fresh()
        replica.apply(pool, NOW_MS)
        assert replica == joined and replica.digest() == joined.digest()
    # one entry at a time as gossip deltas (out-of-order ones are refused), then one
    # anti-entropy round against any up-to-date peer: identical state
    rnd.shuffle(pool)
    replica = fresh()
    for e in pool:
        try:
            replica.apply([e], NOW_MS)
        except (NotAdmin, NotMember):
            pass
    replica.apply(joined.missing_for(replica.digest()), NOW_MS)
    assert replica == joined and replica.missing_for(joined.digest()) == []


@LAWS
@given(op_lists, op_lists, st.permutations(range(3)))
def test_revoked_node_never_comes_back_through_any_merge_order(
    a_ops: list[Op], b_ops: list[Op], order: list[int]
) -> None:
    a, b = build(a_ops), build(b_ops)
    revoker = based()
    revoker.apply([revoke(FOUNDER, M1, hlc(104, 9))], NOW_MS)
    states = [a, b, revoker]
    merged = states[order[0]].merge(states[order[1]]).merge(states[order[2]])
    late = fresh()
    late.apply([revoke(FOUNDER, M1, hlc(104, 9))], NOW_MS)
    for state in (merged, merged.merge(late), late.merge(a).merge(b)):
        assert not state.is_member(M1.node_id, 1_000)
        assert M1.node_id not in state.live_adverts(100) and M1.node_id not in state.loads()
        assert all(e.author != M1.node_id for e in state.entries())


def test_merge_refuses_another_mesh() -> None:
    with pytest.raises(ValueError, match=r"expected states of the same mesh"):
        fresh().merge(MeshState(mesh_id=b"other", founder=FOUNDER.node_id))


def test_repr_shows_counts() -> None:
    assert "member=2" in repr(based()) and "revoked=0" in repr(based())


def test_entries_are_peer_protocol_errors() -> None:
    for error in (ForeignSlot, NotAdmin, NotMember, WrongMesh, InconsistentEntry):
        assert issubclass(error, PeerProtocolError)
