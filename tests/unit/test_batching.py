"""A host's KV pool accounting, batched decode steps (SpanHost over atoms.kv_pool), and lone
steps computed on the event loop's thread (exec/batching.py Rule 5)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio
import trio.testing

from atoms.batched import BATCH_RTOL, BatchItem
from atoms.codecs import encode
from atoms.span import Span
from nexusd.exec.batching import BatchedStep, StepBatcher
from nexusd.exec.hosting import ExecRefused, SpanHost
from nexusd.exec.in_flight import InFlight
from nexusd.exec.wire import OpenSession, Step, header_of, tensor_of
from nexusd.metrics import Metrics

from .exec_fixtures import tiny_llama

PEER = b"o" * 32
LENGTHS = [3, 7, 2, 12, 5, 9, 2, 16]  # 8 sessions of mixed prompt lengths (prefills of 2+
# tokens run alone: a batch is made of one-token steps)


def make_host(
    span: Span, *, budget: int = 1 << 24, window_s: float = 0.0, inline_max_s: float = 0.0
) -> SpanHost:
    """A host whose clock stands still: every open session counts as recently active."""
    return SpanHost(
        [span],
        kv_budget_bytes=budget,
        max_sessions=16,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
        kv_page_tokens=4,
        batch_window_s=window_s,
        inline_max_s=inline_max_s,
        clock=lambda: 0.0,
    )


def sid(i: int) -> bytes:
    return bytes([i]) * 16


async def open_session(host: SpanHost, i: int, max_len: int = 40) -> None:
    msg = OpenSession(session_id=sid(i), model_id="tiny", start=0, end=6, batch=1, max_len=max_len)
    await host.open(PEER, msg)


async def step(host: SpanHost, i: int, step_id: int, pos: int, ids: list[int]) -> torch.Tensor:
    enc = encode(torch.tensor([ids]))
    msg = Step(
        session_id=sid(i),
        step_id=step_id,
        position=pos,
        causal=True,
        tensor=header_of(enc),
        pad_mask=b"",
    )
    result, out = await host.step(PEER, msg, enc.data)
    return tensor_of(result.tensor, out.data)


def prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 3 * t) % 90 + 1 for t in range(n)]


async def decode_all(
    host: SpanHost, *, together: bool, rounds: int = 4
) -> list[list[torch.Tensor]]:
    """Prefill each session alone, then `rounds` decode steps of all 8 (concurrent or not)."""
    outs: list[list[torch.Tensor]] = [[] for _ in LENGTHS]
    for i, n in enumerate(LENGTHS):
        await open_session(host, i)
        outs[i].append(await step(host, i, 0, 0, prompt(i, n)))

    async def one(i: int, r: int) -> None:
        token = int(outs[i][-1][0, -1].argmax())
        outs[i].append(await step(host, i, r + 1, LENGTHS[i] + r, [token]))

    for r in range(rounds):
        if together:
            async with trio.open_nursery() as nursery:
                for i in range(len(LENGTHS)):
                    nursery.start_soon(one, i, r)
        else:
            for i in range(len(LENGTHS)):
                await one(i, r)
    return outs


async def test_concurrent_decode_steps_run_as_one_batch_and_match_alone() -> None:
    span = tiny_llama()
    alone = await decode_all(make_host(span), together=False)
    host = make_host(span, window_s=10.0)  # the wait ends when all 8 active sessions arrive
    batched = await decode_all(host, together=True)
    for want, got in zip(alone, batched, strict=True):
        assert torch.equal(want[0], got[0])  # a step alone is the unbatched code, bit for bit
        for a, b in zip(want[1:], got[1:], strict=True):
            assert float((a - b).abs().max() / a.abs().max()) <= BATCH_RTOL
    metrics = host._metrics
    assert metrics.value("exec_batches_total") == len(LENGTHS) + 4  # prefills alone, 4 rounds
    assert metrics.value("exec_batched_steps_total") == len(LENGTHS) * 5


async def test_pages_follow_session_length_and_come_back() -> None:
    span = tiny_llama()
    host = make_host(span)
    assert host.kv_pages()[0] == 0
    await open_session(host, 0)
    assert host.kv_pages()[0] == 0  # nothing taken before the first step
    await step(host, 0, 0, 0, prompt(0, 9))  # 9 tokens: 3 pages of 4
    used, total = host.kv_pages()
    assert used == 3 and total == (1 << 24) // host._page_bytes()
    assert host.kv_free_bytes == (total - used) * host._page_bytes()
    await open_session(host, 1)
    await step(host, 1, 0, 0, prompt(1, 2))
    assert host.kv_pages()[0] == 4
    host.close(PEER, sid(0))
    assert host.kv_pages()[0] == 1
    assert host.reclaim_idle(-1.0) == 1  # idle past a negative age: every session
    assert host.kv_pages()[0] == 0


async def test_a_full_pool_refuses_the_step_and_keeps_the_session() -> None:
    span = tiny_llama()
    page = make_host(span)._page_bytes()
    host = make_host(span, budget=4 * page)  # 4 pages of 4 tokens
    await open_session(host, 0, max_len=16)
    await open_session(host, 1, max_len=16)
    await step(host, 0, 0, 0, prompt(0, 12))  # 3 pages
    with pytest.raises(ExecRefused, match="2 pages requested, 1 of 4 free") as info:
        await step(host, 1, 0, 0, prompt(1, 5))
    assert info.value.code == "cache_exhausted"
    host.close(PEER, sid(0))
    out = await step(host, 1, 0, 0, prompt(1, 5))  # the same step, now that pages are free
    assert out.shape == (1, 5, 97)
    with pytest.raises(ExecRefused, match="needs up to 50 pages") as info:
        await open_session(host, 2, max_len=200)  # could never fit in 4 pages
    assert info.value.code == "cache_exhausted"


def test_pool_use_travels_in_the_load_report_and_shows_in_peers() -> None:
    from mesh.state_records import LoadReport
    from nexusd.api.records import PeerRow, PeersReply
    from nexusd.cli.mesh import peers_table

    assert LoadReport(0, 0.0, (), (), 3, 100).kv_pages_used == 3
    with pytest.raises(ValueError, match="kv pages"):
        LoadReport(0, 0.0, (), (), 101, 100)
    row = PeerRow(
        node_id="ab" * 32,
        name="n1",
        roles=(),
        is_self=True,
        connected=True,
        state="online",
        rtt_ms=-1.0,
        hosted=("m:0-4",),
        lease_left_s=1.0,
        queue_depth=0,
        banned=False,
        kv_pages_used=3,
        kv_pages_total=100,
    )
    text = peers_table(PeersReply("mesh", (row,), ()))
    assert "KV pages" in text and "3/100" in text


async def test_a_session_closed_mid_step_gives_its_pages_back_when_the_step_ends() -> None:
    host = make_host(tiny_llama())
    await open_session(host, 0)
    # the device is busy: the step waits, its pages reserved
    async with trio.open_nursery() as nursery, host._limiter:
        nursery.start_soon(step, host, 0, 0, 0, prompt(0, 9))
        await trio.testing.wait_all_tasks_blocked()
        host.close(PEER, sid(0))
        assert host.kv_pages()[0] == 3  # the step will still write them
    assert host.kv_pages()[0] == 0


def lone_step(span: Span, threads: list[int], seconds: float = 0.0) -> BatchedStep:
    """A one-token step whose computation notes the thread it ran on."""

    def single() -> torch.Tensor:
        threads.append(threading.get_ident())
        time.sleep(seconds)
        return torch.zeros(1)

    item = BatchItem(x=torch.zeros(1, 1, 4), position=0, causal=True, pad_mask=None, cache=None)
    return BatchedStep(span=span, item=item, single=single, batchable=True)


async def test_lone_steps_run_on_the_loop_once_measured_fast_and_not_under_company() -> None:
    span = tiny_llama()
    active, threads, loop = [1], [], threading.get_ident()

    def batcher(inline_max_s: float) -> StepBatcher:
        return StepBatcher(
            limiter=trio.CapacityLimiter(1),
            window_s=0.0,
            max_batch=8,
            active=lambda: active[0],
            on_batch=lambda steps, seconds: None,
            inline_max_s=inline_max_s,
        )

    fast = batcher(0.05)
    for _ in range(3):
        await fast.run(lone_step(span, threads))
    # the first step of a shape is measured on a worker; the next ones run on the loop
    assert threads[0] != loop and threads[1:] == [loop, loop] and fast.inline_steps == 2
    active[0] = 2  # company: every step goes to a worker, so arrivals can batch
    await fast.run(lone_step(span, threads))
    assert threads[-1] != loop and fast.inline_steps == 2
    active[0] = 1
    slow = batcher(0.002)  # a shape slower than the bound stays on workers
    for _ in range(3):
        await slow.run(lone_step(span, threads, seconds=0.01))
    never = batcher(0.0)  # 0: never inline
    for _ in range(3):
        await never.run(lone_step(span, threads))
    assert all(t != loop for t in threads[-6:]) and slow.inline_steps == never.inline_steps == 0
    with pytest.raises(ValueError, match="inline_max_s"):
        batcher(-1.0)


async def test_a_step_waits_only_for_the_sessions_that_are_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 1: "a" and "b" step every 100 ms, b 1 ms after a; "d" every 100 ms 50 ms after
    them. At 300 ms (periods known: the gap after a first step does not count) a's step
    waits for b (due) and not for d (due after the window): the batch {a, b} runs at b's
    arrival, not at the window's end. Once b has ended here (`forget`), a's step at 400 ms
    waits for nobody."""
    autojump_clock.autojump_threshold = 0.1  # real seconds idle: worker steps finish first
    span, threads = tiny_llama(), []
    sizes: list[int] = []
    done: dict[tuple[str, int], float] = {}
    batcher = StepBatcher(
        limiter=trio.CapacityLimiter(1),
        window_s=0.010,
        max_batch=8,
        active=lambda: 3,
        on_batch=lambda steps, seconds: sizes.append(steps),
    )
    t0 = trio.current_time()

    async def arrive(session: str, k: int, offset: float) -> None:
        await trio.sleep_until(t0 + 0.1 * k + offset)
        one = torch.ones(1, 1, dtype=torch.long)
        ids = BatchItem(x=one, position=0, causal=True, pad_mask=None, cache=None)
        step = lone_step(span, threads)
        step.item, step.session = ids, session  # token ids: batchable through the span
        await batcher.run(step)
        done[session, k] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(arrive, "a", k, 0.0)
            nursery.start_soon(arrive, "b", k, 0.001)
            nursery.start_soon(arrive, "d", k, 0.05)
    assert done["a", 3] == done["b", 3] == pytest.approx(0.301, abs=1e-3)
    assert sizes[-2:] == [2, 1]  # {a, b}, then d alone
    batcher.forget("b")
    await arrive("a", 4, 0.0)
    assert done["a", 4] == pytest.approx(0.4, abs=1e-3) and sizes[-1] == 1


