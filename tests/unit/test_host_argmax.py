"""Greedy decoding's token picked on the last host (wire Rule 6, `[exec] host_argmax`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import trio

from atoms.atom import ForwardContext
from atoms.codecs import Encoded, encode
from mesh.wire import decode_any
from mesh.wire import encode as encode_record
from nexusd.exec.hosting import ExecRefused, SpanHost, session_kv_bytes
from nexusd.exec.session import RoutedSession, StepInput
from nexusd.exec.verify import VerifyPolicy
from nexusd.exec.wire import OpenSession, Step, TensorHeader, header_of, tensor_of

from .exec_fixtures import TINY, Cluster, Node, tiny_llama
from .test_batching import make_host
from .test_exec import PROMPT, reference_greedy, split
from .test_verify import verified

PEER = b"o" * 32
VOCAB = TINY.vocab_size
CUTS = [(0, 2), (2, 4), (4, 6)]


async def reduced_greedy(session: RoutedSession, steps: int) -> tuple[list[int], list[bool]]:
    """Greedy tokens with the last host asked for the argmax; per step, whether it was."""
    x, pos, tokens, reduced = PROMPT, 0, [], []
    for _ in range(steps):
        out, _ = await session.step(StepInput(x, pos, True, b""), argmax_vocab=VOCAB)
        pos += x.shape[1]
        reduced.append(out.dtype == torch.int64)
        nxt = int(out[0]) if out.dtype == torch.int64 else int(out[0, -1].argmax())
        tokens.append(nxt)
        x = torch.tensor([[nxt]])
    return tokens, reduced


# ---- the wire field ---------------------------------------------------------------------


def step_msg(reduce: str = "") -> Step:
    header = TensorHeader("int64", (1, 1), "raw")
    return Step(
        session_id=b"s" * 16, step_id=0, position=0, causal=True, tensor=header, reduce=reduce
    )


def test_step_reduce_is_argmax_or_nothing_and_travels() -> None:
    assert step_msg().reduce == ""
    for reduce in ("argmax", "last"):
        msg = step_msg(reduce)
        assert decode_any(encode_record(msg), (Step,)) == msg
    for bad in ("top2", "ARGMAX", " argmax"):
        with pytest.raises(ValueError, match="reduce: expected one of"):
            step_msg(bad)


# ---- the host ---------------------------------------------------------------------------


async def host_step(
    host: SpanHost, sid: bytes, step_id: int, pos: int, x: torch.Tensor, reduce: str = ""
) -> tuple[torch.Tensor, TensorHeader]:
    enc = encode(x)
    msg = Step(
        session_id=sid,
        step_id=step_id,
        position=pos,
        causal=True,
        tensor=header_of(enc),
        reduce=reduce,
    )
    result, out = await host.step(PEER, msg, enc.data)
    return tensor_of(result.tensor, out.data), result.tensor


async def test_a_span_that_does_not_end_in_logits_refuses_to_reduce() -> None:
    body = split(tiny_llama(), [(0, 3)])[0]
    host = make_host(body)
    sid = b"a" * 16
    await host.open(
        PEER, OpenSession(session_id=sid, model_id="tiny", start=0, end=3, batch=1, max_len=16)
    )
    for reduce in ("argmax", "last"):
        with pytest.raises(ExecRefused, match=r"LM head; atoms tiny\[0,3\) give hidden") as err:
            await host_step(host, sid, 0, 0, PROMPT, reduce)
        assert err.value.code == "bad_input"
    assert host._metrics.value("exec_refused_total", code="bad_input") == 2
    out, _ = await host_step(host, sid, 0, 0, PROMPT)  # refused before anything ran: usable
    assert out.shape == (1, PROMPT.shape[1], TINY.hidden_size)


async def test_the_head_sends_its_last_positions_argmax_raw_whatever_the_codec() -> None:
    model = tiny_llama()
    head = split(model, [(3, 6)])[0]
    body = split(model, [(0, 3)])[0]
    hidden = body(PROMPT, _ctx())
    host = make_host(head)
    want = model(PROMPT, _ctx())[:, -1:]
    for i, codec in enumerate(("raw", "int8")):
        for j, reduce in enumerate(("", "argmax", "last")):
            sid = bytes([i * 3 + j]) * 16
            await host.open(
                PEER,
                OpenSession(
                    session_id=sid,
                    model_id="tiny",
                    start=3,
                    end=6,
                    batch=1,
                    max_len=16,
                    reply_codec=codec,
                ),
            )
            out, header = await host_step(host, sid, 0, 0, hidden, reduce)
            if reduce == "argmax":
                assert header == TensorHeader("int64", (1,), "raw")
                assert int(out[0]) == int(want[0, -1].argmax())
            elif reduce == "last":  # the head projected the last position alone
                assert header.codec == codec and out.shape == (1, 1, VOCAB)
                if codec == "raw":
                    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            else:
                assert header.codec == codec and out.shape == (1, PROMPT.shape[1], VOCAB)


def _ctx() -> ForwardContext:
    return ForwardContext.for_tokens(1, PROMPT.shape[1], causal=True)


async def test_batched_reduced_steps_equal_reduced_steps_alone() -> None:
    """8 sessions decode 4 tokens each, asking for the argmax: together (one batch per
    round, reduced per session after it) and one at a time give the same tokens."""
    span = tiny_llama()

    async def run(host: SpanHost, together: bool) -> list[list[int]]:
        tokens: list[list[int]] = []
        for i in range(8):
            sid = bytes([i]) * 16
            msg = OpenSession(session_id=sid, model_id="tiny", start=0, end=6, batch=1, max_len=24)
            await host.open(PEER, msg)
            prompt = torch.tensor([[(5 * i + 3 * t) % 90 + 1 for t in range(2 + i)]])
            out, _ = await host_step(host, sid, 0, 0, prompt, "argmax")
            tokens.append([int(out[0])])

        async def one(i: int, r: int) -> None:
            x = torch.tensor([[tokens[i][-1]]])
            out, header = await host_step(host, bytes([i]) * 16, r + 1, 2 + i + r, x, "argmax")
            assert header == TensorHeader("int64", (1,), "raw")
            tokens[i].append(int(out[0]))

        for r in range(4):
            if together:
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(one, i, r)
            else:
                for i in range(8):
                    await one(i, r)
        return tokens

    alone = await run(make_host(span), together=False)
    host = make_host(span, window_s=10.0)  # the wait ends when all 8 active sessions arrive
    batched = await run(host, together=True)
    assert batched == alone
    assert host._metrics.value("exec_batched_steps_total") == 8 * 5  # 4 rounds batched
    assert host._metrics.value("exec_batches_total") == 8 + 4


# ---- the origin over a route --------------------------------------------------------------


@pytest.mark.parametrize("forward", [False, True])
async def test_reduced_tokens_equal_full_logits_in_relay_and_forward_mode(forward: bool) -> None:
    model = tiny_llama()
    want = reference_greedy(model, 12)
    a, b, c = (Node(n, [s]) for n, s in zip("abc", split(model, CUTS), strict=True))
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b, c], forward=forward)
        sess = cl.session(cl.planner([(0, 2, [a.id]), (2, 4, [b.id]), (4, 6, [c.id])]))
        await sess.open()
        got, reduced = await reduced_greedy(sess, 12)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want and all(reduced) and cl.failures == []
    forwarded = sum(n.metrics.value("exec_forwarded_total") for n in (a, b, c))
    assert forwarded == (2 * 12 if forward else 0)  # a and b forwarded full activations


@pytest.mark.parametrize("victim", [1, 2])
@pytest.mark.parametrize("forward", [False, True])
async def test_a_host_killed_mid_generation_reduced_tokens_identical(
    forward: bool, victim: int
) -> None:
    """The last host (or the one before it, which forwards to it) dies after 6 tokens: the
    spare replays its stored inputs (full outputs) and the step goes on, reduced at the end."""
    model = tiny_llama()
    want = reference_greedy(model, 12)
    hosts = [Node(n, [s]) for n, s in zip("abc", split(model, CUTS), strict=True)]
    spare = Node("spare", split(model, [CUTS[victim]]))
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [*hosts, spare], forward=forward)
        layout = [
            (s, e, [h.id] + ([spare.id] if i == victim else []))
            for i, ((s, e), h) in enumerate(zip(CUTS, hosts, strict=True))
        ]
        sess = cl.session(cl.planner(layout))
        await sess.open()
        first, _ = await reduced_greedy(sess, 6)
        for s in hosts[victim].streams:
            s.break_()
        x, pos, rest = torch.tensor([[first[-1]]]), PROMPT.shape[1] + 5, []
        for _ in range(6):
            out, _ = await sess.step(StepInput(x, pos, True, b""), argmax_vocab=VOCAB)
            assert out.dtype == torch.int64  # reduced also on the step that failed over
            rest.append(int(out[0]))
            x, pos = out.view(1, 1), pos + 1
        route = [p.host for p in sess.route]
        await sess.close()
        nursery.cancel_scope.cancel()
    assert [*first, *rest] == want
    assert route[victim] == spare.id and [h for h, _ in cl.failures] == [hosts[victim].id]


class LyingHost(SpanHost):
    """Sends `lie` instead of the reduced output it was asked for."""

    lie: torch.Tensor

    def _reduced(self, peer: bytes, msg: Step, out: torch.Tensor) -> Encoded:
        return encode(self.lie, "raw")


@pytest.mark.parametrize(
    ("lie", "why"),
    [
        (torch.tensor([VOCAB]), "outside"),
        (torch.tensor([-1]), "outside"),
        (torch.tensor([3.0]), "expected int64"),
        (torch.tensor([[3]]), "expected int64"),
        (torch.tensor([3, 4]), "expected int64"),
    ],
)
async def test_a_bad_reduced_output_is_a_bad_output_failed_over(
    lie: torch.Tensor, why: str
) -> None:
    model = tiny_llama()
    want = reference_greedy(model, 4)
    front, head = split(model, [(0, 3), (3, 6)])
    a, good = Node("a", [front]), Node("good", [split(model, [(3, 6)])[0]])
    liar = Node("liar", [head])
    liar.host = LyingHost(
        [head],
        kv_budget_bytes=1 << 24,
        max_sessions=8,
        limiter=trio.CapacityLimiter(1),
        metrics=liar.metrics,
    )
    liar.host.lie = lie
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, liar, good])
        sess = cl.session(cl.planner([(0, 3, [a.id]), (3, 6, [liar.id, good.id])]))
        await sess.open()
        got, reduced = await reduced_greedy(sess, 4)
        await sess.close()
        nursery.cancel_scope.cancel()
    assert got == want and all(reduced)
    assert cl.penalties == [(liar.id, "bad_output")]
    assert why in cl.failures[0][1]


async def test_spot_checked_steps_get_the_full_logits() -> None:
    """The last host's first step is always checked (verify_first_steps): it comes back as
    logits and is compared; the unchecked steps after it come back reduced."""
    model = tiny_llama()
    want = reference_greedy(model, 5)
    for forward in (False, True):
        a, b = Node("a", split(model, [(0, 3)])), Node("b", split(model, [(3, 6)]))
        outcomes: list[str] = []
        async with trio.open_nursery() as nursery:
            cl = Cluster(nursery, [a, b], forward=forward)
            layout = [(0, 3, [a.id]), (3, 6, [b.id])]
            policy = VerifyPolicy(rate=0.0, first_steps=1)
            sess = verified(cl, layout, policy, outcomes, forward=forward)
            await sess.open()
            got, reduced = await reduced_greedy(sess, 5)
            await sess.close()
            nursery.cancel_scope.cancel()
        assert got == want and cl.failures == []
        assert reduced == [False, True, True, True, True]
        assert outcomes == ["agreed", "agreed"]  # each host's first step


async def test_a_generation_session_checks_the_last_position_alone() -> None:
    """With `last_only` (a generation's session) the checked step's logits are the last
    position's, (1, 1, V), on the host and in the origin's own computation alike."""
    model = tiny_llama()
    want = reference_greedy(model, 5)
    a, b = Node("a", split(model, [(0, 3)])), Node("b", split(model, [(3, 6)]))
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        cl = Cluster(nursery, [a, b])
        policy = VerifyPolicy(rate=0.0, first_steps=1)
        sess = verified(cl, [(0, 3, [a.id]), (3, 6, [b.id])], policy, outcomes, last_only=True)
        await sess.open()
        out, _ = await sess.step(StepInput(PROMPT, 0, True, b""), argmax_vocab=VOCAB)
        assert out.shape == (1, 1, VOCAB)  # checked: logits, of the last position only
        tokens = [int(out[0, -1].argmax())]
        x, pos = torch.tensor([[tokens[-1]]]), PROMPT.shape[1]
        for _ in range(4):
            out, _ = await sess.step(StepInput(x, pos, True, b""), argmax_vocab=VOCAB)
            assert out.dtype == torch.int64  # unchecked: reduced
            tokens.append(int(out[0]))
            x, pos = torch.tensor([[tokens[-1]]]), pos + 1
        await sess.close()
        nursery.cancel_scope.cancel()
    assert tokens == want and cl.failures == []
    assert outcomes == ["agreed", "agreed"]


async def test_a_session_sized_budget_holds_that_session_and_not_a_token_more() -> None:
    """`session_kv_bytes` (the origin's own computation sizes its one-session host by it,
    instead of reserving a quarter of the machine's memory per spot check)."""
    span = tiny_llama()
    budget = session_kv_bytes(span, batch=1, max_len=7, page_tokens=4)
    assert budget > 0 and session_kv_bytes(span, batch=1, max_len=0, page_tokens=4) == 0
    host = make_host(span, budget=budget)  # 4-token pages, as sized
    sid = b"k" * 16
    msg = OpenSession(session_id=sid, model_id="tiny", start=0, end=6, batch=1, max_len=7)
    await host.open(PEER, msg)
    out, _ = await host_step(host, sid, 0, 0, PROMPT)  # 5 tokens, then 2 more: max_len
    for k in range(2):
        out, _ = await host_step(host, sid, k + 1, 5 + k, out[:, -1:].argmax(-1))
    assert host.kv_pages() == (2, 2)  # all of it, held by the one session
    with pytest.raises(ExecRefused) as err:
        await host.open(PEER, dataclasses.replace(msg, session_id=b"l" * 16))
    assert err.value.code == "cache_exhausted"
