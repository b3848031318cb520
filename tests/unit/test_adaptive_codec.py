"""`--codec auto`: each hop's codec follows its measured link (raw on a fast or unmeasured
link, the lossy slow-link codec on a slow one), and the job's output stays close."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trio

from mesh import wire
from mesh.routing import Link
from nexusd.api.records import HopReport
from nexusd.cli.output import wire_summary
from nexusd.config import ConfigError, load_config
from nexusd.errors import ApiError
from nexusd.exec.adaptive import (
    AUTO,
    CPU_COSTS,
    ERROR_BOUND,
    CodecCost,
    CodecPolicy,
    choose,
    codec_policy_of,
    hop_codec,
    link_bandwidth,
    step_seconds,
)
from nexusd.exec.session import RoutedSession, StepInput
from nexusd.jobs.costs import HopCosts
from nexusd.jobs.engine import JobEngine, _check_codec
from nexusd.metrics import Metrics
from nexusd.model_registry import ModelRegistry

from .exec_fixtures import Node
from .test_verify import PROMPT, STEPS, MemView, honest_logits, spans

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
POLICY = CodecPolicy(slow_bytes_per_s=1e6, slow_codec="int8")


def link(src: bytes, dst: bytes, bw: float) -> Link:
    return Link(src, dst, rtt_s=0.01, bandwidth_bytes_per_s=bw)


MB = 1_572_864  # one embed micro-batch's activations: 32 x 32 tokens x 384 float32


def test_slow_links_get_the_slow_codec_and_fast_or_unmeasured_ones_raw() -> None:
    links = [link(A, B, 50e6), link(C, A, 0.5e6), link(A, C, 80e6)]
    assert hop_codec(AUTO, links, A, B, POLICY, MB) == "raw"
    assert hop_codec(AUTO, links, A, C, POLICY, MB) == "int8"  # the slower direction counts
    assert hop_codec(AUTO, [], A, B, POLICY, MB) == "raw"  # never measured: not assumed slow
    assert hop_codec("bf16", links, A, C, POLICY, MB) == "bf16"  # a fixed job codec is kept
    assert link_bandwidth(links, A, C) == 0.5e6 and link_bandwidth(links, B, C) is None


def test_a_fast_link_stays_raw() -> None:
    # 1 Gbit/s: above the slow-link line, and the codecs' CPU time would cost more than
    # the bytes they save even where the line is lifted (Rule 2 alone)
    assert choose(MB, 0.001, 125e6, CodecPolicy()) == "raw"
    unlimited = CodecPolicy(slow_bytes_per_s=math.inf)
    assert choose(MB, 0.001, 1.25e9, unlimited) == "raw"
    raw = step_seconds("raw", MB, 0.001, 1.25e9, unlimited)
    assert step_seconds("int8", MB, 0.001, 1.25e9, unlimited) > raw


def test_a_slow_link_gets_int8() -> None:
    # 10 Mbit/s: raw fp32 takes 2 x 1.26 s per micro-batch, int8 about a quarter of that
    assert choose(MB, 0.002, 1.25e6, CodecPolicy()) == "int8"
    saved = 1 - step_seconds("int8", MB, 0.002, 1.25e6, CodecPolicy()) / step_seconds(
        "raw", MB, 0.002, 1.25e6, CodecPolicy()
    )
    assert 0.7 < saved < 0.75  # int8 + scales: 1.0625 bytes of 4


def test_rtt_decides_when_the_payload_is_small() -> None:
    """The same slow link and 4 KiB of activations (one generated token's hidden states):
    a short path compresses, a 300 ms one stays raw (int8 would save 1.2 ms of 302)."""
    small = 4096
    assert choose(small, 0.001, 5e6, CodecPolicy()) == "int8"
    assert choose(small, 0.3, 5e6, CodecPolicy()) == "raw"
    # a fast link with a long RTT: nothing to save either
    assert choose(small, 0.3, 1.25e9, CodecPolicy(slow_bytes_per_s=math.inf)) == "raw"
    far = [Link(A, B, rtt_s=0.3, bandwidth_bytes_per_s=5e6)]
    assert hop_codec(AUTO, far, A, B, CodecPolicy(), small) == "raw"
    assert hop_codec(AUTO, far, A, B, CodecPolicy(), MB) == "int8"  # a big payload gains


def test_the_error_budget_bounds_the_choice() -> None:
    slow = (MB, 0.002, 1.25e6)
    assert choose(*slow, CodecPolicy(slow_codec="raw")) == "raw"  # no lossy codec allowed
    assert choose(*slow, CodecPolicy(slow_codec="bf16")) == "bf16"  # int8 is beyond it
    assert choose(*slow, CodecPolicy(slow_codec="fp16")) == "fp16"
    assert CodecPolicy(slow_codec="int8").candidates() == ["bf16", "int8"]  # bf16 over fp16
    assert CodecPolicy(slow_codec="raw").candidates() == []
    assert sorted(ERROR_BOUND, key=ERROR_BOUND.__getitem__) == ["raw", "fp16", "bf16", "int8"]
    # a costly int8 (a slow CPU) loses to bf16 on a middling link
    slow_cpu = {**CPU_COSTS, "int8": CodecCost(per_byte=100e-9, per_message=0.0)}
    assert choose(MB, 0.002, 6e6, CodecPolicy(costs=slow_cpu)) == "bf16"
    with pytest.raises(ValueError, match="min_saving"):
        CodecPolicy(min_saving=1.0)
    with pytest.raises(ValueError, match="costs"):
        CodecPolicy(costs={"raw": CodecCost(0.0, 0.0)})
    with pytest.raises(ValueError, match="per_byte"):
        CodecCost(per_byte=math.nan, per_message=0.0)


def test_policy_comes_from_exec_and_bad_values_are_refused() -> None:
    assert codec_policy_of(load_config(None).exec) == CodecPolicy(6.25e6, "int8")
    env = {"NEXUSD_EXEC__SLOW_LINK_CODEC": "bf16", "NEXUSD_EXEC__SLOW_LINK_BYTES_PER_S": "1e7"}
    assert codec_policy_of(load_config(None, env=env).exec) == CodecPolicy(1e7, "bf16")
    with pytest.raises(ConfigError, match="slow_link_codec"):
        load_config(None, env={"NEXUSD_EXEC__SLOW_LINK_CODEC": "zip"})
    never = load_config(None, env={"NEXUSD_EXEC__SLOW_LINK_CODEC": "raw"}).exec
    assert codec_policy_of(never).candidates() == []
    with pytest.raises(ValueError, match="slow_codec"):
        CodecPolicy(slow_codec="auto")
    _check_codec(AUTO)
    with pytest.raises(ApiError, match="codec: expected one of"):
        _check_codec("zip")


class SlowLinkView(MemView):
    """The in-memory mesh with measured links from the origin to each host."""

    bandwidth: dict[bytes, float]

    def links(self) -> list[Link]:
        return [link(self.node_id, h, bw) for h, bw in self.bandwidth.items()]


async def test_an_auto_job_compresses_only_its_slow_hop(tmp_path: Path) -> None:
    honest = await honest_logits()
    async with trio.open_nursery() as nursery:
        origin = Node("origin", [])
        head = Node("head", spans([(0, 3)]))
        tail = Node("tail", spans([(3, 6)]))
        view = SlowLinkView(nursery, origin, [(head, 0.001), (tail, 0.001)])
        view.bandwidth = {head.id: 100e6, tail.id: 0.2e6}  # the tail's link is slow
        metrics = Metrics()
        engine = JobEngine(
            view=view,
            host=origin.host,
            registry=ModelRegistry(tmp_path / "models"),
            signer=origin.signer,
            verifier=origin.verifier,
            metrics=metrics,
            step_timeout_s=10,
            rng=random.Random(0),
            codec_policy=POLICY,
        )
        session = engine._session(
            "tiny", n_atoms=6, batch=1, max_len=32, bytes_per_hop=1024, kind="latency", codec=AUTO
        )
        logits, costs = await generate_with_costs(session)
        text = metrics.render()
        assert 'wire_codec_hops_total{codec="raw"} 1' in text
        assert 'wire_codec_hops_total{codec="int8"} 1' in text
        nursery.cancel_scope.cancel()
    # the tail's input crossed the slow link in int8: close to, not equal to, the exact run
    for got, want in zip(logits, honest, strict=True):
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    assert not all(torch.equal(g, w) for g, w in zip(logits, honest, strict=True))
    # the reply's route says which codec each hop used and what it saved against raw
    by_start = {h.start: h for h in costs.report(lambda _: "")}
    assert (by_start[0].codec, by_start[0].bytes_saved, by_start[0].wire_error) == ("raw", 0, 0)
    tail_hop = by_start[3]
    assert tail_hop.codec == "int8"
    # blockwise absmax int8: at most half a step (1/254 of a block's peak) per value
    assert 0 < tail_hop.wire_error <= 1 / 254 + 1e-6
    sent = tail_hop.bytes_out + tail_hop.bytes_in
    # int8 blockwise: ~1 byte per value plus its block scales, against 4 in raw fp32
    assert 2.5 * sent < sent + tail_hop.bytes_saved < 4.5 * sent


async def generate_with_costs(session: RoutedSession) -> tuple[list[torch.Tensor], HopCosts]:
    """`generate`, keeping the per-hop costs of every step as a job does."""
    costs = HopCosts()
    await session.open()
    x, pos, logits = PROMPT, 0, []
    try:
        for _ in range(STEPS):
            out, timings = await session.step(StepInput(x, pos, True, b""))
            costs.add(timings)
            logits.append(out)
            pos += x.shape[1]
            x = out[:, -1:].argmax(-1)
    finally:
        await session.close()
    return logits, costs


def hop_report(
    codec: str = "", bytes_saved: int = 0, sent: int = 100, wire_error: float = 0.0031
) -> HopReport:
    return HopReport(
        host="ab" * 32,
        name="h",
        start=0,
        end=3,
        steps=2,
        compute_s=0.1,
        queue_s=0.0,
        transfer_s=0.2,
        bytes_out=sent,
        bytes_in=sent,
        codec=codec,
        bytes_saved=bytes_saved,
        wire_error=wire_error if codec not in ("", "raw") else 0.0,
    )


def test_hop_reports_carry_the_codec_and_what_it_saved() -> None:
    hop = hop_report("int8", 2_400_000)
    assert wire.decode(wire.encode(hop), HopReport) == hop
    local = hop_report()  # a local hop: no codec, nothing saved
    assert wire_summary((hop, local)) == (
        "wire: int8 on 1 of 2 hops, 2.40 MB saved vs raw, max relative error 0.0031"
    )
    assert wire_summary((local, hop_report("raw"))) == ""
    with pytest.raises(ValueError, match="codec"):
        hop_report("int8;rm -rf")
    with pytest.raises(ValueError, match="bytes_saved"):
        hop_report("raw", -3, sent=1)
    with pytest.raises(ValueError, match="wire_error"):
        hop_report("int8", 10, wire_error=math.nan)
