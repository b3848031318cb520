"""Distributed execution equals one process; failover replays and stays identical."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import torch
import trio

from atoms.atom import ForwardContext
from atoms.codecs import encode
from atoms.span import Span
from nexusd.exec.session import (
    Hop,
    HopFailed,
    HopPlan,
    JobFailed,
    LocalHop,
    RoutedSession,
    StepInput,
)
from nexusd.exec.wire import Step, header_of

from .exec_fixtures import TINY, Cluster, Node, tiny_llama

if TYPE_CHECKING:
    from atoms.codecs import Encoded
    from nexusd.exec.wire import StepResult

PROMPT = torch.tensor([[5, 17, 42, 8, 3]])


def reference_greedy(model: Span, steps: int) -> list[int]:
    cache = model.new_session_cache(1, 32, 1 << 24)
    x, pos, out = PROMPT, 0, []
    with torch.inference_mode():
        for _ in range(steps):
            ctx = ForwardContext.for_tokens(1, x.shape[1], start=pos, causal=True, cache=cache)
            logits = model(x, ctx)
            pos += x.shape[1]
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


async def routed_greedy(
    session: RoutedSession, steps: int, on_step: Callable[[int], None] | None = None
) -> list[int]:
    x, pos, out = PROMPT, 0, []
    for i in range(steps):
        if on_step:
            on_step(i)
        logits, timings = await session.step(StepInput(x, pos, True, b""))
        assert len(timings) == len(session.route)
        pos += x.shape[1]
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]])
    return out


def split(model: Span, cuts: list[tuple[int, int]]) -> list[Span]:
    atoms = model.atom_list()
    return [Span(atoms[s:e]) for s, e in cuts]


async def test_three_hosts_equal_one_process() -> None:
    model = tiny_llama()
    want = reference_greedy(model, 12)
    a, b, c = (
        Node(n, [s]) for n, s in zip("abc", split(model, [(0, 2), (2, 4), (4, 6)]), strict=True)
    )
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b, c])
        plan = cl.planner([(0, 2, [a.id]), (2, 4, [b.id]), (4, 6, [c.id])])
        sess = cl.session(plan)
        await sess.open()
        got = await routed_greedy(sess, 12)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert cl.failures == []


async def test_host_killed_mid_generation_output_identical() -> None:
    model = tiny_llama()
    want = reference_greedy(model, 12)
    spans = split(model, [(0, 3), (3, 6)])
    a, b1, b2 = (
        Node("a", [spans[0]]),
        Node("b1", [spans[1]]),
        Node("b2", [split(model, [(3, 6)])[0]]),
    )
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b1, b2])
        plan = cl.planner([(0, 3, [a.id]), (3, 6, [b1.id, b2.id])])
        sess = cl.session(plan)
        await sess.open()

        def kill(i: int) -> None:
            if i == 6:
                for s in b1.streams:
                    s.break_()

        got = await routed_greedy(sess, 12, kill)
        assert [p.host for p in sess.route] == [a.id, b2.id]
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert [h for h, _ in cl.failures] == [b1.id]
    assert cl.penalties == [(b1.id, "unreachable")]  # a dead host: a failure, not misbehaviour
    assert b2.metrics.value("exec_steps_total", model="tiny") == 12 - 6 + 6  # replay + rest


async def test_nan_output_is_rejected_and_rerouted() -> None:
    model = tiny_llama()
    want = reference_greedy(model, 4)
    bad_span, good_span = split(model, [(0, 6)])[0], split(model, [(0, 6)])[0]
    bad, good = Node("bad", [bad_span]), Node("good", [good_span])
    original = bad.host._compute

    # A host that returns NaN logits; a pass-through wrapper, so its arguments are Any.
    async def poisoned(*args: Any, **kwargs: Any) -> tuple[StepResult, Encoded]:
        result, enc = await original(*args, **kwargs)
        from atoms.codecs import encode

        nan = torch.full(enc.shape, float("nan"))
        return result, encode(nan)

    bad.host._compute = poisoned  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [bad, good])
        plan = cl.planner([(0, 6, [bad.id, good.id])])
        sess = cl.session(plan)
        await sess.open()
        got = await routed_greedy(sess, 4)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert cl.failures[0][0] == bad.id and "NaN" in cl.failures[0][1]
    assert cl.penalties == [(bad.id, "bad_output")]


async def test_wrong_shape_output_is_scored_as_a_bad_output_not_a_timeout() -> None:
    """A host answering with fewer tokens than it was given is blamed for a bad output (the
    daemon bans on those); its replacement gives the right answer."""
    model = tiny_llama()
    want = reference_greedy(model, 3)
    bad, good = Node("bad", split(model, [(0, 6)])), Node("good", split(model, [(0, 6)]))
    original = bad.host._compute

    async def truncated(*args: Any, **kwargs: Any) -> tuple[StepResult, Encoded]:
        result, enc = await original(*args, **kwargs)
        from atoms.codecs import decode, encode

        short = encode(decode(enc)[:, :1])  # the last token's logits only
        return dataclasses.replace(result, tensor=header_of(short)), short

    bad.host._compute = truncated  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [bad, good])
        sess = cl.session(cl.planner([(0, 6, [bad.id, good.id])]))
        await sess.open()
        got = await routed_greedy(sess, 3)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert cl.failures == [(bad.id, "invalid output: 1 tokens, input had 5")]
    assert cl.penalties == [(bad.id, "bad_output")]


async def test_kv_budget_exhausted_is_refused_and_routed_elsewhere() -> None:
    model = tiny_llama()
    small, big = Node("small", [model], budget=10), Node("big", [model])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [small, big])
        plan = cl.planner([(0, 6, [small.id, big.id])])
        sess = cl.session(plan)
        await sess.open()
        assert [p.host for p in sess.route] == [big.id]
        assert "cache_exhausted" in sess.failovers[0]
        assert cl.failures == []  # an honest refusal excludes the host; it is not blamed
        assert small.metrics.value("exec_refused_total", code="cache_exhausted") == 1
        await sess.close()
        nursery.cancel_scope.cancel()


async def test_no_host_left_fails_the_job_with_reason() -> None:
    model = tiny_llama()
    only = Node("only", [model])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [only])
        plan = cl.planner([(0, 6, [only.id])])
        sess = cl.session(plan)
        await sess.open()
        for s in only.streams:
            s.break_()
        with pytest.raises(LookupError, match=r"no host for \[0,6\)"):
            await sess.step(StepInput(PROMPT, 0, True, b""))
        nursery.cancel_scope.cancel()


async def test_duplicate_step_is_answered_not_recomputed() -> None:
    model = tiny_llama()
    node = Node("h", [model])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [node])
        hop = await cl.make_hop(cl.planner([(0, 6, [node.id])])(0, 6, frozenset())[0])
        await hop.open(1, 32)
        first, _ = await hop.step(0, StepInput(PROMPT, 0, True, b""))
        again, _ = await hop.step(0, StepInput(PROMPT, 0, True, b""))
        assert torch.equal(first, again)
        assert node.metrics.value("exec_steps_total", model="tiny") == 1
        assert node.metrics.value("exec_duplicate_steps_total") == 1
        with pytest.raises(HopFailed, match="out_of_order"):
            await hop.step(5, StepInput(PROMPT, 5, True, b""))
        nursery.cancel_scope.cancel()


async def test_bad_input_fails_the_job_not_the_host() -> None:
    model = tiny_llama()
    node = Node("h", [model])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [node])
        plan = cl.planner([(0, 6, [node.id])])
        sess = cl.session(plan)
        await sess.open()
        with pytest.raises(JobFailed, match="bad_input"):
            await sess.step(StepInput(torch.tensor([[1.5, 2.5]]), 0, True, b""))
        nursery.cancel_scope.cancel()


def test_warm_up_runs_any_text_span() -> None:
    from nexusd.exec.hosting import warm_up

    model = tiny_llama()
    for a, b in [(0, 6), (1, 3), (5, 6)]:
        assert warm_up(split(model, [(a, b)])[0]) > 0


async def test_failure_during_replay_fails_over_again() -> None:
    """The replacement dies while the stored steps are replayed into it: a third host takes
    over, and the output is still identical (the replay's errors are not lost in a group)."""
    model = tiny_llama()
    want = reference_greedy(model, 12)
    a = Node("a", split(model, [(0, 3)]))
    b1, b2, b3 = (Node(n, split(model, [(3, 6)])) for n in ("b1", "b2", "b3"))
    original = b2.host.step

    async def dies_on_replay(*args: object, **kwargs: object) -> object:
        for s in b2.streams:
            s.break_()
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    b2.host.step = dies_on_replay  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b1, b2, b3])
        plan = cl.planner([(0, 3, [a.id]), (3, 6, [b1.id, b2.id, b3.id])])
        sess = cl.session(plan)
        await sess.open()

        def kill(i: int) -> None:
            if i == 6:
                for s in b1.streams:
                    s.break_()

        got = await routed_greedy(sess, 12, kill)
        assert [p.host for p in sess.route] == [a.id, b3.id]
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert [h for h, _ in cl.failures] == [b1.id, b2.id]


