"""The origin's side of a job: a session routed through the hosts of several spans.

Rule 1: the origin keeps every input it sent to each hop. When a hop fails (stream broken,
deadline passed, refusal, or invalid output), its host is reported (ban with backoff), only
that hop's span is re-planned, the stored inputs are replayed through the replacement so
its KV caches are rebuilt, and the step continues: the result equals a run without the
failure (replay uses the very same step shapes, so caches are bit-identical, given the
exact `raw` codec and a replacement of the same dtype).
Rule 2: outputs are checked before use by the hops themselves (`hops.py`: decodable,
finite, the input's batch/token shape), and every step reports, per hop, compute, queue
and transfer time. The hop types are re-exported here, where callers import them.
Rule 3: the step loop and failover live here; the hops (`RemoteHop`, `LocalHop`) in
`hops.py`.
Rule 4: sampled steps are spot-checked (`verify.VerifyPolicy`): the same input goes to a
second replica of the hop's span (or, when there is none, to the origin's own computation,
the arbiter); if the two disagree the arbiter decides, a host that disagrees with it is
blamed with "wrong_output" and failed over like any other failure, so the step continues
with the honest output.
Rule 5: a replacement's replay is itself a check. A host's first steps in a session are
checked (Rule 4), but a replacement that has just replayed the session's stored steps is
compared on all of them at no extra cost: its outputs against what the failed host gave
(the next hop's stored inputs; for the model's last hop of a generation, the token each
step gave). If every step agrees within the check's tolerance, the replacement is vouched
for and its first steps are not checked again (the sampled ones still are); if not, they
are checked as a new host's would be.
Rule 6: a sampled check (not one of a host's first steps) whose judge would be the origin's
own computation of a span it has not loaded is deferred, not made to wait for the load: the
step goes on unchecked, the judge loads in the background (`Verification.judge_ready`), and
the hop owes a check that its first step after the load gets. A first-steps check still
waits for its judge.
Rule 7 (checks beside the stream): a session given `spawn` (a generation's) does not hold a
step for its checks: it runs as an unchecked one would (host to host, in its hosts'
batches), each sampled hop's history and output are checked in a task of their own, and the
step is `confirmed` once its checks and those of every step before it have passed; the
caller releases nothing unconfirmed (the engine holds its tokens back). A lie found fails
every liar found over as in Rule 4; the next `step` (or `settle`) raises `CheckFailed`, the
steps from the lying one on are void, and the caller reruns the job on a fresh session
(`excluded`, `failovers` carry over). An honest mesh never waits for a check (a sampled
one re-runs the hop's whole history as one prefill). At most `MAX_BESIDE` checks of a
session run at once (each holds a prefill's memory); beyond that a step's are held.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import torch
import trio

from atoms.errors import AtomError

from ..errors import NexusError
from .hops import HONEST_REFUSALS as HONEST_REFUSALS
from .hops import Hop as Hop
from .hops import HopFailed as HopFailed
from .hops import HopPlan as HopPlan
from .hops import HopTiming as HopTiming
from .hops import HopTotals as HopTotals
from .hops import LocalHop as LocalHop
from .hops import RemoteHop as RemoteHop
from .hops import StepInput as StepInput
from .hops import first_hop_failure as first_hop_failure
from .hops import protocol_penalty as protocol_penalty
from .hops import raw_bytes
from .hops import refused as refused
from .verify import Arbiter as Arbiter
from .verify import Opinion, difference, joined_steps, last_tokens, next_token
from .verify import Verification as Verification

log = structlog.get_logger(__name__)
MAX_BESIDE = 4  # checks one session runs beside its stream at once (Rule 7)


class JobFailed(NexusError):
    """The job cannot complete (no route left, input rejected, too many failovers)."""


class CheckFailed(JobFailed):
    """A check beside the stream (Rule 7) found a host's output wrong at step `step`: that
    step and every later one are void. The caller reruns on a fresh session."""

    def __init__(
        self, message: str, *, step: int, excluded: frozenset[bytes], failovers: tuple[str, ...]
    ) -> None:
        super().__init__(message)
        self.step = step
        self.excluded = excluded  # the session's, the liar among them
        self.failovers = failovers


Planner = Callable[[int, int, frozenset[bytes]], list[HopPlan]]
HopFactory = Callable[[HopPlan], Awaitable[Hop]]
FailureReporter = Callable[[bytes, str, str], None]  # (host, penalty, reason)


@dataclass(slots=True, kw_only=True)
class _Live:
    hop: Hop
    history: list[StepInput] = field(default_factory=list)  # only for sessions with a KV cache
    next_id: int = 0  # the step id of the next step sent on this hop's session
    steps: int = 0  # timed steps (not replays), for the average below
    compute_s: float = 0.0  # summed over timed steps: the replay deadline scales with it
    # the model's last hop of a last_only session with a KV cache: each applied step's
    # next token (int64 (B,)), what a replacement's replay is compared with (Rule 5)
    tokens: list[torch.Tensor] = field(default_factory=list)
    vouched: bool = False  # its replay agreed with the failed host's outputs (Rule 5)
    owed: bool = False  # a sampled check was deferred while its judge loaded (Rule 6)
    watch: bool = False  # the current step is checked beside the stream (Rule 7)
    out: torch.Tensor | None = None  # ... and this was its output

    @property
    def per_step_s(self) -> float:
        return self.compute_s / self.steps if self.steps else 0.05


@dataclass(eq=False, slots=True, kw_only=True)
class _Beside:
    """A check beside the stream (Rule 7): hop `live`'s `out` at step `step`, from `inputs`."""

    step: int
    live: _Live
    inputs: list[StepInput]
    out: torch.Tensor
    last: bool
    deferrable: bool
    done: trio.Event = field(default_factory=trio.Event)
    failure: HopFailed | None = None


