"""Checks beside the stream (exec/session.py Rule 7): a checked step is not held for its
check, a step counts as confirmed once its checks pass, and a lie found voids the steps
from the lying one on; the caller's rerun without the liar gives the honest outputs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

import nexusd.exec.session as session_module
from nexusd.api.records import GenerateRequest, TokenEvent
from nexusd.exec.session import MAX_BESIDE, CheckFailed, JobFailed, RoutedSession, StepInput
from nexusd.exec.verify import VerifyPolicy
from nexusd.metrics import Metrics

from .exec_fixtures import Cluster, Node
from .test_verify import (
    PROMPT,
    STEPS,
    MemView,
    assert_same_output,
    honest_logits,
    origin_engine,
    own_output,
    spans,
    tiny_registry,
    verified,
)


@pytest.fixture(autouse=True)
def uncapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap on the checks running beside a stream (the cap has its own test): how fast a
    judge answers here must not decide which steps' checks are held."""
    monkeypatch.setattr(session_module, "MAX_BESIDE", 1_000)


def beside(
    cl: Cluster,
    layout: list[tuple[int, int, list[bytes]]],
    outcomes: list[str],
    *,
    rerun: CheckFailed | None = None,
    policy: VerifyPolicy | None = None,
    **options: Any,
) -> RoutedSession:
    """A forward-mode session whose checks run in the cluster's nursery, beside its steps
    (`options`: further `RoutedSession` keywords)."""
    return verified(
        cl,
        layout,
        policy or VerifyPolicy(),
        outcomes,
        forward=True,
        spawn=cl.nursery.start_soon,
        rerun=rerun,
        **options,
    )


async def run(session: RoutedSession, confirmed: list[int]) -> list[torch.Tensor]:
    """Greedy decoding, then `settle`; `confirmed` gets the session's confirmed steps after
    each step and after settling."""
    await session.open()
    x, pos, logits = PROMPT, 0, []
    try:
        for _ in range(STEPS):
            out, _ = await session.step(StepInput(x, pos, True, b""))
            confirmed.append(session.confirmed)
            logits.append(out)
            pos += x.shape[1]
            x = out[:, -1:].argmax(-1)
        await session.settle()
        confirmed.append(session.confirmed)
    finally:
        await session.close()
    return logits


async def test_checks_beside_the_stream_hold_no_step_and_confirm_every_step() -> None:
    """Every step of both hosts checked (rate 1): every step still goes host to host (held
    checks send a checked step through the origin), each is confirmed no earlier than it
    is done, all are once settled, and the outputs are the honest ones."""
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        tail = Node("tail", spans([(3, 6)]))
        cl = Cluster(nursery, [head, tail], forward=True)
        outcomes: list[str] = []
        confirmed: list[int] = []
        layout = [(0, 3, [head.id]), (3, 6, [tail.id])]
        session = beside(cl, layout, outcomes, policy=VerifyPolicy(rate=1.0))
        logits = await run(session, confirmed)
        assert head.metrics.value("exec_forwarded_total") == STEPS
        assert outcomes == ["agreed"] * (2 * STEPS) and cl.penalties == []
        assert all(c <= step + 1 for step, c in enumerate(confirmed[:STEPS]))
        assert confirmed[-1] == STEPS
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("lie_from", [0, 3])
async def test_a_lie_found_beside_the_stream_voids_its_step_and_the_rerun_is_honest(
    lie_from: int,
) -> None:
    """The liar's output is used while its check runs; the lie found, the session fails the
    liar over (scored "wrong_output") and raises CheckFailed at its next step or when
    settling, naming the lying step; no step from it on was ever confirmed. A rerun that
    carries the exclusions over goes to the honest host and gives the honest outputs."""
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=lie_from))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good], forward=True)
        outcomes: list[str] = []
        layout = [(0, 3, [head.id]), (3, 6, [liar.id, good.id])]
        confirmed: list[int] = []
        session = beside(cl, layout, outcomes, policy=VerifyPolicy(rate=1.0, first_steps=0))
        with pytest.raises(CheckFailed) as caught:
            await run(session, confirmed)
        assert caught.value.step == lie_from
        assert all(c <= lie_from for c in confirmed)
        assert liar.id in caught.value.excluded and len(caught.value.failovers) == 1
        assert cl.penalties == [(liar.id, "wrong_output")]
        assert "wrong output on atoms [3,6)" in cl.failures[0][1]

        again = beside(cl, layout, outcomes, rerun=caught.value)
        logits = await run(again, [])
        assert [h.host for h in again.route] == [head.id, good.id]
        assert tuple(again.failovers) == caught.value.failovers and cl.penalties == [
            (liar.id, "wrong_output")
        ]
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


async def test_without_spawn_or_a_cache_a_check_holds_its_step() -> None:
    """Rule 7 needs both: a session without `spawn` (or without a KV cache) checks as Rule 4
    says, the checked step relayed through the origin and nothing left to settle."""
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        tail = Node("tail", spans([(3, 6)]))
        cl = Cluster(nursery, [head, tail], forward=True)
        outcomes: list[str] = []
        session = beside(cl, [(0, 3, [head.id]), (3, 6, [tail.id])], outcomes)
        session._spawn = None  # as a session built without `spawn`
        confirmed: list[int] = []
        await run(session, confirmed)
        assert confirmed == [*range(1, STEPS + 1), STEPS]
        assert outcomes == ["agreed", "agreed"]  # each host's first step, held
        assert head.metrics.value("exec_forwarded_total") == STEPS - 1
        nursery.cancel_scope.cancel()


# ---- the engine: tokens held until checked, a rerun emits none twice -------------------