async def test_session_without_cache_runs_many_steps_of_any_length() -> None:
    """Batch work (embeddings) runs cache-less sessions: every step is a full forward of
    new inputs with its own length, and each must get its own answer (regression: step ids
    once came from the replay history, which cache-less sessions do not keep)."""
    model = tiny_llama()
    a, b = (Node(n, [s]) for n, s in zip("ab", split(model, [(0, 3), (3, 6)]), strict=True))
    inputs = [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 1, 2, 3, 4, 8, 8]]), torch.tensor([[3]])]
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b])
        plan = cl.planner([(0, 3, [a.id]), (3, 6, [b.id])])
        sess = cl.session(plan, max_len=0)
        await sess.open()
        for ids in inputs:
            got, _ = await sess.step(StepInput(ids, 0, True, b""))
            with torch.inference_mode():
                want = model(ids, ForwardContext.for_tokens(1, ids.shape[1], causal=True))
            assert torch.equal(got, want)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert cl.failures == [] and sess.failovers == []


# ---- forward mode: hosts send activations straight to the next host ---------------------


async def test_forward_mode_equals_relay_mode_and_one_process() -> None:
    model = tiny_llama()
    want = reference_greedy(model, 12)
    got: dict[bool, list[int]] = {}
    for forward in (False, True):
        a, b, c = (
            Node(n, [s]) for n, s in zip("abc", split(model, [(0, 2), (2, 4), (4, 6)]), strict=True)
        )
        async with trio.open_nursery() as nursery:
            cl = Cluster(nursery, [a, b, c], forward=forward)
            sess = cl.session(cl.planner([(0, 2, [a.id]), (2, 4, [b.id]), (4, 6, [c.id])]))
            await sess.open()
            got[forward] = await routed_greedy(sess, 12)
            await sess.close()
            nursery.cancel_scope.cancel()
        assert cl.failures == []
        # forward mode: every step after the first host went host to host
        forwarded = sum(n.metrics.value("exec_forwarded_total") for n in (a, b, c))
        assert forwarded == (2 * 12 if forward else 0)
    assert got[True] == got[False] == want


