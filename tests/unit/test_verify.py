"""Spot-check verification: the tolerance rule, the sampling, and a lying host caught."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from atoms.atom import ForwardContext
from atoms.model import Model, save_model
from atoms.span import Span
from mesh.errors import TransportBroken
from mesh.routing import HostSpan, Link
from mesh.scoring import PeerScores
from nexusd.config import ConfigError, ExecConfig, load_config
from nexusd.exec.hosting import SpanHost
from nexusd.exec.planner import ExecStream
from nexusd.exec.session import (
    Arbiter,
    CheckFailed,
    HopPlan,
    LocalHop,
    RoutedSession,
    StepInput,
    Verification,
)
from nexusd.exec.verify import VerifyPolicy, difference, last_tokens
from nexusd.exec.wire import HOST_INBOUND, ExecChannel
from nexusd.jobs.engine import JobEngine
from nexusd.metrics import Metrics
from nexusd.model_registry import ModelRegistry
from nexusd.node.daemon import verify_policy

from .exec_fixtures import Cluster, Node, stream_pair, tiny_llama
from .test_exec import reference_greedy

PROMPT = torch.tensor([[5, 17, 42, 8, 3]])
STEPS = 5


class LyingSpan(Span):
    """A span whose outputs are plausible but wrong (finite, right shape, +1e-2 noise),
    from its `lie_from`-th call on."""

    def __init__(self, atoms: list, lie_from: int = 0) -> None:  # type: ignore[type-arg]
        super().__init__(atoms)
        self.calls = 0
        self.lie_from = lie_from
        self.noise = torch.Generator().manual_seed(1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, *, check: bool = True) -> torch.Tensor:
        out = super().forward(x, ctx, check=check)
        self.calls += 1
        if self.calls > self.lie_from:
            out = out + 1e-2 * torch.randn(out.shape, generator=self.noise, dtype=out.dtype)
        return out


def spans(cuts: list[tuple[int, int]], *, lie_from: int | None = None) -> list[Span]:
    atoms = tiny_llama().atom_list()
    if lie_from is None:
        return [Span(atoms[s:e]) for s, e in cuts]
    return [LyingSpan(atoms[s:e], lie_from) for s, e in cuts]


async def own_output(
    start: int, end: int, inputs: list[StepInput], batch: int, max_len: int, last: bool = False
) -> torch.Tensor:
    """The origin's own computation (what the engine does from its model files)."""
    host = SpanHost(
        spans([(start, end)]),
        kv_budget_bytes=1 << 24,
        max_sessions=1,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
    )
    hop = LocalHop(HopPlan(b"origin", start, end), "tiny", host, b"origin")
    await hop.open(batch, max_len)
    try:
        outs = await hop.replay(0, inputs, per_step_s=0.0, last_only=last)
    finally:
        await hop.close()
    return outs[-1]


async def generate(session: RoutedSession) -> list[torch.Tensor]:
    """Greedy decoding; every step's logits."""
    await session.open()
    x, pos, logits = PROMPT, 0, []
    try:
        for _ in range(STEPS):
            out, _ = await session.step(StepInput(x, pos, True, b""))
            logits.append(out)
            pos += x.shape[1]
            x = out[:, -1:].argmax(-1)
    finally:
        await session.close()
    return logits


def verified(
    cl: Cluster,
    layout: list[tuple[int, int, list[bytes]]],
    policy: VerifyPolicy,
    outcomes: list[str],
    *,
    forward: bool = False,
    last_only: bool = False,
    arbiter: Arbiter = own_output,
    spawn: Callable[..., object] | None = None,
    rerun: CheckFailed | None = None,
    **options: Any,
) -> RoutedSession:
    """A checked session in `cl`; with `spawn`, its checks run beside the stream (session
    Rule 7), and `rerun` carries over a failed session's exclusions and failovers; `options`
    are further `RoutedSession` keywords (e.g. `max_failovers`)."""
    verify = Verification(
        policy=policy, arbiter=arbiter, rng=random.Random(0), on_check=outcomes.append
    )
    return RoutedSession(
        n_atoms=6,
        plan=cl.planner(layout),
        make_hop=cl.make_hop,
        report_failure=cl.report,
        batch=1,
        max_len=32,
        verify=verify,
        forward=forward,
        last_only=last_only,
        spawn=spawn,
        excluded=frozenset() if rerun is None else rerun.excluded,
        failovers=() if rerun is None else rerun.failovers,
        **options,
    )


