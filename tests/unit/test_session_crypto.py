"""Session crypto of direct channels: X25519 exchange, key derivation, counter-nonce AEAD."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import DecryptionFailed, MalformedMessage
from mesh.identity import (
    AEAD_TAG_BYTES,
    EphemeralKey,
    SessionCipher,
    derive_session_keys,
)

FAST = settings(max_examples=30, deadline=None)
KEY = bytes(range(32))


def pair(key: bytes = KEY) -> tuple[SessionCipher, SessionCipher]:
    return SessionCipher(key), SessionCipher(key)


def test_both_sides_agree_on_the_shared_secret() -> None:
    a, b = EphemeralKey.generate(), EphemeralKey.generate()
    assert a.exchange(b.public) == b.exchange(a.public)
    assert len(a.public) == 32
    assert a.exchange(b.public) != a.exchange(EphemeralKey.generate().public)


@pytest.mark.parametrize(
    ("peer", "match"),
    [(b"\0" * 32, "low-order"), (b"\x01" + b"\0" * 31, "low-order"), (b"\x09" * 31, "32 bytes")],
)
def test_bad_peer_keys_are_refused(peer: bytes, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        EphemeralKey.generate().exchange(peer)


def test_session_keys_are_directional_and_bound_to_the_transcript() -> None:
    shared = b"s" * 32
    i2r, r2i = derive_session_keys(shared, b"transcript")
    assert len(i2r) == len(r2i) == 32 and i2r != r2i
    assert derive_session_keys(shared, b"transcript") == (i2r, r2i)
    assert derive_session_keys(shared, b"transcripT") != (i2r, r2i)
    assert derive_session_keys(b"t" * 32, b"transcript") != (i2r, r2i)
    with pytest.raises(ValueError, match="expected 32 bytes, got 3"):
        derive_session_keys(b"abc", b"transcript")


@FAST
@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_frames_round_trip_in_order(frames: list[bytes]) -> None:
    tx, rx = pair()
    sealed = [tx.seal(f) for f in frames]
    assert [len(s) for s in sealed] == [len(f) + AEAD_TAG_BYTES for f in frames]
    assert [rx.open(s) for s in sealed] == frames
    assert tx.counter == rx.counter == len(frames)


def test_the_same_plaintext_never_gives_the_same_ciphertext() -> None:
    tx, _ = pair()
    assert tx.seal(b"same") != tx.seal(b"same")  # the counter nonce moved on


def test_replayed_frame_fails() -> None:
    tx, rx = pair()
    first = tx.seal(b"one")
    assert rx.open(first) == b"one"
    with pytest.raises(DecryptionFailed, match=r"frame 1 .* does not authenticate"):
        rx.open(first)


def test_reordered_or_dropped_frame_fails_and_does_not_advance() -> None:
    tx, rx = pair()
    first, second = tx.seal(b"one"), tx.seal(b"two")
    with pytest.raises(DecryptionFailed, match="out of order"):
        rx.open(second)
    assert rx.counter == 0
    assert rx.open(first) == b"one"  # the failure changed nothing (the channel closes anyway)


@FAST
@given(st.binary(min_size=1, max_size=256), st.data())
def test_any_flipped_bit_fails(plaintext: bytes, data: st.DataObject) -> None:
    tx, rx = pair()
    sealed = bytearray(tx.seal(plaintext))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailed):
        rx.open(bytes(sealed))


def test_wrong_key_and_short_frames_fail() -> None:
    tx, _ = pair()
    with pytest.raises(DecryptionFailed, match="does not authenticate"):
        SessionCipher(b"k" * 32).open(tx.seal(b"secret"))
    with pytest.raises(DecryptionFailed, match="expected at least 16 bytes, got 5"):
        SessionCipher(KEY).open(b"short")


def test_key_length_is_checked_and_nothing_secret_is_shown() -> None:
    with pytest.raises(ValueError, match="expected 32 bytes, got 31"):
        SessionCipher(b"k" * 31)
    assert repr(SessionCipher(KEY)) == "SessionCipher(counter=0)"
    eph = EphemeralKey.generate()
    assert eph.public[:4].hex() in repr(eph) and "PrivateKey" not in repr(eph)