@pytest.mark.parametrize("forward", [True, False])
async def test_while_waiting_runs_once_per_step_while_the_hosts_compute(forward: bool) -> None:
    """Forward mode: the origin's own work (`while_waiting`: the generate job streams the
    last token there) runs once the step has left, while the hosts compute: here the last
    host computes only after it ran, so a call after the step would never return. Relay
    mode: once, after the step. Tokens equal one process either way."""
    model = tiny_llama()
    want = reference_greedy(model, 4)
    a, b, c = (
        Node(n, [s]) for n, s in zip("abc", split(model, [(0, 2), (2, 4), (4, 6)]), strict=True)
    )
    gate = trio.Event()
    calls: list[int] = []  # the steps the last host had computed when it ran
    real = c.host.step

    async def gated(peer: bytes, msg: Step, payload: bytes) -> tuple[StepResult, Encoded]:
        if forward:
            await gate.wait()
        return await real(peer, msg, payload)

    async def waiting() -> None:
        calls.append(int(c.metrics.value("exec_steps_total", model="tiny")))
        gate.set()

    c.host.step = gated  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b, c], forward=forward)
        sess = cl.session(cl.planner([(0, 2, [a.id]), (2, 4, [b.id]), (4, 6, [c.id])]))
        await sess.open()
        x, pos, got = PROMPT, 0, []
        with trio.fail_after(10):
            for _ in range(4):
                gate = trio.Event()
                logits, _t = await sess.step(StepInput(x, pos, True, b""), while_waiting=waiting)
                pos += x.shape[1]
                got.append(int(logits[0, -1].argmax()))
                x = torch.tensor([[got[-1]]])
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert calls == [k + (0 if forward else 1) for k in range(4)]


