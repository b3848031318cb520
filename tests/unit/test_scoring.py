"""Peer scores and bans, the token-bucket rate limiter, and host backoff."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from mesh.scoring import DEFAULT_WEIGHTS, Backoff, PeerScores, PeerStatus, RateLimiter
from mesh.wire import decode, encode

A = b"a" * 32
B = b"b" * 32
T0 = 1000.0


def scores(
    *,
    threshold: float = 100.0,
    ban_base_s: float = 60.0,
    ban_max_s: float = 600.0,
    decay_per_s: float = 1.0,
) -> PeerScores:
    return PeerScores(threshold, ban_base_s, ban_max_s, decay_per_s)


# --- PeerScores ------------------------------------------------------------------------


def test_ban_when_score_reaches_threshold() -> None:
    s = scores()
    assert s.penalise(A, "invalid_signature", now=T0) is None  # 50
    assert not s.is_banned(A, T0)
    with capture_logs() as logs:
        ban = s.penalise(A, "invalid_signature", now=T0)  # 100 >= 100
    assert ban is not None
    assert (ban.peer, ban.reason, ban.duration_s, ban.until, ban.ban_count) == (
        A,
        "invalid_signature",
        60.0,
        T0 + 60.0,
        1,
    )
    assert ban.score == pytest.approx(100.0)
    assert [e["event"] for e in logs] == ["peer_banned"]
    assert logs[0]["log_level"] == "warning"
    assert s.is_banned(A, T0 + 59.9)
    assert not s.is_banned(A, T0 + 60.0)
    assert s.ban_until(A) == T0 + 60.0
    assert not s.is_banned(B, T0) and s.ban_until(B) is None
    assert s.counters == {"invalid_signature": 2, "ban": 1}


def test_ban_durations_double_and_are_capped() -> None:
    s = scores(ban_base_s=60.0, ban_max_s=300.0)
    durations, now = [], T0
    for _ in range(5):
        ban = s.penalise(A, "misc", weight=100.0, now=now)
        assert ban is not None
        durations.append(ban.duration_s)
        now = ban.until + 1.0
    assert durations == [60.0, 120.0, 240.0, 300.0, 300.0]
    assert s.snapshot(now)[0].bans == 5


def test_penalties_while_banned_are_counted_but_do_not_extend_the_ban() -> None:
    s = scores()
    ban = s.penalise(A, "misc", weight=150.0, now=T0)
    assert ban is not None
    assert s.penalise(A, "malformed", now=T0 + 1) is None
    assert s.ban_until(A) == ban.until
    assert s.counters["malformed"] == 1
    assert s.score(A, T0 + 1) == 0.0  # the ban reset the score


def test_score_decays_linearly_and_a_slow_trickle_never_bans() -> None:
    s = scores(decay_per_s=1.0)
    s.penalise(A, "malformed", now=T0)  # 20
    assert s.score(A, T0 + 5) == pytest.approx(15.0)
    assert s.score(A, T0 + 100) == 0.0
    for i in range(50):  # 20 points every 30 s, 30 points decay in between
        assert s.penalise(B, "malformed", now=T0 + 30 * i) is None
    assert s.score(B, T0 + 30 * 49) == pytest.approx(20.0)


def test_time_going_backwards_never_increases_decay() -> None:
    s = scores()
    s.penalise(A, "invalid_signature", now=T0)
    assert s.score(A, T0 - 50) == pytest.approx(50.0)


def test_ban_history_is_forgiven_after_a_clean_max_ban_period() -> None:
    s = scores(ban_base_s=60.0, ban_max_s=600.0)
    first = s.penalise(A, "misc", weight=100.0, now=T0)
    assert first is not None
    second = s.penalise(A, "misc", weight=100.0, now=first.until + 10)
    assert second is not None and second.duration_s == 120.0
    third = s.penalise(A, "misc", weight=100.0, now=second.until + 601)
    assert third is not None and third.duration_s == 60.0


def test_reward_and_reset_lower_the_score_but_keep_the_ban() -> None:
    s = scores(decay_per_s=0.0)
    s.penalise(A, "bad_output", now=T0)  # 40
    s.reward(A, 15.0, now=T0)
    assert s.score(A, T0) == pytest.approx(25.0)
    s.reward(A, 100.0, now=T0)
    assert s.score(A, T0) == 0.0
    s.penalise(A, "misc", weight=120.0, now=T0)
    s.reset(A)
    assert s.is_banned(A, T0 + 1)


def test_unknown_reason_needs_an_explicit_weight() -> None:
    s = scores()
    with pytest.raises(ValueError, match="penalty reason 'weird' has no default weight"):
        s.penalise(A, "weird", now=T0)
    with pytest.raises(ValueError, match=r"weight: expected a number > 0, got -1"):
        s.penalise(A, "malformed", -1, now=T0)
    assert s.penalise(A, "weird", 10.0, now=T0) is None
    assert s.counters == {"weird": 1}


def test_snapshot_lists_banned_first_then_by_score_and_encodes() -> None:
    s = scores(decay_per_s=0.0)
    s.penalise(A, "timeout", now=T0)
    s.penalise(B, "misc", weight=100.0, now=T0)
    c = b"c" * 32
    s.penalise(c, "replay", now=T0)
    rows = s.snapshot(T0 + 1)
    assert [r.peer for r in rows] == [B, c, A]
    assert rows[0].banned_until == T0 + 60.0 and rows[1].banned_until is None
    assert decode(encode(rows[1]), PeerStatus) == rows[1]


def test_prune_forgets_only_peers_with_nothing_to_remember() -> None:
    s = scores(decay_per_s=1.0, ban_max_s=100.0)
    s.penalise(A, "timeout", now=T0)
    s.penalise(B, "misc", weight=100.0, now=T0)
    assert s.prune(T0 + 10) == 1  # A decayed to 0; B is banned
    assert s.prune(T0 + 60 + 100) == 0  # B's ban history is kept for ban_max_s
    assert s.prune(T0 + 60 + 101) == 1
    assert s.snapshot(T0 + 200) == ()


def test_default_weights_and_constructor_checks() -> None:
    assert DEFAULT_WEIGHTS["invalid_signature"] > DEFAULT_WEIGHTS["timeout"]
    with pytest.raises(ValueError, match=r"ban_max_s: expected >= ban_base_s \(60.0\), got 10"):
        PeerScores(100.0, 60.0, 10.0, 1.0)
    with pytest.raises(ValueError, match="threshold: expected a number > 0, got 0"):
        PeerScores(0, 60.0, 600.0, 1.0)
    with pytest.raises(ValueError, match="decay_per_s: expected a finite number >= 0"):
        PeerScores(100, 60.0, 600.0, -1.0)


# --- RateLimiter -----------------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3)
    assert [rl.allow(A, T0) for _ in range(4)] == [True, True, True, False]
    assert not rl.allow(A, T0 + 0.4)  # 0.8 tokens
    assert rl.allow(A, T0 + 0.5)  # 1.0 tokens
    assert not rl.allow(A, T0 + 0.5)
    assert rl.tokens(A, T0 + 100) == 3.0  # capped at burst
    assert rl.allow(B, T0)  # keys are independent


def test_rate_limiter_refused_attempts_take_nothing() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1)
    assert rl.allow(A, T0)
    for _ in range(10):
        assert not rl.allow(A, T0 + 0.5)
    assert rl.allow(A, T0 + 1.0)


def test_rate_limiter_cost_and_bounded_keys() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=5, max_keys=2)
    assert rl.allow(A, T0, cost=5)
    assert not rl.allow(A, T0, cost=0.5)
    rl.allow(B, T0)
    rl.allow(b"c" * 32, T0)
    assert len(rl) == 2
    assert rl.tokens(A, T0) == 5.0  # A (least recently used) was evicted
    assert "keys=2/2" in repr(rl)
    with pytest.raises(ValueError, match="burst: expected a number > 0"):
        RateLimiter(1.0, 0)


# --- Backoff ---------------------------------------------------------------------------


def test_backoff_doubles_per_failure_caps_and_resets() -> None:
    bo = Backoff(base_s=15.0, max_s=100.0)
    assert [bo.failed(A, T0) for _ in range(5)] == [15.0, 30.0, 60.0, 100.0, 100.0]
    assert bo.failures(A) == 5
    assert bo.penalty_s(A, T0 + 99) == 100.0
    assert bo.penalty_s(A, T0 + 100) == 0.0  # ran out, failures remembered
    assert bo.failed(A, T0 + 200) == 100.0
    bo.succeeded(A)
    assert bo.failures(A) == 0 and bo.penalty_s(A, T0 + 200) == 0.0
    assert bo.failed(A, T0 + 300) == 15.0


def test_backoff_blocked_set_and_prune() -> None:
    bo = Backoff()
    bo.failed(A, T0)
    bo.failed(B, T0 + 10)
    assert bo.blocked(T0 + 20) == {B}
    assert bo.blocked_until(A) == T0 + 15.0 and bo.blocked_until(b"c" * 32) is None
    assert bo.prune(T0 + 15 + 901) == 1
    assert bo.failures(A) == 0 and bo.failures(B) == 1