def assert_same_output(got: torch.Tensor, want: torch.Tensor) -> None:
    """The honest output: equal, or within the batching bound when a host ran this step
    in one batch with another session's (hosts batch steps that queue together: equal to
    the step alone within 1e-5 relative, nexusd/exec/batching.py), which a loaded machine
    makes likely here (the check's replay and the session share a host). A lie is far
    outside it (the liars here add 1e-2 noise: 1000 times the bound)."""
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * max(scale, 1.0), (got, want)


async def honest_logits() -> list[torch.Tensor]:
    """The same generation in one honest host, unchecked."""
    async with trio.open_nursery() as nursery:
        solo = Node("solo", spans([(0, 6)]))
        cl = Cluster(nursery, [solo])
        logits = await generate(cl.session(cl.planner([(0, 6, [solo.id])])))
        nursery.cancel_scope.cancel()
    return logits


# ---- the rule ---------------------------------------------------------------------------


def test_tolerance_follows_dtype_and_codec() -> None:
    p = VerifyPolicy()
    assert p.tolerance(torch.float32, torch.float32, "raw") == 1e-4
    assert p.tolerance(torch.bfloat16, torch.float32, "raw") == 5e-2
    assert p.tolerance(torch.float32, torch.float32, "int8") == pytest.approx(3.2e-2)
    assert p.tolerance(torch.float32, torch.float32, "fp16") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="unknown codec"):
        p.tolerance(torch.float32, torch.float32, "zip")


def test_difference_is_relative_to_the_reference_and_strict_on_shape() -> None:
    ref = torch.tensor([[1.0, -10.0]])
    assert difference(ref + 1e-4, ref) == pytest.approx(1e-5, rel=1e-2)
    assert difference(ref, ref) == 0.0
    assert difference(ref[:, :1], ref) == math.inf
    assert difference(torch.tensor([[1, 2]]), torch.tensor([[1, 3]])) == math.inf
    assert last_tokens(torch.zeros(1, 7, 3), torch.zeros(1, 2, 3)).shape == (1, 2, 3)


def test_sampling_checks_first_steps_then_a_seeded_fraction() -> None:
    p = VerifyPolicy(rate=0.1, first_steps=2)
    a = [p.sampled(n, random.Random(7)) for n in range(3)]
    assert a[:2] == [True, True]
    rng1, rng2 = random.Random(3), random.Random(3)
    picks = [p.sampled(n, rng1) for n in range(2, 10_002)]
    assert picks == [p.sampled(n, rng2) for n in range(2, 10_002)]  # deterministic given the seed
    assert 800 < sum(picks) < 1200
    assert not any(
        VerifyPolicy(rate=0.0, first_steps=0).sampled(0, random.Random(0)) for _ in range(100)
    )
    assert not VerifyPolicy(rate=0.0, first_steps=0).enabled


def test_policy_and_config_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="verify_rate"):
        VerifyPolicy(rate=1.5)
    with pytest.raises(ValueError, match="verify_first_steps"):
        VerifyPolicy(first_steps=-1)
    with pytest.raises(ConfigError, match=r"exec\.verify_tol_fp32"):
        ExecConfig(verify_tol_fp32=0.0)
    assert ExecConfig().verify_rate == 0.02 and ExecConfig().verify_first_steps == 1


def test_the_daemon_policy_comes_from_exec_and_zero_turns_checks_off() -> None:
    on = verify_policy(load_config(None).exec)
    assert on == VerifyPolicy(rate=0.02, first_steps=1, tol_fp32=1e-4, tol_bf16=5e-2)
    env = {"NEXUSD_EXEC__VERIFY_RATE": "0", "NEXUSD_EXEC__VERIFY_FIRST_STEPS": "0"}
    assert verify_policy(load_config(None, env=env).exec) is None