async def test_sessions_forwarded_on_one_channel_are_served_side_by_side_and_batch() -> None:
    """A forwarding host sends every session's steps to the next host on one channel; that
    host serves them side by side, so they reach its batcher together. Its batch window is
    10 s here and a step waits for every active session's: served one at a time (as before),
    each decode step would wait the whole window. Each session's tokens equal one process."""
    model = tiny_llama()
    want = reference_greedy(model, 6)
    first, last = split(model, [(0, 3), (3, 6)])
    a, b = Node("a", [first]), Node("b", [last], batch_window_s=10.0)
    got: dict[int, list[int]] = {}
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b], forward=True)
        plan = cl.planner([(0, 3, [a.id]), (3, 6, [b.id])])
        sessions = [cl.session(plan) for _ in range(3)]
        for sess in sessions:
            await sess.open()

        async def run(i: int, sess: RoutedSession) -> None:
            got[i] = await routed_greedy(sess, 6)

        with trio.fail_after(8):
            async with trio.open_nursery() as streams:
                for i, sess in enumerate(sessions):
                    streams.start_soon(run, i, sess)
        for sess in sessions:
            await sess.close()
        nursery.cancel_scope.cancel()
    assert got == dict.fromkeys(range(3), want)
    assert cl.failures == []
    assert a.metrics.value("exec_forwarded_total") == 3 * 6  # one channel a -> b carried them
    batches = b.metrics.value("exec_batches_total")
    assert b.metrics.value("exec_batched_steps_total") == 3 * 6
    assert batches == 3 + 5  # the prefills alone, then each decode round as one batch


async def test_forward_mode_with_two_spans_in_a_row_on_one_host() -> None:
    """A host serving two consecutive spans never forwards to itself: those two hops relay,
    and the run from its second span on forwards (found by the two-versions e2e test)."""
    model = tiny_llama()
    want = reference_greedy(model, 12)
    s0, s1, s2 = split(model, [(0, 2), (2, 4), (4, 6)])
    a, b = Node("a", [s0, s1]), Node("b", [s2])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b], forward=True)
        sess = cl.session(cl.planner([(0, 2, [a.id]), (2, 4, [a.id]), (4, 6, [b.id])]))
        await sess.open()
        got = await routed_greedy(sess, 12)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert cl.failures == []
    assert got == want
    assert a.metrics.value("exec_forwarded_total") == 12  # a's second span on to b
    assert a.metrics.value("exec_forward_failures_total") == 0