class RoutedSession:
    """A job's chain of hops over atoms [0, n_atoms), with failover and replay.

    Args:
        n_atoms: atoms of the model; the hops cover [0, n_atoms) contiguously.
        plan: (start, end, excluded hosts) -> hops covering [start, end).
        make_hop: opens the transport to a hop's host.
        report_failure: called with (host, penalty, reason) on each blamed failure (the
            daemon scores `penalty` against the host, which may ban it).
        batch, max_len: session shape (max_len 0: no KV cache).
        max_failovers: failures tolerated in this session before the job fails.
        on_route: told (hops, reason) when the route is set up and after each reroute.
        verify: spot-checks of hop outputs; None: none.
        forward: forward mode (wire Rule 5): a step goes to the first host with the rest of
            the route and each host sends its output straight to the next; every host also
            sends the origin a copy, which is what failover replays and spot checks use.
            A step with a sampled hop, or with a hop on this node, runs in relay mode.
        last_only: the last hop returns its output's last position only (wire Rule 6,
            "last"; its LM head projects no other): a generation reads no other, and a
            spot check of the last hop then compares that position alone.
        spawn: starts a task (a nursery's `start_soon`) for each check beside the stream
            (Rule 7; a session with a KV cache); None: checks hold their step (Rule 4).
        excluded, failovers: carried over from a session this one reruns (Rule 7).
    """

    def __init__(
        self,
        *,
        n_atoms: int,
        plan: Planner,
        make_hop: HopFactory,
        report_failure: FailureReporter,
        batch: int,
        max_len: int,
        max_failovers: int = 4,
        on_route: Callable[[list[HopPlan], str], None] | None = None,
        verify: Verification | None = None,
        forward: bool = False,
        last_only: bool = False,
        spawn: Callable[..., object] | None = None,
        excluded: frozenset[bytes] = frozenset(),
        failovers: tuple[str, ...] = (),
    ) -> None:
        self._n = n_atoms
        self._forward = forward
        self._last_only = last_only
        self._verify = verify if verify is not None and verify.policy.enabled else None
        self._plan = plan
        self._make_hop = make_hop
        self._report = report_failure
        self._batch = batch
        self._max_len = max_len
        self._budget = max_failovers
        self._excluded: set[bytes] = set(excluded)
        self._hops: list[_Live] = []
        self._while_waiting: Callable[[], Awaitable[None]] | None = None
        self.failovers: list[str] = list(failovers)
        self._on_route = on_route
        self._spawn = spawn if self._verify is not None and max_len > 0 else None
        self._beside: list[_Beside] = []  # Rule 7: checks not yet passed
        self._steps = 0  # steps done
        self._void_from = 2**63  # the earliest step a check found a lie in (Rule 7)
        self._caught: set[bytes] = set()  # hosts failed over for a wrong output

    @property
    def excluded(self) -> frozenset[bytes]:  # hosts no longer used (failed, lied, refused)
        return frozenset(self._excluded)

    @property
    def confirmed(self) -> int:
        """Steps every check of which, and of every step before them, has passed (Rule 7):
        all steps done when no check is running beside the stream."""
        return min(self._void_from, *(c.step for c in self._beside), self._steps)

    @property
    def route(self) -> list[HopPlan]:
        return [live.hop.plan for live in self._hops]

    async def open(self) -> None:
        self._hops = await self._open_chain(0, self._n)
        if self._on_route is not None:
            self._on_route(self.route, "opened")

    async def _open_chain(self, start: int, end: int) -> list[_Live]:
        while True:
            plans = self._plan(start, end, frozenset(self._excluded))
            opened: list[_Live] = []
            try:
                for p in plans:
                    hop = await self._make_hop(p)
                    opened.append(_Live(hop=hop))
                    await hop.open(self._batch, self._max_len)
                return opened
            except HopFailed as exc:
                await _close_all(opened)
                self._fail(exc)
            except BaseException:  # cleanup, then re-raise: not a boundary
                await _close_all(opened)
                raise

    def _fail(self, exc: HopFailed) -> None:
        if exc.penalty == "wrong_output":
            self._caught.add(exc.host)
        if exc.blame:
            self._report(exc.host, exc.penalty, exc.reason)
        if not exc.retryable:
            raise JobFailed(str(exc)) from exc
        self._excluded.add(exc.host)
        self.failovers.append(str(exc))
        log.warning("hop_failed", host=exc.host.hex()[:8], reason=exc.reason)
        if len(self.failovers) > self._budget:
            raise JobFailed(f"gave up after {len(self.failovers)} failovers; last: {exc}")

    async def step(
        self,
        inp: StepInput,
        *,
        argmax_vocab: int = 0,
        while_waiting: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[torch.Tensor, list[HopTiming]]:
        """Run one step through every hop; fail over hops that fail.

        Args:
            argmax_vocab: > 0 asks the last hop for the int64 (B,) argmax of its output's
                last position instead of the logits (wire Rule 6), checked to lie in
                [0, argmax_vocab). A step whose last hop is spot-checked gets the full
                logits anyway (the check compares them): an int64 output says it was reduced.
            while_waiting: awaited once per step: in forward mode as soon as the step has
                left for the hosts (the origin's own work, e.g. streaming the last token,
                then costs nothing on the critical path), else when the step is done.
        """
        self._raise_failed_check()
        self._while_waiting = while_waiting
        try:
            out, timings = await self._step(inp, argmax_vocab)
            await self._waited()
        finally:
            self._while_waiting = None
        self._steps += 1
        return out, timings

    async def settle(self) -> None:
        """Wait for every check beside the stream (Rule 7); CheckFailed if one found a lie."""
        for check in list(self._beside):
            await check.done.wait()
        self._raise_failed_check()

    async def _waited(self) -> None:
        """Run the step's `while_waiting` unless it ran already."""
        waiting, self._while_waiting = self._while_waiting, None
        if waiting is not None:
            await waiting()

    async def _step(
        self, inp: StepInput, argmax_vocab: int
    ) -> tuple[torch.Tensor, list[HopTiming]]:
        # held until the step returns: their ids key `picks`, and a replaced hop collected
        # mid-step could hand its id to its replacement
        lives = list(self._hops)
        picks = {id(live): self._sampled(live) for live in lives}
        beside: list[tuple[_Live, bool]] = []
        # Rule 7, while fewer than MAX_BESIDE checks run (else this step's are held, Rule 4)
        if self._spawn is not None and any(picks.values()) and len(self._beside) < MAX_BESIDE:
            beside = [(live, self._deferrable(live)) for live in lives if picks[id(live)]]
            picks = dict.fromkeys(picks, False)
            for live, _ in beside:
                live.watch = True  # `_applied` keeps its output
            if lives[-1].watch:
                argmax_vocab = 0  # the check compares the last hop's logits
        try:
            done = await self._step_on(inp, argmax_vocab, lives, picks)
        except BaseException:  # no check of a step that did not complete: not a boundary
            for live, _ in beside:
                live.watch, live.out = False, None
            raise
        self._check_beside(beside)
        return done

    async def _step_on(
        self, inp: StepInput, argmax_vocab: int, lives: list[_Live], picks: dict[int, bool]
    ) -> tuple[torch.Tensor, list[HopTiming]]:
        timings: list[HopTiming] = []
        if not self._forward or any(picks.values()):
            return (await self._relay(inp, 0, None, timings, picks, argmax_vocab)).x, timings
        x, i = inp, 0
        while i < len(self._hops):  # runs of 2+ remote hops forward; the rest relays
            run = 0
            while i + run < len(self._hops) and self._forwards_to(i, run):
                run += 1
            size = run if run >= 2 else 1
            stop = self._hops[i + size] if i + size < len(self._hops) else None
            if run >= 2:
                x = await self._forward_run(x, i, run, stop, timings, picks, argmax_vocab)
            else:
                x = await self._relay(x, i, stop, timings, picks, argmax_vocab)
            i = len(self._hops) if stop is None else self._hops.index(stop)
        return x.x, timings

    def _forwards_to(self, i: int, run: int) -> bool:
        """Whether hop i + run can join the forward run that starts at hop i: it is remote,
        and not on the same host as the hop before it (a host never forwards to itself: two
        spans one host serves in a row are two relayed hops)."""
        hop = self._hops[i + run].hop
        if not isinstance(hop, RemoteHop):
            return False
        return run == 0 or self._hops[i + run - 1].hop.plan.host != hop.plan.host

    async def _relay(
        self,
        x: StepInput,
        i: int,
        stop: _Live | None,
        timings: list[HopTiming],
        picks: dict[int, bool],
        argmax_vocab: int,
    ) -> StepInput:
        """The step from hop i up to `stop` (None: the end), each hop's input sent by the
        origin (relay mode); a failed hop is replaced and the step goes on from it. The
        last hop reduces its output when `argmax_vocab` > 0, unless it is spot-checked."""
        while i < len(self._hops) and self._hops[i] is not stop:
            live = self._hops[i]
            sampled = picks.pop(id(live), None)
            final = live is self._hops[-1]
            vocab = argmax_vocab if final else 0
            last = self._last_only and final
            try:
                if sampled if sampled is not None else self._sampled(live):
                    out, timing = await self._checked_step(live, x, last)
                else:
                    out, timing = await live.hop.step(
                        live.next_id, x, argmax_vocab=vocab, last_only=last
                    )
            except HopFailed as exc:
                self._fail(exc)
                await self._replace(i)
                continue  # the same step again, on the replacement
            self._applied(live, x, timing, out)
            timings.append(timing)
            x = StepInput(out, x.position, x.causal, x.pad_mask)
            i += 1
        return x

    def _applied(self, live: _Live, x: StepInput, timing: HopTiming, out: torch.Tensor) -> None:
        if self._max_len > 0:  # a KV cache to rebuild on failover: keep what built it
            live.history.append(x)
            if self._last_only and live is self._hops[-1]:
                live.tokens.append(next_token(out))
        live.next_id += 1
        live.steps += 1
        live.compute_s += timing.compute_s + timing.queue_s
        if live.watch:  # checked beside the stream (Rule 7)
            live.out = out

    async def _forward_run(
        self,
        x: StepInput,
        i: int,
        run: int,
        stop: _Live | None,
        timings: list[HopTiming],
        picks: dict[int, bool],
        argmax_vocab: int,
    ) -> StepInput:
        """Hops [i, i + run), all remote, in forward mode: the step goes to hop i with the
        rest of the run as its route. Copies arrive in route order; the first hop that fails
        (or whose host could not forward) is failed over as in relay mode and the step
        continues from it in relay mode: the hops before it applied the step (their copies
        are here), the hops after it are asked again by step id, so one that did apply it
        answers from its stored result (reduced as asked here: the same `picks` keep them
        unchecked). A run to the route's end has its last host reduce (wire Rule 6)."""
        lives = self._hops[i : i + run]
        remote = [live.hop for live in lives if isinstance(live.hop, RemoteHop)]
        assert len(remote) == run
        route = tuple(
            hop.forward_target(live.next_id)
            for live, hop in zip(lives[1:], remote[1:], strict=True)
        )
        vocab = argmax_vocab if stop is None else 0  # the run ends at the model's last hop
        last = self._last_only and stop is None
        try:
            sent, error = await remote[0].send_forward(
                lives[0].next_id, x, route, argmax=vocab > 0, last_only=last
            )
        except HopFailed as exc:
            self._fail(exc)
            await self._replace(i)
            return await self._relay(x, i, stop, timings, picks, argmax_vocab)
        before = trio.current_time()
        await self._waited()  # the hosts compute meanwhile; replies wait in the stream
        for j, (live, hop) in enumerate(zip(lives, remote, strict=True)):
            try:
                out, reply, got = await hop.receive_forwarded(
                    live.next_id,
                    x.x,
                    argmax_vocab=vocab if j == run - 1 else 0,
                    last_only=last and j == run - 1,
                )
            except HopFailed as exc:
                self._fail(exc)
                await self._replace(i + j)
                return await self._relay(x, i + j, stop, timings, picks, argmax_vocab)
            now = trio.current_time()
            timing = HopTiming(
                host=hop.plan.host,
                start=hop.plan.start,
                end=hop.plan.end,
                compute_s=reply.compute_s,
                queue_s=reply.queue_s,
                transfer_s=max(0.0, now - before - reply.compute_s - reply.queue_s),
                bytes_out=sent if j == 0 else 0,
                bytes_in=got,
                codec=hop.codec,
                bytes_saved=(raw_bytes(x.x) - sent if j == 0 else 0) + raw_bytes(out) - got,
                wire_error=error if j == 0 else 0.0,
            )
            before = now
            self._applied(live, x, timing, out)
            timings.append(timing)
            x = StepInput(out, x.position, x.causal, x.pad_mask)
            if reply.forward_error and j + 1 < run:
                log.info(
                    "forward_fell_back", host=hop.plan.host.hex()[:8], reason=reply.forward_error
                )
                return await self._relay(x, i + j + 1, stop, timings, picks, argmax_vocab)
        return x

    # ---- spot checks (Rule 4) -------------------------------------------------------------

    def _sampled(self, live: _Live) -> bool:
        v = self._verify
        if v is None or live.hop.plan.host == v.trusted:
            return False
        if live.owed:  # Rule 6: checked once its judge has loaded
            return self._judge_ready(live.hop.plan)
        return v.policy.sampled(self._checked_steps(live), v.rng)

    def _checked_steps(self, live: _Live) -> int:
        """The steps `live` counts towards its first checked ones (Rule 5: a vouched
        replacement has had them)."""
        v = self._verify
        assert v is not None
        return max(live.steps, v.policy.first_steps) if live.vouched else live.steps

    def _judge_ready(self, plan: HopPlan) -> bool:
        v = self._verify
        return v is None or v.judge_ready is None or v.judge_ready(plan.start, plan.end)

    def _deferrable(self, live: _Live) -> bool:
        """Whether a check of `live`'s next step may be deferred (Rule 6): not a first one."""
        return (
            self._verify is not None
            and self._checked_steps(live) >= self._verify.policy.first_steps
        )

    def _check_inputs(self, live: _Live, x: StepInput) -> list[StepInput]:
        """What a fresh session needs to give this step's output: this step alone without a
        KV cache; else the stored inputs and this one as ONE step (`joined_steps`)."""
        return joined_steps([*live.history, x] if self._max_len > 0 else [x])

    # ---- checks beside the stream (Rule 7) --------------------------------------------------

    def _check_beside(self, picked: list[tuple[_Live, bool]]) -> None:
        """Start the checks of the step just done on the `picked` hops (not those failed over
        in it: their replacements replayed, Rule 5)."""
        assert self._spawn is not None or not picked
        for live, deferrable in picked:
            out, live.out, live.watch = live.out, None, False
            if out is None or self._spawn is None:
                continue
            check = _Beside(
                step=self._steps,
                live=live,
                inputs=joined_steps(list(live.history)),
                out=out,
                last=self._last_only and live is self._hops[-1],
                deferrable=deferrable,
            )
            self._beside.append(check)
            self._spawn(self._run_beside, check)

    async def _run_beside(self, check: _Beside) -> None:
        live = check.live
        try:
            opinion = await self._second_opinion(
                live.hop.plan, check.inputs, live.per_step_s, check.last, check.deferrable
            )
            await self._verdict(live, check.inputs, check.out, opinion, check.last)
        except HopFailed as exc:
            check.failure = exc
        finally:
            check.done.set()
            if check.failure is None and check in self._beside:  # passed: it holds nothing
                self._beside.remove(check)

    def _raise_failed_check(self) -> None:
        """CheckFailed for the earliest step a check beside the stream found a lie in, once
        every liar found is failed over (reported, excluded, counted); JobFailed instead
        when that exhausts the failover budget. Either way no step from the earliest lie on
        is ever confirmed."""
        failed = sorted((c for c in self._beside if c.failure is not None), key=lambda c: c.step)
        if not failed:
            return
        check = failed[0]
        self._void_from = min(self._void_from, check.step)
        self._beside.clear()  # the checks still running judge void steps
        exhausted: JobFailed | None = None
        for lie in failed:
            assert lie.failure is not None
            if lie.failure.host in self._caught:
                continue  # a liar caught on several steps (or held, Rule 4) fails over once
            try:
                self._fail(lie.failure)
            except JobFailed as exc:  # over the budget: the liars after it are still reported
                exhausted = exhausted or exc
        if exhausted is not None:
            raise exhausted
        raise CheckFailed(
            f"step {check.step} is void: {check.failure}",
            step=check.step,
            excluded=self.excluded,
            failovers=tuple(self.failovers),
        )

    async def _verdict(
        self,
        live: _Live,
        inputs: list[StepInput],
        out: torch.Tensor,
        opinion: Opinion | None,
        last: bool,
    ) -> None:
        """Judge `live`'s `out` against the second `opinion` (HopFailed if it lied), or, with
        no opinion (Rule 6, deferred), owe a check once the judge has loaded."""
        if opinion is None:
            if not live.owed:
                log.info("verify_deferred", host=live.hop.plan.host.hex()[:8])
            live.owed = True
            self._outcome("deferred")
            return
        live.owed = False
        await self._judge(live.hop.plan, inputs, out, opinion, last)

    # ---- checks that hold their step (Rule 4) -------------------------------------------------

    async def _checked_step(
        self, live: _Live, x: StepInput, last: bool
    ) -> tuple[torch.Tensor, HopTiming]:
        """The hop's step, and at the same time the same step elsewhere (a second replica,
        or the origin's own computation); HopFailed("wrong_output") if the hop lied.
        `last`: the hop's output is its last position only, and so is the one it is
        compared with (the model's last hop in a generation)."""
        inputs = self._check_inputs(live, x)
        deferrable = self._deferrable(live)  # Rule 6
        done: list[tuple[torch.Tensor, HopTiming]] = []
        opinion: list[Opinion | None] = []

        async def run_opinion() -> None:
            plan, per_step_s = live.hop.plan, live.per_step_s
            opinion.append(await self._second_opinion(plan, inputs, per_step_s, last, deferrable))

        async def run_step() -> None:
            done.append(await live.hop.step(live.next_id, x, last_only=last))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_step)
                nursery.start_soon(run_opinion)
        except BaseExceptionGroup as group:  # the hop's own failure, as from an unchecked step
            failure = first_hop_failure(group)
            if failure is None:
                raise
            raise failure from None
        out, timing = done[0]
        await self._verdict(live, inputs, out, opinion[0], last)
        return out, timing

    async def _judge(
        self,
        plan: HopPlan,
        inputs: list[StepInput],
        out: torch.Tensor,
        opinion: Opinion,
        last: bool,
    ) -> None:
        v = self._verify
        assert v is not None
        ref, replica, is_truth = opinion
        if ref is not None and not is_truth:
            ref = last_tokens(ref, out)
            if difference(out, ref) <= v.policy.tolerance(out.dtype, ref.dtype, v.codec):
                self._outcome("agreed")
                return
            truth = await self._own(plan, inputs, last)  # they disagree: the origin decides
            if truth is not None:
                truth = last_tokens(truth, out)
                wrong = difference(ref, truth)
                if replica is not None and wrong > v.policy.tolerance(
                    ref.dtype, truth.dtype, v.codec
                ):
                    self._excluded.add(replica)  # the replica lied: it serves this session no more
                    self._report(
                        replica,
                        "wrong_output",
                        f"verification replica of atoms "
                        f"[{plan.start},{plan.end}) off by {wrong:.2e} from the origin's own output",
                    )
                    self._outcome("wrong_output")
        else:
            truth = None if ref is None else last_tokens(ref, out)
        if truth is None:
            self._outcome("undecided")
            return
        diff = difference(out, truth)
        tol = v.policy.tolerance(out.dtype, truth.dtype, v.codec)
        if diff > tol:
            self._outcome("wrong_output")
            raise HopFailed(
                plan.host,
                f"wrong output on atoms [{plan.start},{plan.end}): off by "
                f"{diff:.2e} (tolerance {tol:.1e}) from the origin's own "
                f"computation",
                penalty="wrong_output",
            )
        self._outcome("agreed")

    async def _own(self, plan: HopPlan, inputs: list[StepInput], last: bool) -> torch.Tensor | None:
        """The origin's own output (the arbiter); None when it cannot compute it."""
        v = self._verify
        assert v is not None
        try:
            return await v.arbiter(plan.start, plan.end, inputs, self._batch, self._max_len, last)
        except (HopFailed, NexusError, AtomError) as exc:
            log.warning(
                "verify_undecided",
                host=plan.host.hex()[:8],
                start=plan.start,
                end=plan.end,
                reason=f"arbiter failed: {exc}",
            )
            return None

    async def _own_opinion(
        self, plan: HopPlan, inputs: list[StepInput], last: bool, deferrable: bool
    ) -> Opinion | None:
        """The origin's own output as the second opinion; None (deferred, Rule 6) when the
        check is `deferrable` and its judge is not loaded yet."""
        if deferrable and not self._judge_ready(plan):
            return None
        return await self._own(plan, inputs, last), None, True

    async def _second_opinion(
        self,
        plan: HopPlan,
        inputs: list[StepInput],
        per_step_s: float,
        last: bool,
        deferrable: bool = False,
    ) -> Opinion | None:
        """Another replica's output of `plan`'s span on `inputs` and its host (None when the
        span's other hosts form a chain); with no other replica, the origin's own output;
        None (deferred, Rule 6) when that is needed, `deferrable`, and not ready."""
        try:
            plans = self._plan(plan.start, plan.end, frozenset({*self._excluded, plan.host}))
        except (NexusError, LookupError):  # nobody else hosts it: the origin is the second opinion
            return await self._own_opinion(plan, inputs, last, deferrable)
        chain: list[_Live] = []
        try:
            xs = inputs
            for p in plans:
                hop = await self._make_hop(p)
                chain.append(_Live(hop=hop))
                await hop.open(self._batch, self._max_len)
                final = last and p is plans[-1]
                outs = await hop.replay(0, xs, per_step_s=per_step_s, last_only=final)
                xs = [
                    StepInput(o, s.position, s.causal, s.pad_mask)
                    for o, s in zip(outs, xs, strict=True)
                ]
        except HopFailed as exc:  # the verifier failed, not the checked host
            if exc.blame:
                self._report(exc.host, exc.penalty, exc.reason)
            self._excluded.add(exc.host)
            log.info("verify_replica_failed", host=exc.host.hex()[:8], reason=exc.reason)
            return await self._own_opinion(plan, inputs, last, deferrable)
        finally:
            await _close_all(chain)
        return xs[-1].x, (plans[0].host if len(plans) == 1 else None), False

    def _outcome(self, outcome: str) -> None:
        v = self._verify
        if v is not None and v.on_check is not None:
            v.on_check(outcome)

    async def _replace(self, i: int) -> None:
        """Swap hop i for a fresh chain over its span and replay its stored inputs."""
        old = self._hops[i]
        await old.hop.close()
        final = old is self._hops[-1]
        while True:
            new = await self._open_chain(old.hop.plan.start, old.hop.plan.end)
            try:
                xs = list(old.history)
                for live in new:  # the same step shapes as before: bit-identical caches
                    outs = await live.hop.replay(
                        live.next_id,
                        xs,
                        per_step_s=old.per_step_s,
                        last_only=final and self._last_only and live is new[-1],
                    )
                    live.history.extend(xs)
                    live.next_id += len(xs)
                    xs = [
                        StepInput(o, x.position, x.causal, x.pad_mask)
                        for o, x in zip(outs, xs, strict=True)
                    ]
            except HopFailed as exc:
                await _close_all(new)
                self._fail(exc)
                continue
            except BaseException:  # cleanup, then re-raise: not a boundary
                await _close_all(new)
                raise
            if final:
                new[-1].tokens = list(old.tokens)
            self._vouch(i, new, [x.x for x in xs])
            self._hops[i : i + 1] = new
            if self._on_route is not None:
                self._on_route(self.route, self.failovers[-1] if self.failovers else "rerouted")
            log.info(
                "span_rerouted",
                start=old.hop.plan.start,
                end=old.hop.plan.end,
                replayed=len(old.history),
                hosts=[lv.hop.plan.host.hex()[:8] for lv in new],
            )
            return

    def _vouch(self, i: int, new: list[_Live], outs: list[torch.Tensor]) -> None:
        """Rule 5: vouch for the chain `new` replacing hop i when its replayed `outs` agree
        with what the failed host gave at every stored step."""
        v = self._verify
        if v is None or not outs:
            return
        if i + 1 < len(self._hops):  # the failed host's outputs: the next hop's inputs
            given = [x.x for x in self._hops[i + 1].history]
            mine = outs
        elif self._last_only:
            given, mine = new[-1].tokens, [next_token(o) for o in outs]
        else:
            return  # nothing of the failed host's outputs is kept to compare with
        agreed = len(given) == len(mine) and all(
            difference(a, b) <= v.policy.tolerance(a.dtype, b.dtype, v.codec)
            for a, b in zip(mine, given, strict=True)
        )
        log.info("replay_compared", steps=len(mine), agreed=agreed)
        if agreed:
            for live in new:
                live.vouched = True
            self._outcome("replay_agreed")

    async def close(self) -> None:
        await _close_all(self._hops)


async def _close_all(hops: list[_Live]) -> None:
    """Close hops (each close is shielded and bounded), e.g. on the way out of a cancel."""
    for live in hops:
        await live.hop.close()