# ---- a lying host -----------------------------------------------------------------------


async def test_a_lying_host_is_caught_on_its_first_step_and_the_output_is_the_honest_one() -> None:
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good])
        outcomes: list[str] = []
        session = verified(
            cl, [(0, 3, [head.id]), (3, 6, [liar.id, good.id])], VerifyPolicy(), outcomes
        )
        logits = await generate(session)
        assert cl.penalties == [(liar.id, "wrong_output")]  # caught at once, nobody else
        assert "wrong output on atoms [3,6)" in cl.failures[0][1]
        assert [h.host for h in session.route] == [head.id, good.id]
        assert outcomes.count("wrong_output") == 1 and outcomes.count("agreed") >= 2
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("forward", [False, True])
async def test_a_lying_last_host_is_caught_on_the_last_position_alone(forward: bool) -> None:
    """A generation's session asks the last hop for its last position only (wire Rule 6,
    "last"): the check compares that position with the origin's own, and still catches a
    liar on its first step; every output is the honest one's last position."""
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good], forward=forward)
        outcomes: list[str] = []
        layout = [(0, 3, [head.id]), (3, 6, [liar.id, good.id])]
        session = verified(cl, layout, VerifyPolicy(), outcomes, forward=forward, last_only=True)
        logits = await generate(session)
        assert cl.penalties == [(liar.id, "wrong_output")]
        assert [h.host for h in session.route] == [head.id, good.id]
        for got, want in zip(logits, honest, strict=True):
            assert got.shape == (1, 1, want.shape[-1])
            assert_same_output(got, want[:, -1:])
        nursery.cancel_scope.cancel()


async def test_forward_mode_checks_sampled_steps_in_relay_and_forwards_the_rest() -> None:
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good], forward=True)
        outcomes: list[str] = []
        layout = [(0, 3, [head.id]), (3, 6, [liar.id, good.id])]
        session = verified(cl, layout, VerifyPolicy(), outcomes, forward=True)
        logits = await generate(session)
        assert cl.penalties == [(liar.id, "wrong_output")]  # the first step is always checked
        assert [h.host for h in session.route] == [head.id, good.id]
        # the checked steps went through the origin; the others host to host
        assert 0 < head.metrics.value("exec_forwarded_total") < STEPS
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


async def test_a_lying_replica_is_reported_and_the_honest_host_keeps_its_place() -> None:
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        good = Node("good", spans([(3, 6)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        cl = Cluster(nursery, [head, good, liar])
        outcomes: list[str] = []
        session = verified(
            cl, [(0, 3, [head.id]), (3, 6, [good.id, liar.id])], VerifyPolicy(), outcomes
        )
        await generate(session)
        assert cl.penalties == [(liar.id, "wrong_output")]
        assert [h.host for h in session.route] == [head.id, good.id] and session.failovers == []
        nursery.cancel_scope.cancel()


async def test_a_late_lie_is_caught_by_a_check_of_the_whole_history_in_one_step() -> None:
    """Every step checked (rate 1): honest steps 0-2 agree with a fresh replica fed the
    concatenated history (one prefill), and the lie at step 3 is caught there."""
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=3))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good])
        outcomes: list[str] = []
        session = verified(
            cl,
            [(0, 3, [head.id]), (3, 6, [liar.id, good.id])],
            VerifyPolicy(rate=1.0, first_steps=0),
            outcomes,
        )
        logits = await generate(session)
        assert cl.penalties == [(liar.id, "wrong_output")]
        # 2 hops x 3 honest steps, then step 3: its first hop agrees, the liar is caught
        assert outcomes[:8] == ["agreed"] * 7 + ["wrong_output"]
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want)
        nursery.cancel_scope.cancel()