async def test_a_lone_session_inline_equals_worker_threads_bit_for_bit() -> None:
    span = tiny_llama()
    outs = []
    for inline_max_s in (0.0, 10.0):
        host = make_host(span, inline_max_s=inline_max_s)
        await open_session(host, 0)
        got = [await step(host, 0, 0, 0, prompt(0, 5))]
        for r in range(6):
            token = int(got[-1][0, -1].argmax())
            got.append(await step(host, 0, r + 1, 5 + r, [token]))
        outs.append((got, host._batcher.inline_steps))
    (worker, none), (inline, some) = outs
    assert none == 0 and some == 5  # the prefill and the first decode step ran on workers
    for a, b in zip(worker, inline, strict=True):
        assert torch.equal(a, b)


async def test_a_channels_steps_in_flight_are_bounded_by_count_and_bytes() -> None:
    """A host serves one channel's steps side by side, but reads no further while the
    steps in flight reach `max_sessions` or their payloads the byte budget; a step alone
    is always admitted, whatever its size."""
    slots = InFlight(steps=3, budget_bytes=100)
    await slots.admit(500)  # alone: admitted over the budget
    admitted: list[int] = []

    async def admit(size: int) -> None:
        await slots.admit(size)
        admitted.append(size)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == []  # 500 + 10 > 100
        slots.release(500)
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [10]
        for size in (20, 30):
            await slots.admit(size)
        assert (slots.count, slots.bytes) == (3, 60)
        nursery.start_soon(admit, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [10]  # three in flight: the count bound
        slots.release(20)
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [10, 1] and (slots.count, slots.bytes) == (3, 41)
