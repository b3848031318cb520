"""Misbehaviour scores and bans, token-bucket rate limits, and failure backoff.

Owns small sans-IO machines the async shell feeds with `now` (seconds, float):
`PeerScores` ("intrusion detection", docs/architecture.md §2): each protocol violation adds a weight
to the peer's score, the score decays linearly, and a peer whose score reaches the
threshold is banned for `ban_base_s * 2**previous_bans`, capped at `ban_max_s`.
`RateLimiter`: one token bucket per key (a remote peer, or a global key).
`Backoff`: routing penalty for a host that failed a request, doubling per consecutive
failure and cleared by one success (Petals' `Blacklist`, 15 s base).
`StreamSlots`: concurrent inbound streams per (peer, protocol) and for all non-members.

Rule 1: no clock reads and no I/O here; every method that depends on time takes `now`.
A `now` earlier than a stored time counts as no time passing (never negative decay).
Rule 2: memory is bounded: `RateLimiter` holds at most `max_keys` buckets, and
`PeerScores.prune` / `Backoff.prune` drop entries that carry no information any more.
Rule 3: a ban is a fact to log and count: `penalise` returns a `BanDecision` exactly once
per ban and logs it at WARNING; the shell acts on it (disconnects the peer).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import structlog

from mesh.identity import short_id
from mesh.wire import record

log = structlog.get_logger(__name__)

# Default weight per reason. With the default threshold (100) one forged signature is
# half a ban, a malformed frame a fifth; timeouts are cheap because honest hosts on
# bad links time out too (they go through `Backoff` for routing instead).
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "invalid_signature": 50.0,
    "forbidden_write": 50.0,
    "bad_output": 40.0,  # wrong shape / NaN activations from a host
    "bad_weights": 40.0,  # a file that does not match its digest (a model's weights)
    "wrong_output": 34.0,  # plausible activations a spot check proved wrong: banned at the 3rd
    "replay": 30.0,
    "join_forged": 30.0,
    "malformed": 20.0,
    "oversize": 20.0,
    "wrong_mesh": 20.0,
    "future": 10.0,
    "stale": 5.0,
    "timeout": 5.0,
    "unreachable": 5.0,  # a host whose exec stream broke or could not be opened
    "rate_limited": 2.0,
}


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"now: expected finite seconds, got {now!r}")


@dataclass(frozen=True, slots=True)
class BanDecision:
    """A peer just crossed the threshold: ban it until `until` (seconds, the caller's clock).

    Attributes:
        peer: node id of the banned peer.
        reason: the reason of the penalty that crossed the threshold.
        until: end of the ban.
        duration_s: length of this ban.
        score: the score when the threshold was crossed.
        ban_count: how many bans this peer has had, this one included.
    """

    peer: bytes
    reason: str
    until: float
    duration_s: float
    score: float
    ban_count: int


@record("peer.score")
@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One row of `PeerScores.snapshot`, for the status API (a wire record).

    Attributes:
        peer: node id.
        score: current (decayed) score.
        banned_until: end of the current ban, or None when not banned.
        bans: bans so far (drives the next ban's length).
    """

    peer: bytes
    score: float
    banned_until: float | None
    bans: int

    def __post_init__(self) -> None:
        if self.score < 0 or self.bans < 0:
            raise ValueError(
                f"peer status: expected score and bans >= 0, got {self.score}, {self.bans}"
            )


class _Peer:
    __slots__ = ("at", "banned_until", "bans", "score")

    def __init__(self, at: float) -> None:
        self.score = 0.0
        self.at = at  # time `score` was last brought up to date
        self.bans = 0
        self.banned_until: float | None = None

    def decay(self, now: float, per_s: float) -> float:
        self.score = max(0.0, self.score - per_s * max(0.0, now - self.at))
        self.at = max(self.at, now)
        return self.score


class PeerScores:
    """Per-peer misbehaviour score with exponentially growing bans.

    Args:
        threshold: score at which a peer is banned.
        ban_base_s: length of a first ban.
        ban_max_s: cap on any ban; also how long after its last ban ends a peer keeps
            its ban history (then the next ban is short again).
        decay_per_s: score points forgiven per second.
        weights: default weight per reason (see `DEFAULT_WEIGHTS`).

    Attributes:
        counters: penalties counted by reason, plus "ban" for bans decided.
    """

    def __init__(
        self,
        threshold: float = 100.0,
        ban_base_s: float = 60.0,
        ban_max_s: float = 86400.0,
        decay_per_s: float = 0.5,
        *,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    ) -> None:
        _check_positive("threshold", threshold)
        _check_positive("ban_base_s", ban_base_s)
        _check_positive("ban_max_s", ban_max_s)
        if ban_max_s < ban_base_s:
            raise ValueError(f"ban_max_s: expected >= ban_base_s ({ban_base_s}), got {ban_max_s}")
        if not (math.isfinite(decay_per_s) and decay_per_s >= 0):
            raise ValueError(f"decay_per_s: expected a finite number >= 0, got {decay_per_s!r}")
        for reason, weight in weights.items():
            _check_positive(f"weights[{reason!r}]", weight)
        self.threshold = float(threshold)
        self.ban_base_s = float(ban_base_s)
        self.ban_max_s = float(ban_max_s)
        self.decay_per_s = float(decay_per_s)
        self.weights = dict(weights)
        self.counters: dict[str, int] = {}
        self._peers: dict[bytes, _Peer] = {}

    def penalise(
        self, peer: bytes, reason: str, weight: float | None = None, *, now: float
    ) -> BanDecision | None:
        """Count a violation by `peer`; ban it if its score reaches the threshold.

        A peer already banned is counted but not re-banned (its score does not grow
        while banned: the ban is the response).

        Args:
            peer: node id of the offender.
            reason: short snake_case name, e.g. "invalid_signature".
            weight: score to add; None uses `weights[reason]`.
            now: current time in seconds.

        Returns:
            The ban decided by this call, or None.

        Raises:
            ValueError: unknown reason without an explicit weight, or a weight <= 0.
        """
        _check_now(now)
        if weight is None:
            if reason not in self.weights:
                raise ValueError(
                    f"penalty reason {reason!r} has no default weight "
                    f"(known: {sorted(self.weights)}); pass weight="
                )
            weight = self.weights[reason]
        _check_positive("weight", weight)
        self.counters[reason] = self.counters.get(reason, 0) + 1
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(now)
        if self._banned(state, now):
            return None
        score = state.decay(now, self.decay_per_s) + weight
        state.score = score
        if score < self.threshold:
            log.debug("peer_penalised", peer=short_id(peer), reason=reason, score=score)
            return None
        return self._ban(peer, state, reason, score, now)

    def _ban(self, peer: bytes, state: _Peer, reason: str, score: float, now: float) -> BanDecision:
        if state.banned_until is not None and now - state.banned_until > self.ban_max_s:
            state.bans = 0  # well behaved for a whole max-ban period: history forgiven
        duration = min(self.ban_base_s * 2.0 ** min(state.bans, 64), self.ban_max_s)
        state.bans += 1
        state.banned_until = now + duration
        state.score = 0.0
        self.counters["ban"] = self.counters.get("ban", 0) + 1
        log.warning(
            "peer_banned",
            peer=short_id(peer),
            reason=reason,
            score=score,
            duration_s=duration,
            bans=state.bans,
        )
        return BanDecision(peer, reason, state.banned_until, duration, score, state.bans)

    @staticmethod
    def _banned(state: _Peer, now: float) -> bool:
        return state.banned_until is not None and now < state.banned_until

    def is_banned(self, peer: bytes, now: float) -> bool:
        """True while `peer` is serving a ban."""
        state = self._peers.get(peer)
        return state is not None and self._banned(state, now)

    def ban_until(self, peer: bytes) -> float | None:
        """End of the peer's latest ban (possibly in the past), or None if never banned."""
        state = self._peers.get(peer)
        return None if state is None else state.banned_until

    def score(self, peer: bytes, now: float) -> float:
        """The peer's current, decayed score (0 for a peer never penalised)."""
        state = self._peers.get(peer)
        return 0.0 if state is None else state.decay(now, self.decay_per_s)

    def reward(self, peer: bytes, amount: float, *, now: float) -> None:
        """Lower the peer's score by `amount` after useful work (never below 0)."""
        _check_positive("amount", amount)
        state = self._peers.get(peer)
        if state is not None:
            state.score = max(0.0, state.decay(now, self.decay_per_s) - amount)

    def reset(self, peer: bytes) -> None:
        """Clear the peer's score. Ban history and any ban in progress are kept."""
        state = self._peers.get(peer)
        if state is not None:
            state.score = 0.0

    def prune(self, now: float) -> int:
        """Forget peers with no score, no ban in progress and no ban history to keep.

        Returns:
            How many peers were forgotten.
        """
        drop = [
            peer
            for peer, s in self._peers.items()
            if s.decay(now, self.decay_per_s) == 0.0
            and not self._banned(s, now)
            and (s.banned_until is None or now - s.banned_until > self.ban_max_s)
        ]
        for peer in drop:
            del self._peers[peer]
        return len(drop)

    def snapshot(self, now: float) -> tuple[PeerStatus, ...]:
        """Status rows for every tracked peer, highest score first (banned ones first)."""
        rows = [
            PeerStatus(
                peer,
                s.decay(now, self.decay_per_s),
                s.banned_until if self._banned(s, now) else None,
                s.bans,
            )
            for peer, s in self._peers.items()
        ]
        rows.sort(key=lambda r: (r.banned_until is None, -r.score, r.peer))
        return tuple(rows)

    def __repr__(self) -> str:
        return (
            f"PeerScores(threshold={self.threshold}, ban_base_s={self.ban_base_s}, "
            f"ban_max_s={self.ban_max_s}, decay_per_s={self.decay_per_s}, "
            f"peers={len(self._peers)}, bans={self.counters.get('ban', 0)})"
        )


class RateLimiter:
    """Token bucket per key: `rate_per_s` tokens per second, at most `burst` stored.

    A new key starts with a full bucket. Buckets are kept in least-recently-used order;
    past `max_keys` the stalest is evicted (a full bucket loses nothing by eviction; a
    drained one is forgiven, so pair a per-peer limiter with a global key when keys are
    cheap for an attacker).

    Args:
        rate_per_s: refill rate.
        burst: bucket size (the most requests allowed at once).
        max_keys: buckets kept.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 10_000) -> None:
        _check_positive("rate_per_s", rate_per_s)
        _check_positive("burst", burst)
        if max_keys < 1:
            raise ValueError(f"max_keys: expected >= 1, got {max_keys}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket if it has them.

        Returns:
            True if allowed (tokens taken), False if the bucket is short (nothing taken).
        """
        _check_now(now)
        _check_positive("cost", cost)
        tokens = self.tokens(key, now)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def tokens(self, key: Hashable, now: float) -> float:
        """Tokens available to `key` at `now` (read only)."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + self.rate_per_s * max(0.0, now - at))

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(rate_per_s={self.rate_per_s}, burst={self.burst}, "
            f"keys={len(self._buckets)}/{self.max_keys})"
        )


class Backoff:
    """Penalty for hosts that failed requests: `base_s * 2**(failures-1)`, capped.

    Used by the router (`HostSpan.penalty_s`) and for retry decisions. One success
    clears the host.

    Args:
        base_s: penalty after one failure (Petals uses 15 s).
        max_s: cap on the penalty.
    """

    def __init__(self, base_s: float = 15.0, max_s: float = 900.0) -> None:
        _check_positive("base_s", base_s)
        _check_positive("max_s", max_s)
        if max_s < base_s:
            raise ValueError(f"max_s: expected >= base_s ({base_s}), got {max_s}")
        self.base_s = float(base_s)
        self.max_s = float(max_s)
        self._hosts: dict[bytes, tuple[int, float, float]] = {}  # (failures, penalty, until)

    def failed(self, host: bytes, now: float) -> float:
        """Record a failure of `host`; return the length of its new penalty (seconds)."""
        _check_now(now)
        failures = self._hosts.get(host, (0, 0.0, now))[0] + 1
        penalty = min(self.base_s * 2.0 ** min(failures - 1, 64), self.max_s)
        self._hosts[host] = (failures, penalty, now + penalty)
        log.debug("host_backoff", host=short_id(host), failures=failures, penalty_s=penalty)
        return penalty

    def succeeded(self, host: bytes) -> None:
        """Clear the host's failures and penalty."""
        self._hosts.pop(host, None)

    def penalty_s(self, host: bytes, now: float) -> float:
        """The host's current penalty (0.0 when healthy or its penalty has run out)."""
        entry = self._hosts.get(host)
        return entry[1] if entry is not None and now < entry[2] else 0.0

    def blocked_until(self, host: bytes) -> float | None:
        """End of the host's latest penalty (possibly past), or None if it has no failures."""
        entry = self._hosts.get(host)
        return None if entry is None else entry[2]

    def blocked(self, now: float) -> frozenset[bytes]:
        """Hosts whose penalty is still running (for `excluded` sets)."""
        return frozenset(h for h, (_, _, until) in self._hosts.items() if now < until)

    def failures(self, host: bytes) -> int:
        """Consecutive failures of `host` since its last success."""
        entry = self._hosts.get(host)
        return 0 if entry is None else entry[0]

    def prune(self, now: float) -> int:
        """Forget hosts whose penalty ended more than `max_s` ago. Returns how many."""
        drop = [h for h, (_, _, until) in self._hosts.items() if now - until > self.max_s]
        for host in drop:
            del self._hosts[host]
        return len(drop)

    def __repr__(self) -> str:
        return f"Backoff(base_s={self.base_s}, max_s={self.max_s}, hosts={len(self._hosts)})"


class StreamSlots:
    """Bounds on concurrent inbound streams: per (peer, protocol), and one shared pool for
    all non-members together (who can reach only the join protocol).

    Sans-IO: `acquire` says whether a new stream may be served (and takes its slot), and
    `release` gives the slot back when the handler ends.

    Args:
        per_peer: most streams one peer may have open at once on one protocol.
        strangers: most streams all non-members together may have open at once.
    """

    def __init__(self, per_peer: int, strangers: int) -> None:
        if per_peer < 1 or strangers < 1:
            raise ValueError(f"stream slots: expected >= 1, got {per_peer} and {strangers}")
        self.per_peer = per_peer
        self.strangers = strangers
        self._open: dict[tuple[bytes, str], int] = {}
        self._stranger_streams = 0

    def acquire(self, peer: bytes, protocol: str, *, member: bool) -> str | None:
        """Take a slot; return None, or the refusal reason ("too_many_streams",
        "too_many_stranger_streams") when the stream must not be served."""
        key = (peer, protocol)
        if self._open.get(key, 0) >= self.per_peer:
            return "too_many_streams"
        if not member and self._stranger_streams >= self.strangers:
            return "too_many_stranger_streams"
        self._open[key] = self._open.get(key, 0) + 1
        self._stranger_streams += 0 if member else 1
        return None

    def release(self, peer: bytes, protocol: str, *, member: bool) -> None:
        """Give back a slot taken by `acquire` (with the same `member`)."""
        key = (peer, protocol)
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
        self._stranger_streams -= 0 if member else 1

    def __repr__(self) -> str:
        return (
            f"StreamSlots(per_peer={self.per_peer}, strangers={self.strangers}, "
            f"open={sum(self._open.values())}, stranger_streams={self._stranger_streams})"
        )