async def test_a_host_that_keeps_lying_is_banned_at_the_third_job() -> None:
    scores = PeerScores(threshold=100.0, ban_base_s=60.0, ban_max_s=600.0, decay_per_s=0.1)
    bans = []
    async with trio.open_nursery() as nursery:
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        good = Node("good", spans([(3, 6)]))
        cl = Cluster(nursery, [head, liar, good])
        for job in range(3):
            session = verified(
                cl, [(0, 3, [head.id]), (3, 6, [liar.id, good.id])], VerifyPolicy(), []
            )
            await generate(session)
            host, penalty = cl.penalties[job]
            bans.append(scores.penalise(host, penalty, now=float(job)))
        nursery.cancel_scope.cancel()
    assert bans[0] is None and bans[1] is None
    assert bans[2] is not None and bans[2].peer == liar.id and bans[2].reason == "wrong_output"


# ---- the engine: its own computation from the model files is the judge ------------------


class MemView:
    """A mesh in memory: the origin (hosting nothing) and hosts reached over FakeStreams."""

    def __init__(
        self, nursery: trio.Nursery, origin: Node, hosts: list[tuple[Node, float]]
    ) -> None:
        self.node_id = origin.id
        self._nursery = nursery
        self._origin = origin
        self._hosts = {n.id: (n, cost) for n, cost in hosts}
        self.reports: list[tuple[bytes, str]] = []

    def host_spans(self, model_id: str) -> list[HostSpan]:
        return [
            HostSpan(n.id, h.model_id, h.start, h.end, cost, 0, 0.0, 1 << 30)
            for n, cost in self._hosts.values()
            for h in n.host.hosted()
        ]

    def links(self) -> list[Link]:
        return []

    def name_of(self, node_id: bytes) -> str:
        return node_id.hex()[:8]

    def is_member(self, node_id: bytes) -> bool:
        return node_id == self.node_id or node_id in self._hosts

    async def open_exec_stream(self, node_id: bytes) -> ExecStream:
        node = self._hosts[node_id][0]
        o_end, h_end = stream_pair(self.node_id, node.id)
        ch = ExecChannel(h_end, node.signer, node.verifier, self.is_member, HOST_INBOUND)
        self._nursery.start_soon(self._serve, node, ch)
        return o_end

    async def _serve(self, node: Node, ch: ExecChannel) -> None:
        with contextlib.suppress(TransportBroken):
            await node.host.serve(ch, idle_timeout_s=30)

    def report(self, node_id: bytes, penalty: str) -> None:
        self.reports.append((node_id, penalty))


def tiny_registry(tmp_path: Path) -> ModelRegistry:
    """A model folder holding the tiny Llama as model "tiny" (the origin's judge's files)."""
    model = tiny_llama()
    save_model(
        Model(model_id="tiny", family="llama", config={}, atoms=model.atom_list()),
        tmp_path / "models" / "tiny",
    )
    return ModelRegistry(tmp_path / "models")


def origin_engine(
    view: MemView,
    origin: Node,
    registry: ModelRegistry,
    metrics: Metrics,
    *,
    policy: VerifyPolicy | None = None,
    forward: bool = False,
) -> JobEngine:
    """The origin's engine over `view`, checking with `policy` (the default one if None)."""
    return JobEngine(
        view=view,
        host=origin.host,
        registry=registry,
        signer=origin.signer,
        verifier=origin.verifier,
        metrics=metrics,
        step_timeout_s=10,
        rng=random.Random(0),
        verify=policy or VerifyPolicy(),
        forward=forward,
    )


@pytest.mark.parametrize("last_only", [False, True])
async def test_the_engine_judges_with_its_own_model_files_and_counts_the_checks(
    tmp_path: Path, last_only: bool
) -> None:
    """No other replica of the liar's span: the origin computes it from its model folder,
    catches the lie on the first step, reports "wrong_output" and continues on the honest
    (slower, so not preferred) host; the outputs are the honest ones (with `last_only`, as
    a generation asks: the last position's, judged against the origin's own of it)."""
    registry = tiny_registry(tmp_path)
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        origin = Node("origin", [])
        head = Node("head", spans([(0, 3)]))
        liar = Node("liar", spans([(3, 6)], lie_from=0))
        good = Node("good", spans([(3, 6)]))
        view = MemView(nursery, origin, [(head, 0.002), (liar, 0.001), (good, 0.05)])
        metrics = Metrics()
        engine = origin_engine(view, origin, registry, metrics)
        session = engine._session(
            "tiny",
            n_atoms=6,
            batch=1,
            max_len=32,
            bytes_per_hop=1024,
            kind="latency",
            codec="raw",
            last_only=last_only,
        )
        logits = await generate(session)
        assert view.reports == [(liar.id, "wrong_output")]
        assert [h.host for h in session.route] == [head.id, good.id]
        for got, want in zip(logits, honest, strict=True):
            assert_same_output(got, want[:, -1:] if last_only else want)
        text = metrics.render()
        assert 'verify_checks_total{outcome="wrong_output"} 1' in text
        assert 'hop_failures_total{reason="wrong_output"} 1' in text
        nursery.cancel_scope.cancel()


