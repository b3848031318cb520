"""StateStore: WAL, schema version, round trip through MeshState.apply, crash safety."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mesh.errors import StateStoreError
from mesh.state import MeshState, SignedEntry
from mesh.store import FILENAME, SCHEMA_VERSION, StateStore
from mesh.wire import encode
from tests.unit.test_state import (
    FOUNDER,
    M1,
    M2,
    NOW_MS,
    advert,
    based,
    cert,
    fresh,
    hlc,
    load,
    model,
    revoke,
)


def rich_state() -> MeshState:
    state = based()
    state.apply(
        [
            cert(FOUNDER, M2, hlc(100)),
            load(M2, hlc(300)),
            model(FOUNDER, "x", hlc(300)),
            advert(M2, hlc(300), 5_000),
        ],
        NOW_MS,
    )
    return state


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    with StateStore.open(tmp_path) as store:
        assert store.journal_mode() == "wal"
        assert store.path == tmp_path / FILENAME
    conn = sqlite3.connect(tmp_path / FILENAME)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_round_trip_gives_an_identical_state(tmp_path: Path) -> None:
    state = rich_state()
    with StateStore.open(tmp_path) as store:
        assert store.save(state.entries()) == len(state.entries())
        assert store.save(state.entries()) == 0, "save is not idempotent"
    restored = fresh()
    with StateStore.open(tmp_path) as store:
        accepted = store.restore(restored, NOW_MS)
    assert restored == state and restored.fingerprint() == state.fingerprint()
    assert set(accepted) == set(state.entries())


def test_save_keeps_only_the_newest_lww_row(tmp_path: Path) -> None:
    old, new = advert(M1, hlc(200), 5_000), advert(M1, hlc(300), 6_000)
    with StateStore.open(tmp_path) as store:
        store.save([old, new])
        assert store.save([old]) == 0, "an older row came back"
        assert [e for e in store.load() if e.slot == new.slot] == [new]


def test_compact_drops_what_the_state_no_longer_holds(tmp_path: Path) -> None:
    state = rich_state()
    with StateStore.open(tmp_path) as store:
        store.save(state.entries())
        state.apply([revoke(FOUNDER, M2, hlc(400))], NOW_MS)
        state.prune(5_000)  # M1's advert lease ends
        store.save([revoke(FOUNDER, M2, hlc(400))])
        assert store.compact(state) == 3  # M2's advert and load, M1's advert
        assert set(store.load()) == set(state.entries())


def test_failed_transaction_leaves_the_store_unchanged(tmp_path: Path) -> None:
    with StateStore.open(tmp_path) as store:
        store.save([cert(FOUNDER, M1, hlc(100))])
        with pytest.raises(AttributeError):
            store.save([cert(FOUNDER, M2, hlc(100)), "not an entry"])  # type: ignore[list-item]
        assert store.load() == [cert(FOUNDER, M1, hlc(100))]


def test_restore_re_verifies_and_skips_bad_rows(tmp_path: Path) -> None:
    good = cert(FOUNDER, M1, hlc(100))
    forged = SignedEntry(good.slot, good.author, good.hlc + 1, good.payload, good.signature)
    with StateStore.open(tmp_path) as store:
        store.save([good, forged])
        with store._transaction() as conn:  # a torn / corrupt row
            conn.execute(
                "INSERT INTO entries VALUES (?, 1, ?, ?, 0, ?)",
                (b"x" * 32, b"k", b"a", b"\x93garbage"),
            )
        state = fresh()
        with capture_logs() as logs:
            assert store.restore(state, NOW_MS) == [good]
    events = {(e["event"], e.get("error")) for e in logs}
    assert ("state_entry_rejected", "InvalidSignature") in events
    assert ("state_store_row_corrupt", None) in events


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    StateStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / FILENAME)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(StateStoreError, match=r"expected schema version 1, got \[99\]"):
        StateStore.open(tmp_path)


def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StateStoreError, match=r"cannot open"):
        StateStore(tmp_path / "missing-dir" / FILENAME)


def test_entries_are_stored_as_their_wire_encoding(tmp_path: Path) -> None:
    e = cert(FOUNDER, M1, hlc(100))
    with StateStore.open(tmp_path) as store:
        store.save([e])
    conn = sqlite3.connect(tmp_path / FILENAME)
    assert conn.execute("SELECT body FROM entries").fetchall() == [(encode(e),)]
    conn.close()
