"""Node keys, envelopes (every rejection, no state change before verification), encryption."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import (
    DecryptionFailed,
    FutureMessage,
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
from mesh.hlc import HybridClock, Timestamp
from mesh.identity import (
    Envelope,
    EnvelopeVerifier,
    LargeBody,
    MeshSecret,
    NodeKey,
    SignedEnvelope,
    digest,
    open_sealed,
    seal,
    seal_large,
    seal_to,
    short_id,
    verify_signature,
)
from mesh.identity.envelope import _signed_message
from mesh.wire import decode, encode

if TYPE_CHECKING:
    from pathlib import Path

# Hypothesis: few examples and no per-example deadline (2 shared cores, keep fast, not flaky)
FAST = settings(max_examples=40, deadline=None)

DOMAIN = "nexus/state/1"
T0 = 1_700_000_000.0
ALICE = NodeKey.from_seed(b"a" * 32)
MALLORY = NodeKey.from_seed(b"m" * 32)


def known(sender: bytes) -> bool:
    return sender in {ALICE.node_id, MALLORY.node_id}


def verifier(*, capacity: int = 100, max_body: int = 1024) -> EnvelopeVerifier:
    return EnvelopeVerifier(
        clock=HybridClock(max_drift_s=2.0),
        window_s=30.0,
        max_body_bytes=max_body,
        replay_capacity=capacity,
    )


def sealed(
    body: bytes = b"hello",
    *,
    now: float = T0,
    nonce: bytes | None = None,
    domain: str = DOMAIN,
    key: NodeKey = ALICE,
) -> bytes:
    return seal(key, domain, body, clock=HybridClock(max_drift_s=2.0), now=now, nonce=nonce)


def forge(env: Envelope, *, sign_domain: str | None = None, key: NodeKey = MALLORY) -> bytes:
    """Encode `env` signed by `key` (not necessarily its sender) for `sign_domain`."""
    env_bytes = encode(env)
    signature = key.sign(_signed_message(sign_domain or env.domain, env_bytes))
    return encode(SignedEnvelope(env_bytes, signature))


def envelope(*, hlc: int, nonce: bytes = b"n" * 16, domain: str = DOMAIN) -> Envelope:
    return Envelope(1, domain, ALICE.node_id, hlc, nonce, b"body")


def opened(v: EnvelopeVerifier, raw: bytes, *, now: float = T0, domain: str = DOMAIN) -> Envelope:
    return v.open(raw, domain=domain, now=now, is_known=known)


# --- envelopes: acceptance -------------------------------------------------------------


def test_envelope_round_trip() -> None:
    v = verifier()
    env = opened(v, sealed(b"payload", now=T0), now=T0 + 0.1)
    assert (env.body, env.sender, env.domain) == (b"payload", ALICE.node_id, DOMAIN)
    assert env.timestamp.wall_ms == int(T0 * 1000)
    assert v._clock.last > env.timestamp  # the clock observed it


# --- envelopes: every rejection --------------------------------------------------------


def test_bad_signature() -> None:
    raw = bytearray(sealed())
    raw[-1] ^= 1  # last byte of the signature
    with pytest.raises(
        InvalidSignature, match=f"signature by {short_id(ALICE.node_id)} does not verify"
    ):
        opened(verifier(), bytes(raw))


def test_signature_for_another_domain_never_verifies() -> None:
    raw = forge(
        envelope(hlc=Timestamp(int(T0 * 1000), 0).pack()), sign_domain="nexus/act/1", key=ALICE
    )
    with pytest.raises(InvalidSignature, match="does not verify") as info:
        opened(verifier(), raw)
    assert not isinstance(info.value, WrongDomain)


def test_validly_signed_for_other_domain_is_wrong_domain() -> None:
    with pytest.raises(
        WrongDomain, match="envelope for domain 'nexus/act/1', expected 'nexus/state/1'"
    ):
        opened(verifier(), sealed(domain="nexus/act/1"))


def test_unknown_sender() -> None:
    stranger = NodeKey.from_seed(b"s" * 32)
    with pytest.raises(
        UnknownSender, match=f"sender {short_id(stranger.node_id)} is not a known member"
    ):
        opened(verifier(), sealed(key=stranger))


def test_stale() -> None:
    with pytest.raises(StaleMessage, match="is older than the window start"):
        opened(verifier(), sealed(now=T0 - 31), now=T0)


def test_future() -> None:
    with pytest.raises(
        FutureMessage, match="ms ahead of local time, over the allowed drift of 2000 ms"
    ):
        opened(verifier(), sealed(now=T0 + 2.5), now=T0)


def test_replay() -> None:
    v = verifier()
    raw = sealed()
    opened(v, raw)
    with pytest.raises(ReplayedMessage, match="already seen in the window"):
        opened(v, raw, now=T0 + 1)


def test_oversize_body() -> None:
    with pytest.raises(
        OversizeMessage, match="envelope body of 1025 bytes, over the limit of 1024"
    ):
        opened(verifier(max_body=1024), sealed(b"x" * 1025))
    with pytest.raises(OversizeMessage, match=r"envelope of \d+ bytes, over the limit of 1536"):
        opened(verifier(max_body=1024), sealed(b"x" * 2000))


def test_garbage_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="truncated message"):
        opened(verifier(), sealed()[:-10])


# --- nothing changes before the signature verifies --------------------------------------


def test_forged_far_future_message_does_not_move_the_clock() -> None:
    v = verifier()
    before = v._clock.last
    far = envelope(hlc=Timestamp(int((T0 + 1e6) * 1000), 0).pack())
    with pytest.raises(InvalidSignature):
        opened(v, forge(far))  # Mallory signs a message claiming to be from Alice
    assert v._clock.last == before


def test_forged_replay_does_not_poison_the_nonce_cache() -> None:
    v = verifier()
    genuine = sealed(nonce=b"k" * 16)
    claimed = decode(decode(genuine, SignedEnvelope).envelope, Envelope)
    with pytest.raises(InvalidSignature):
        opened(v, forge(claimed))  # same sender and nonce, wrong signer
    assert opened(v, genuine).nonce == b"k" * 16


def test_rejected_message_is_not_remembered() -> None:
    v = verifier()
    early = sealed(now=T0 + 3)
    with pytest.raises(FutureMessage):
        opened(v, early, now=T0)
    assert opened(v, early, now=T0 + 3).body == b"hello"


# --- replay cache bounds ---------------------------------------------------------------


def test_full_replay_cache_refuses_older_than_horizon() -> None:
    v = verifier(capacity=3)
    raws = [sealed(now=T0 + i, nonce=bytes([i]) * 16) for i in range(4)]
    for raw in raws:
        opened(v, raw, now=T0 + 4)
    # raws[0] was evicted to make room; its replay must still be refused
    with pytest.raises(
        StaleMessage, match=r"older than the replay horizon \(replay cache full at 3"
    ):
        opened(v, raws[0], now=T0 + 4)
    with pytest.raises(ReplayedMessage):
        opened(v, raws[1], now=T0 + 4)
    assert len(v._replay) == 3


def test_replay_entries_expire_with_the_window() -> None:
    v = verifier(capacity=3)
    opened(v, sealed(now=T0, nonce=b"a" * 16), now=T0)
    opened(v, sealed(now=T0 + 40, nonce=b"b" * 16), now=T0 + 40)
    assert len(v._replay) == 1
    assert v._replay.floor == -1


# --- large payloads --------------------------------------------------------------------


def test_large_payload_round_trip_and_tamper() -> None:
    payload = os.urandom(4096)
    raw = seal_large(ALICE, DOMAIN, b"hdr", payload, clock=HybridClock(max_drift_s=2.0), now=T0)
    v = verifier()
    with pytest.raises(InvalidSignature, match="payload digest does not match the signed envelope"):
        v.open_large(raw, payload[:-1] + b"\0", domain=DOMAIN, now=T0, is_known=known)
    with pytest.raises(InvalidSignature, match="payload: expected 4096 bytes, got 10"):
        v.open_large(raw, payload[:10], domain=DOMAIN, now=T0, is_known=known)
    env, large = v.open_large(raw, payload, domain=DOMAIN, now=T0, is_known=known)  # not replayed
    assert (large.header, large.payload_digest, env.sender) == (
        b"hdr",
        digest(payload),
        ALICE.node_id,
    )


def test_digest_is_blake2b_256() -> None:
    assert digest(b"").hex().startswith("0e5751c026e543b2e8ab2eb06099daa1")


# --- record round trips ----------------------------------------------------------------


envelopes = st.builds(
    Envelope,
    version=st.just(1),
    domain=st.from_regex(r"[a-z0-9][a-z0-9/._-]{0,20}", fullmatch=True),
    sender=st.binary(min_size=32, max_size=32),
    hlc=st.integers(0, 2**63 - 1),
    nonce=st.binary(min_size=16, max_size=16),
    body=st.binary(max_size=64),
)


@FAST
@given(
    envelopes, st.binary(min_size=64, max_size=64), st.binary(max_size=32), st.integers(0, 2**40)
)
def test_identity_records_round_trip(env: Envelope, sig: bytes, header: bytes, n: int) -> None:
    assert decode(encode(env), Envelope) == env
    signed = SignedEnvelope(encode(env), sig)
    assert decode(encode(signed), SignedEnvelope) == signed
    large = LargeBody(header, digest(header), n)
    assert decode(encode(large), LargeBody) == large


# --- keys ------------------------------------------------------------------------------


def test_key_save_load_0600_and_refuse_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    ALICE.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert NodeKey.load(path).node_id == ALICE.node_id
    with pytest.raises(KeyFileExists, match="already exists; refusing to overwrite"):
        MALLORY.save(path)
    assert NodeKey.load(path).node_id == ALICE.node_id
    MALLORY.save(path, force=True)
    assert NodeKey.load(path).node_id == MALLORY.node_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temp files left


def test_key_load_refuses_group_readable(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    ALICE.save(path)
    path.chmod(0o640)
    with pytest.raises(InsecureKeyFile, match="has mode 0640, expected 0600"):
        NodeKey.load(path)


def test_key_load_refuses_wrong_size_and_format(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    ALICE.save(path)
    data = path.read_bytes()
    path.write_bytes(data + b"x")
    with pytest.raises(KeyFileError, match=f"expected {len(data)} bytes, got {len(data) + 1}"):
        NodeKey.load(path)
    path.write_bytes(b"X" + data[1:])
    with pytest.raises(KeyFileError, match="not a nexus Ed25519 key file"):
        NodeKey.load(path)


def test_key_repr_hides_seed() -> None:
    text = repr(ALICE)
    assert text == f"NodeKey(node_id={short_id(ALICE.node_id)})"
    assert ALICE.seed.hex() not in text
    assert "aaaa" not in text


def test_verify_signature_maps_bad_lengths() -> None:
    sig = ALICE.sign(b"m")
    verify_signature(ALICE.node_id, b"m", sig)
    with pytest.raises(InvalidSignature, match="signer id: expected 32 bytes, got 5"):
        verify_signature(b"short", b"m", sig)
    with pytest.raises(InvalidSignature, match="signature: expected 64 bytes, got 63"):
        verify_signature(ALICE.node_id, b"m", sig[:63])
    with pytest.raises(InvalidSignature, match="does not verify"):
        verify_signature(MALLORY.node_id, b"m", sig)


# --- encryption ------------------------------------------------------------------------


def test_mesh_secret() -> None:
    secret = MeshSecret.generate()
    assert secret.decrypt(secret.encrypt(b"gossip")) == b"gossip"
    assert MeshSecret.from_bytes(secret.raw).decrypt(secret.encrypt(b"x")) == b"x"
    with pytest.raises(DecryptionFailed, match="does not authenticate"):
        MeshSecret.generate().decrypt(secret.encrypt(b"gossip"))
    with pytest.raises(DecryptionFailed, match="expected at least 40 bytes, got 3"):
        secret.decrypt(b"abc")
    assert secret.raw.hex() not in repr(secret)


def test_sealed_box_to_node() -> None:
    box = seal_to(ALICE.node_id, b"mesh secret")
    assert open_sealed(ALICE, box) == b"mesh secret"
    with pytest.raises(DecryptionFailed, match="does not open with our key"):
        open_sealed(MALLORY, box)


def test_check_payload_alone() -> None:
    data = b"tensor bytes"
    verifier().check_payload(digest(data), data)
    with pytest.raises(InvalidSignature, match="payload digest does not match"):
        verifier().check_payload(digest(data), data + b"!")