# ---- a sampled check never waits for its judge to load (session Rule 6) ------------------


async def test_a_sampled_check_does_not_wait_for_its_judge_and_is_owed_until_it_loads() -> None:
    """No other replica of either span: every check is judged by the origin's own
    computation. The first steps' checks wait for it; a sampled one while the judge is
    not loaded is deferred (the step goes on unchecked, nothing waits), the hop owes a
    check, and its first step once the judge is ready is checked; outputs stay honest."""
    honest = await honest_logits()
    ready, asked, judged = [False], [], []

    def judge_ready(start: int, end: int) -> bool:
        asked.append((start, end))
        return ready[0]

    async def arbiter(*args: Any) -> torch.Tensor:
        judged.append(args[0])
        return await own_output(*args)

    async with trio.open_nursery() as nursery:
        head, tail = Node("head", spans([(0, 3)])), Node("tail", spans([(3, 6)]))
        cl = Cluster(nursery, [head, tail])
        outcomes: list[str] = []
        verify = Verification(
            policy=VerifyPolicy(rate=1.0, first_steps=1),
            arbiter=arbiter,
            rng=random.Random(0),
            on_check=outcomes.append,
            judge_ready=judge_ready,
        )
        session = RoutedSession(
            n_atoms=6,
            plan=cl.planner([(0, 3, [head.id]), (3, 6, [tail.id])]),
            make_hop=cl.make_hop,
            report_failure=cl.report,
            batch=1,
            max_len=32,
            verify=verify,
        )
        await session.open()
        x, pos, per_step = PROMPT, 0, []
        for k in range(STEPS):
            ready[0] = k >= 3  # the judge has loaded by the fourth step
            before = len(outcomes)
            out, _ = await session.step(StepInput(x, pos, True, b""))
            per_step.append(outcomes[before:])
            assert_same_output(out, honest[k])
            pos += x.shape[1]
            x = out[:, -1:].argmax(-1)
        await session.close()
        assert per_step == [
            ["agreed", "agreed"],  # first steps: judged, the judge loaded for them
            ["deferred", "deferred"],  # sampled, judge not ready: nothing waits
            [],  # owed, judge still not ready: unchecked
            ["agreed", "agreed"],  # the owed checks, once it is ready
            ["agreed", "agreed"],  # sampled again (rate 1)
        ]
        assert judged == [0, 3, 0, 3, 0, 3] and (0, 3) in asked and (3, 6) in asked
        assert cl.penalties == []
        nursery.cancel_scope.cancel()


async def test_the_engine_loads_a_judge_in_the_background_once(tmp_path: Path) -> None:
    """`Judges.ready`: False and a background load the first time; the span is
    loaded once however often it is asked for meanwhile (and a check that needs it then
    waits for that load); True once loaded; without `run`, always True."""
    registry = tiny_registry(tmp_path)
    loads: list[tuple[str, int, int]] = []
    load_span = registry.load_span

    def counted(model_id: str, start: int, end: int) -> Span:
        loads.append((model_id, start, end))
        return load_span(model_id, start, end)

    registry.load_span = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        origin = Node("origin", [])
        view = MemView(nursery, origin, [])
        engine = origin_engine(view, origin, registry, Metrics())
        key = ("tiny", 3, 6)
        assert engine.judges.ready(key)  # no background yet: a check loads its own judge
        await nursery.start(engine.run)
        assert not engine.judges.ready(key) and not engine.judges.ready(key)
        inputs = [StepInput(torch.randn(1, 5, 32), 0, True, b"")]
        own = await engine.judges.output(key, inputs, 1, 32)  # waits for that load
        assert engine.judges.ready(key) and loads == [key]
        assert_same_output(own, await own_output(3, 6, inputs, 1, 32))
        nursery.cancel_scope.cancel()