class PromptTokenizer:
    """Stands in for the tiny model's tokenizer: the prompt is always PROMPT's ids."""

    def encode_prompt(self, text: str) -> list[int]:
        return PROMPT[0].tolist()

    def decode(self, ids: list[int], **_: object) -> str:
        return " ".join(f"t{i}" for i in ids)


async def test_the_engine_holds_tokens_until_checked_and_reruns_without_the_liar(
    tmp_path: Path,
) -> None:
    """The liar answers honestly once, then lies; every step is checked, beside the stream
    while fewer than MAX_BESIDE checks run (a later lie may be caught by a held check
    first: it is failed over once either way, and the void steps rerun).
    The engine emits no token before its step's checks pass; the lie voids the steps from
    it on, the job reruns without the liar, and the client sees each token once: the
    honest generation's, as the reply says."""
    registry = tiny_registry(tmp_path)
    registry.tokenizer = lambda model_id: PromptTokenizer()  # type: ignore[method-assign,assignment,return-value]
    want = [int(out[0, -1].argmax()) for out in await honest_logits()]
    async with trio.open_nursery() as nursery:
        origin = Node("origin", [])
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=1))
        good = Node("good", spans([(3, 6)]))
        view = MemView(nursery, origin, [(head, 0.002), (liar, 0.001), (good, 0.05)])
        metrics = Metrics()
        engine = origin_engine(
            view, origin, registry, metrics, policy=VerifyPolicy(rate=1.0), forward=True
        )
        events: list[object] = []

        async def emit(event: object) -> None:
            events.append(event)

        req = GenerateRequest(prompt="any", model="tiny", max_new_tokens=STEPS)
        reply = await engine.generate(req, "job-1", emit)
        assert list(reply.token_ids) == want
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == want
        assert view.reports == [(liar.id, "wrong_output")]
        assert len(reply.failovers) == 1 and "wrong output" in reply.failovers[0]
        assert {h.name for h in reply.route if h.start == 3} == {good.id.hex()[:8]}
        assert "jobs_reruns_total 1" in metrics.render()
        nursery.cancel_scope.cancel()


async def test_a_lie_that_exhausts_the_failover_budget_leaves_its_steps_unconfirmed() -> None:
    """No failover left: the lie fails the job (JobFailed, not a rerun), and the steps from
    the lying one on stay unconfirmed after it, so the engine releases none of them."""
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=2))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good], forward=True)
        layout = [(0, 3, [head.id]), (3, 6, [liar.id, good.id])]
        policy = VerifyPolicy(rate=1.0, first_steps=0)
        session = beside(cl, layout, [], policy=policy, max_failovers=0)
        with pytest.raises(JobFailed, match="gave up") as caught:
            await run(session, [])
        assert not isinstance(caught.value, CheckFailed)
        with contextlib.suppress(CheckFailed):  # a check beside it may find the lie again
            await session.settle()
        assert session.confirmed <= 2
        assert cl.penalties == [(liar.id, "wrong_output")]
        nursery.cancel_scope.cancel()


async def test_every_liar_is_failed_over_and_the_reruns_end_honest() -> None:
    """Two spans, a liar on each: every liar a failed check has found is failed over (once,
    however many of its steps were caught), and the reruns, each carrying the exclusions
    over, end on the honest hosts with the honest outputs."""
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 2)]))
        liar_a = Node("liar_a", spans([(2, 4)], lie_from=0))
        good_a = Node("good_a", spans([(2, 4)]))
        liar_b = Node("liar_b", spans([(4, 6)], lie_from=0))
        good_b = Node("good_b", spans([(4, 6)]))
        cl = Cluster(nursery, [head, liar_a, good_a, liar_b, good_b], forward=True)
        layout = [
            (0, 2, [head.id]),
            (2, 4, [liar_a.id, good_a.id]),
            (4, 6, [liar_b.id, good_b.id]),
        ]
        rerun: CheckFailed | None = None
        for _ in range(3):  # two liars: at most two reruns
            session = beside(cl, layout, [], rerun=rerun)
            try:
                logits = await run(session, [])
                break
            except CheckFailed as exc:
                rerun = exc
        assert [h.host for h in session.route] == [head.id, good_a.id, good_b.id]
        assert sorted(cl.penalties) == sorted(
            [(liar_a.id, "wrong_output"), (liar_b.id, "wrong_output")]
        )
        assert len(session.failovers) == 2
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


async def test_checks_beyond_the_cap_hold_their_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_BESIDE checks of a session run at once: while they wait for their judge,
    a further sampled step is checked held (Rule 4) and does not complete before it."""
    monkeypatch.setattr(session_module, "MAX_BESIDE", MAX_BESIDE)  # the shipped cap
    gate = trio.Event()
    held = trio.Event()  # a judge asked once more than the cap: a held step's check
    finished = trio.Event()
    calls: list[int] = []

    async def slow_judge(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) > MAX_BESIDE:
            held.set()
        await gate.wait()
        return await own_output(*args)

    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        tail = Node("tail", spans([(3, 6)]))
        cl = Cluster(nursery, [head, tail], forward=True)
        session = verified(
            cl,
            [(0, 3, [head.id]), (3, 6, [tail.id])],
            VerifyPolicy(rate=1.0),
            [],
            forward=True,
            arbiter=slow_judge,
            spawn=nursery.start_soon,
        )

        async def generation() -> None:
            await run(session, [])
            finished.set()

        nursery.start_soon(generation)
        with trio.fail_after(10):
            await held.wait()  # two steps' checks beside, then one held
        assert session._steps == MAX_BESIDE // 2 and session.confirmed == 0
        gate.set()
        with trio.fail_after(10):
            await finished.wait()
        assert session.confirmed == STEPS
        nursery.cancel_scope.cancel()
