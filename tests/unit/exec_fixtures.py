"""Helpers for execution tests: tiny models, in-memory frame streams, a host cluster."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import trio

from atoms.llama import LlamaConfig, build_llama_atoms, init_random
from atoms.span import Span
from mesh.errors import OversizeMessage, TransportBroken
from mesh.hlc import HybridClock
from mesh.identity import EnvelopeVerifier, NodeKey
from nexusd.exec.hosting import SpanHost
from nexusd.exec.session import HopPlan, RemoteHop, RoutedSession
from nexusd.exec.wire import HOST_INBOUND, ORIGIN_INBOUND, ExecChannel, Signer
from nexusd.metrics import Metrics

TINY = LlamaConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def tiny_llama(model_id: str = "tiny") -> Span:
    gen = torch.Generator().manual_seed(0)
    return Span([init_random(a, gen) for a in build_llama_atoms(TINY, model_id=model_id)])


class FakeStream:
    """One end of an in-memory frame stream; `break_()` makes both ends fail."""

    def __init__(
        self,
        out: trio.MemorySendChannel[bytes],
        inp: trio.MemoryReceiveChannel[bytes],
        remote_id: bytes,
        ends: list[trio.abc.AsyncResource],
    ) -> None:
        self._out, self._in, self.remote_id, self._ends = out, inp, remote_id, ends

    def break_(self) -> None:
        """Both directions fail at once, as when a host process dies."""
        for end in self._ends:
            end.close()  # type: ignore[attr-defined]

    async def send(self, payload: bytes) -> None:
        try:
            await self._out.send(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportBroken("stream broken") from None

    async def receive(
        self, *, timeout_s: float | None = None, max_bytes: int | None = None
    ) -> bytes:
        try:
            with trio.fail_after(math.inf if timeout_s is None else timeout_s):
                payload = await self._in.receive()
        except trio.TooSlowError:
            raise TransportBroken("receive deadline passed") from None
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            raise TransportBroken("stream closed") from None
        if max_bytes is not None and len(payload) > max_bytes:
            self.break_()
            raise OversizeMessage(f"frame of {len(payload)} bytes, over the limit of {max_bytes}")
        return payload

    async def aclose(self) -> None:
        await self._out.aclose()


def stream_pair(a_id: bytes, b_id: bytes) -> tuple[FakeStream, FakeStream]:
    ab_send, ab_recv = trio.open_memory_channel[bytes](64)
    ba_send, ba_recv = trio.open_memory_channel[bytes](64)
    ends: list[trio.abc.AsyncResource] = [ab_send, ab_recv, ba_send, ba_recv]
    return FakeStream(ab_send, ba_recv, b_id, ends), FakeStream(ba_send, ab_recv, a_id, ends)


class Node:
    def __init__(
        self, name: str, spans: list[Span], budget: int = 1 << 24, batch_window_s: float = 0.0
    ) -> None:
        self.name = name
        self.key = NodeKey.generate()
        self.id = self.key.node_id
        self.signer = Signer(self.key, HybridClock(max_drift_s=5))
        self.verifier = EnvelopeVerifier(
            clock=self.signer.clock, window_s=60, max_body_bytes=1 << 20, replay_capacity=10_000
        )
        self.metrics = Metrics()
        self.host = SpanHost(
            spans,
            kv_budget_bytes=budget,
            max_sessions=8,
            limiter=trio.CapacityLimiter(1),
            metrics=self.metrics,
            batch_window_s=batch_window_s,
        )
        self.streams: list[FakeStream] = []


class Cluster:
    """An origin plus hosts; `make_hop` connects the origin to a host in memory."""

    def __init__(self, nursery: trio.Nursery, hosts: list[Node], *, forward: bool = False) -> None:
        self.nursery = nursery
        self.forward = forward  # sessions in forward mode; hosts dial each other in memory
        self.origin = Node("origin", [])
        self.hosts: dict[bytes, Node] = {h.id: h for h in hosts}
        self.members = {self.origin.id, *self.hosts}
        self.failures: list[tuple[bytes, str]] = []  # (host, reason)
        self.penalties: list[tuple[bytes, str]] = []  # (host, what it is scored for)
        for h in hosts:
            h.host.dial = partial(self.dial, h)

    async def dial(self, src: Node, dst_id: bytes) -> ExecChannel:
        """A host's channel to another host (forward mode), served by that host."""
        dst = self.hosts[dst_id]
        s_end, d_end = stream_pair(src.id, dst.id)
        src.streams.append(s_end)
        dst.streams.append(d_end)
        s_ch = ExecChannel(s_end, src.signer, src.verifier, self.is_member, ORIGIN_INBOUND)
        d_ch = ExecChannel(d_end, dst.signer, dst.verifier, self.is_member, HOST_INBOUND)
        self.nursery.start_soon(self._serve, dst, d_ch)
        return s_ch

    def is_member(self, node_id: bytes) -> bool:
        return node_id in self.members

    async def make_hop(self, plan: HopPlan) -> RemoteHop:
        host = self.hosts[plan.host]
        o_end, h_end = stream_pair(self.origin.id, host.id)
        host.streams.append(h_end)
        o_ch = ExecChannel(
            o_end, self.origin.signer, self.origin.verifier, self.is_member, ORIGIN_INBOUND
        )
        h_ch = ExecChannel(h_end, host.signer, host.verifier, self.is_member, HOST_INBOUND)
        self.nursery.start_soon(self._serve, host, h_ch)
        return RemoteHop(plan, "tiny", o_ch, step_timeout_s=5)

    async def _serve(self, host: Node, ch: ExecChannel) -> None:
        try:
            await host.host.serve(ch, idle_timeout_s=30)
        except TransportBroken:
            pass

    def report(self, host: bytes, penalty: str, reason: str) -> None:
        self.failures.append((host, reason))
        self.penalties.append((host, penalty))

    def session(
        self,
        plan: Callable[[int, int, frozenset[bytes]], list[HopPlan]],
        *,
        max_len: int = 32,
        last_only: bool = False,
    ) -> RoutedSession:
        """A batch-1 session over the tiny model's 6 atoms, hops opened in this cluster."""
        return RoutedSession(
            n_atoms=6,
            plan=plan,
            make_hop=self.make_hop,
            report_failure=self.report,
            batch=1,
            max_len=max_len,
            forward=self.forward,
            last_only=last_only,
        )

    def planner(
        self, layout: list[tuple[int, int, list[bytes]]]
    ) -> Callable[[int, int, frozenset[bytes]], list[HopPlan]]:
        """Static layout: (start, end, hosts in preference order) per span."""

        def plan(start: int, end: int, excluded: frozenset[bytes]) -> list[HopPlan]:
            out = []
            for s, e, hosts in layout:
                if e <= start or s >= end:
                    continue
                alive = [h for h in hosts if h not in excluded]
                if not alive:
                    raise LookupError(f"no host for [{s},{e})")
                out.append(HopPlan(alive[0], max(s, start), min(e, end)))
            return out

        return plan