# ---- a replacement's replay as its first check (session Rule 5) ---------------------------


async def failover_generation(
    layout_hosts: list[Node], spares: list[Node], victim: int, *, forward: bool
) -> tuple[list[int], list[str], int, Cluster]:
    """Greedy generation of 8 tokens over [(0, 2), (2, 4), (4, 6)] with host argmax and
    last_only (as the engine runs a generation), first steps checked; hop `victim`'s host
    dies after 4 tokens and `spares` (in that order) host its span. Returns the tokens, the
    check outcomes, how often the origin computed a check itself, and the cluster."""
    calls: list[int] = []

    async def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return await own_output(*args)

    cuts = [(0, 2), (2, 4), (4, 6)]
    outcomes: list[str] = []
    tokens: list[int] = []
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [*layout_hosts, *spares], forward=forward)
        layout = [
            (s, e, [h.id] + ([p.id for p in spares] if i == victim else []))
            for i, ((s, e), h) in enumerate(zip(cuts, layout_hosts, strict=True))
        ]
        policy = VerifyPolicy(rate=0.0, first_steps=1)
        session = verified(
            cl, layout, policy, outcomes, forward=forward, last_only=True, arbiter=counted
        )
        await session.open()
        x, pos = PROMPT, 0
        for k in range(8):
            if k == 4:
                for s in layout_hosts[victim].streams:
                    s.break_()
            out, _ = await session.step(StepInput(x, pos, True, b""), argmax_vocab=100)
            tokens.append(int(out[0]) if out.dtype == torch.int64 else int(out[0, -1].argmax()))
            pos += x.shape[1]
            x = torch.tensor([[tokens[-1]]])
        await session.close()
        nursery.cancel_scope.cancel()
    return tokens, outcomes, len(calls), cl


@pytest.mark.parametrize("victim", [1, 2])
@pytest.mark.parametrize("forward", [False, True])
async def test_a_replacement_whose_replay_agrees_is_not_checked_again(
    victim: int, forward: bool
) -> None:
    """The middle or the last hop's host dies: its spare replays the stored steps, agrees
    with what the dead host gave on every one (the next hop's inputs, or the tokens), and
    goes on unchecked: three first-step checks (the victim's span by its spare, as the
    second replica), then the replay's agreement and no fourth check."""
    cuts = [(0, 2), (2, 4), (4, 6)]
    hosts = [Node(n, spans([c])) for n, c in zip("abc", cuts, strict=True)]
    spare = Node("spare", spans([cuts[victim]]))
    tokens, outcomes, own, cl = await failover_generation(hosts, [spare], victim, forward=forward)
    assert tokens == reference_greedy(tiny_llama(), 8)
    assert [h for h, _ in cl.failures] == [hosts[victim].id]
    assert outcomes == ["agreed", "agreed", "agreed", "replay_agreed"]
    assert own == 2  # the spans without a second replica


async def test_a_lying_replacement_disagrees_on_replay_and_is_caught_on_its_first_step() -> None:
    """The first spare lies once it replaces the dead host (honest in the one check it
    served as the second replica): its replay disagrees with the dead host's outputs, so
    its first step is checked, it is caught and replaced by the honest spare, whose replay
    agrees; the tokens are the honest ones."""
    cuts = [(0, 2), (2, 4), (4, 6)]
    hosts = [Node(n, spans([c])) for n, c in zip("abc", cuts, strict=True)]
    liar = Node("liar", spans([cuts[1]], lie_from=1))
    good = Node("good", spans([cuts[1]]))
    tokens, outcomes, _, cl = await failover_generation(hosts, [liar, good], 1, forward=False)
    assert tokens == reference_greedy(tiny_llama(), 8)
    assert cl.penalties[-1] == (liar.id, "wrong_output")
    assert outcomes[3:] == ["wrong_output", "replay_agreed"]
