"""Fuzzing the envelope verifier (`mesh.identity.EnvelopeVerifier`) as a state machine.

What it shows: against a sequence of genuine messages, replays, byte-mutated copies of
accepted messages, forgeries (another key, another domain, unknown sender, clock far ahead
or behind, oversize body) and large payloads with tampered bytes, interleaved with time
passing, the verifier

- accepts every genuine fresh message exactly once;
- refuses everything else with a `PeerProtocolError` subclass (the reason), never another
  exception;
- leaves its state (the replay cache, its horizon, the clock) exactly as it was after
  every refusal.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from mesh.errors import (
    FutureMessage,
    InvalidSignature,
    OversizeMessage,
    PeerProtocolError,
    ReplayedMessage,
    StaleMessage,
    UnknownSender,
    WrongDomain,
)
from mesh.hlc import HybridClock
from mesh.identity import Envelope, EnvelopeVerifier, NodeKey, SignedEnvelope, seal, seal_large
from mesh.identity.envelope import _signed_message
from mesh.wire import decode, encode

from .conftest import Tally

DOMAIN = "nexus/state/1"
OTHER_DOMAIN = "nexus/act/1"
T0 = 1_800_000_000.0
WINDOW_S = 30.0
DRIFT_S = 2.0
MAX_BODY = 2048
CAPACITY = 12  # small, so the replay cache fills and its horizon moves
ALICE, BOB = NodeKey.from_seed(b"a" * 32), NodeKey.from_seed(b"b" * 32)
MALLORY = NodeKey.from_seed(b"m" * 32)  # not a member
MEMBERS = frozenset({ALICE.node_id, BOB.node_id})

CI_STEPS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LONG_STEPS = settings(CI_STEPS, max_examples=1500, stateful_step_count=80)
BUDGETS = [
    pytest.param(CI_STEPS, id="ci"),
    pytest.param(LONG_STEPS, id="long", marks=pytest.mark.slow),
]


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete", "swap"]), label="op")
        at = data.draw(st.integers(0, max(0, len(buf) - 1)), label="at")
        if op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 8), label="deleted")]
        elif op == "swap" and len(buf) > 1:
            other = data.draw(st.integers(0, len(buf) - 1), label="other")
            buf[at], buf[other] = buf[other], buf[at]
    return bytes(buf)


class VerifierMachine(RuleBasedStateMachine):
    """One verifier; senders with their own clocks; a model of what was accepted."""

    tally: Tally  # set by the test before running

    accepted = Bundle("accepted")

    def __init__(self) -> None:
        super().__init__()
        self.clock = HybridClock(max_drift_s=DRIFT_S)
        self.verifier = EnvelopeVerifier(
            clock=self.clock, window_s=WINDOW_S, max_body_bytes=MAX_BODY, replay_capacity=CAPACITY
        )
        self.now = T0
        self.sender_clocks = {
            k.node_id: HybridClock(max_drift_s=DRIFT_S) for k in (ALICE, BOB, MALLORY)
        }
        self.seen: set[tuple[bytes, bytes]] = set()  # (sender, nonce) accepted so far

    # -- helpers --------------------------------------------------------------------------

    def snapshot(self) -> tuple[object, ...]:
        replay = self.verifier._replay
        return (self.clock.last, replay.floor, frozenset(replay._seen), sorted(replay._heap))

    def tick(self) -> None:
        self.now += 0.001  # every genuine message carries a wall time after all earlier ones

    def seal_from(
        self, key: NodeKey, body: bytes, *, domain: str = DOMAIN, at: float | None = None
    ) -> bytes:
        return seal(
            key,
            domain,
            body,
            clock=self.sender_clocks[key.node_id],
            now=self.now if at is None else at,
        )

    def must_accept(self, raw: bytes) -> Envelope:
        self.tally.tried()
        env = self.verifier.open(raw, domain=DOMAIN, now=self.now, is_known=MEMBERS.__contains__)
        assert (env.sender, env.nonce) not in self.seen, "accepted the same nonce twice"
        self.seen.add((env.sender, env.nonce))
        self.tally.accepted()
        return env

    def must_refuse(
        self, raw: bytes, *expected: type[PeerProtocolError], payload: bytes | None = None
    ) -> None:
        """`raw` is refused with a PeerProtocolError (one of `expected` when given) and the
        verifier's state is unchanged."""
        self.tally.tried()
        before = self.snapshot()
        try:
            if payload is None:
                self.verifier.open(raw, domain=DOMAIN, now=self.now, is_known=MEMBERS.__contains__)
            else:
                self.verifier.open_large(
                    raw, payload, domain=DOMAIN, now=self.now, is_known=MEMBERS.__contains__
                )
        except PeerProtocolError as exc:
            refusal: PeerProtocolError | None = exc
        else:
            refusal = None
        assert refusal is not None, f"accepted what must be refused: {raw[:40]!r}"
        self.tally.refused(type(refusal).__name__)
        assert not expected or isinstance(refusal, expected), f"{refusal!r}, expected {expected}"
        assert self.snapshot() == before, "a refused message changed the verifier's state"

    # -- rules ----------------------------------------------------------------------------

    @rule(target=accepted, sender=st.sampled_from([ALICE, BOB]), body=st.binary(max_size=64))
    def genuine(self, sender: NodeKey, body: bytes) -> bytes:
        self.tick()
        raw = self.seal_from(sender, body)
        env = self.must_accept(raw)
        assert env.body == body and env.sender == sender.node_id
        return raw

    @rule(raw=accepted)
    def replay(self, raw: bytes) -> None:
        self.must_refuse(raw, ReplayedMessage, StaleMessage)

    @rule(raw=accepted, data=st.data())
    def mutated_copy(self, raw: bytes, data: st.DataObject) -> None:
        self.must_refuse(mutate(data, raw))

    @rule(raw=accepted, sig=st.binary(min_size=64, max_size=64))
    def resigned_garbage(self, raw: bytes, sig: bytes) -> None:
        signed = decode(raw, SignedEnvelope)
        self.must_refuse(encode(SignedEnvelope(signed.envelope, sig)), InvalidSignature)

    @rule(body=st.binary(max_size=32))
    def forged_by_mallory_as_alice(self, body: bytes) -> None:
        self.tick()
        env = Envelope(1, DOMAIN, ALICE.node_id, self.clock.last.pack() + 1, b"f" * 16, body)
        env_bytes = encode(env)
        sig = MALLORY.sign(_signed_message(DOMAIN, env_bytes))
        self.must_refuse(encode(SignedEnvelope(env_bytes, sig)), InvalidSignature)

    @rule(body=st.binary(max_size=32))
    def unknown_sender(self, body: bytes) -> None:
        self.tick()
        self.must_refuse(self.seal_from(MALLORY, body), UnknownSender)

    @rule(sender=st.sampled_from([ALICE, BOB]))
    def other_domain(self, sender: NodeKey) -> None:
        self.tick()
        self.must_refuse(self.seal_from(sender, b"x", domain=OTHER_DOMAIN), WrongDomain)

    @rule(sender=st.sampled_from([ALICE, BOB]), ahead_s=st.floats(DRIFT_S + 0.01, 1e6))
    def from_the_future(self, sender: NodeKey, ahead_s: float) -> None:
        clock = HybridClock(max_drift_s=DRIFT_S)  # a fresh clock: ours must not move ahead
        raw = seal(sender, DOMAIN, b"x", clock=clock, now=self.now + ahead_s)
        self.must_refuse(raw, FutureMessage)

    @rule(sender=st.sampled_from([ALICE, BOB]), behind_s=st.floats(WINDOW_S + 0.01, 1e6))
    def from_the_past(self, sender: NodeKey, behind_s: float) -> None:
        clock = HybridClock(max_drift_s=DRIFT_S)
        raw = seal(sender, DOMAIN, b"x", clock=clock, now=max(0.0, self.now - behind_s))
        self.must_refuse(raw, StaleMessage)

    @rule(sender=st.sampled_from([ALICE, BOB]), extra=st.integers(1, 4096))
    def oversize_body(self, sender: NodeKey, extra: int) -> None:
        self.tick()
        self.must_refuse(self.seal_from(sender, b"\0" * (MAX_BODY + extra)), OversizeMessage)

    @rule(
        sender=st.sampled_from([ALICE, BOB]),
        payload=st.binary(min_size=1, max_size=256),
        data=st.data(),
    )
    def large_payload(self, sender: NodeKey, payload: bytes, data: st.DataObject) -> None:
        """A tampered payload is refused and spends nothing; the genuine one then opens."""
        self.tick()
        raw = seal_large(
            sender, DOMAIN, b"hdr", payload, clock=self.sender_clocks[sender.node_id], now=self.now
        )
        tampered = mutate(data, payload)
        if tampered != payload:
            self.must_refuse(raw, InvalidSignature, payload=tampered)
        self.tally.tried()
        env, large = self.verifier.open_large(
            raw, payload, domain=DOMAIN, now=self.now, is_known=MEMBERS.__contains__
        )
        assert large.header == b"hdr" and (env.sender, env.nonce) not in self.seen
        self.seen.add((env.sender, env.nonce))
        self.tally.accepted()

    @rule(data=st.data())
    def garbage(self, data: st.DataObject) -> None:
        self.must_refuse(data.draw(st.binary(max_size=200), label="garbage"))

    @rule(seconds=st.floats(0.0, 2 * WINDOW_S))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def replay_cache_is_bounded(self) -> None:
        assert len(self.verifier._replay) <= CAPACITY


@pytest.mark.parametrize("budget", BUDGETS)
def test_verifier_refuses_all_but_genuine_fresh_messages(tally: Tally, budget: settings) -> None:
    VerifierMachine.tally = tally
    run_state_machine_as_test(VerifierMachine, settings=budget)