@pytest.mark.parametrize("victim", [0, 1, 2])
async def test_forward_mode_host_killed_mid_generation_output_identical(victim: int) -> None:
    model = tiny_llama()
    want = reference_greedy(model, 12)
    cuts = [(0, 2), (2, 4), (4, 6)]
    hosts = [Node(n, [s]) for n, s in zip("abc", split(model, cuts), strict=True)]
    spare = Node("spare", split(model, [cuts[victim]]))
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [*hosts, spare], forward=True)
        layout = [
            (s, e, [h.id] + ([spare.id] if i == victim else []))
            for i, ((s, e), h) in enumerate(zip(cuts, hosts, strict=True))
        ]
        sess = cl.session(cl.planner(layout))
        await sess.open()

        def kill(i: int) -> None:
            if i == 6:
                for s in hosts[victim].streams:
                    s.break_()

        got = await routed_greedy(sess, 12, kill)
        route = [p.host for p in sess.route]
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want
    assert route[victim] == spare.id
    assert [h for h, _ in cl.failures] == [hosts[victim].id]
    assert cl.penalties == [(hosts[victim].id, "unreachable")]
    # the spare replayed the victim's 6 steps from the origin's copies, then took the rest
    assert spare.metrics.value("exec_steps_total", model="tiny") == 12


async def test_a_forwarded_step_needs_the_sessions_token() -> None:
    model = tiny_llama()
    a, b = Node("a", split(model, [(0, 3)])), Node("b", split(model, [(3, 6)]))
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b], forward=True)
        sess = cl.session(cl.planner([(0, 3, [a.id]), (3, 6, [b.id])]))
        await sess.open()
        got = await routed_greedy(sess, 2)  # b's session is open, fed by a
        target = sess._hops[1].hop.forward_target(2)  # type: ignore[attr-defined]
        channel = await cl.dial(a, b.id)  # a member, but without the token
        x = torch.zeros((1, 1, TINY.hidden_size))
        enc = encode(x)
        forged = Step(
            session_id=target.session_id,
            step_id=2,
            position=6,
            causal=True,
            tensor=header_of(enc),
            origin=cl.origin.id,
            token=bytes(16),
        )
        await channel.send(forged, enc)
        await trio.testing.wait_all_tasks_blocked()  # b has read and refused it
        assert b.metrics.value("exec_refused_total", code="forward_refused") == 1
        assert b.metrics.value("exec_steps_total", model="tiny") == 2  # nothing computed
        logits, _ = await sess.step(StepInput(torch.tensor([got[-1:]]), 6, True, b""))
        assert [*got, int(logits[0, -1].argmax())] == reference_greedy(model, 3)  # intact
        await sess.close()
        nursery.cancel_scope.cancel()


async def test_forward_mode_with_the_origins_own_first_span() -> None:
    model = tiny_llama()
    want = reference_greedy(model, 8)
    mine, *theirs = split(model, [(0, 2), (2, 4), (4, 6)])
    b, c = Node("b", [theirs[0]]), Node("c", [theirs[1]])
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [b, c], forward=True)
        own = Node("own", [mine])  # the origin's SpanHost

        async def make_hop(p: HopPlan) -> Hop:
            if p.host == cl.origin.id:
                return LocalHop(p, "tiny", own.host, cl.origin.id)
            return await cl.make_hop(p)

        sess = RoutedSession(
            n_atoms=6,
            plan=cl.planner([(0, 2, [cl.origin.id]), (2, 4, [b.id]), (4, 6, [c.id])]),
            make_hop=make_hop,
            report_failure=cl.report,
            batch=1,
            max_len=32,
            forward=True,
        )
        await sess.open()
        got = await routed_greedy(sess, 8)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want and cl.failures == []
    assert b.metrics.value("exec_forwarded_total") == 8  # b -> c, past the origin
