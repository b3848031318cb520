"""Hosts' measured compute profile: what is timed, how it is smoothed and advertised, and how
`peers`/`doctor` show the swarm's bottleneck."""

from __future__ import annotations

import pytest

from atoms.span import Span
from mesh.state import Advert, HostedSpan, NodeState, SpanProfile
from mesh.wire import decode, encode
from nexusd.api.records import BottleneckRow, PeersReply
from nexusd.cli.doctor import _peer_findings
from nexusd.cli.mesh import bottleneck_lines
from nexusd.config import AtomsConfig, Config, ConfigError
from nexusd.exec.profile import ComputeProfile, measure_step
from nexusd.model_registry import ModelRegistry
from nexusd.node.placement_service import (
    capacity_s,
    profile_drifted,
    span_throughputs,
    weight_memory_budget,
)


def test_profile_seeds_then_smooths_decode_steps_only() -> None:
    p = ComputeProfile()
    assert p.get("m") is None
    p.seed("m", 0.004)
    assert p.get("m") == 0.004
    p.observe("m", n_atoms=4, tokens=64, compute_s=10.0)  # a prefill: not decode-shaped
    assert p.get("m") == 0.004
    p.observe("m", n_atoms=4, tokens=1, compute_s=0.032)  # 8 ms per atom
    assert p.get("m") == pytest.approx(0.004 + 0.2 * (0.008 - 0.004))
    for _ in range(60):
        p.observe("m", n_atoms=4, tokens=1, compute_s=0.032)
    assert p.get("m") == pytest.approx(0.008, rel=1e-3)
    assert p.capacity("m") == 0.004  # placement's figure: measured at load, idle
    p.seed("m", 1.0)  # a later load does not override real steps, only the capacity
    assert p.get("m") == pytest.approx(0.008, rel=1e-3)
    assert p.capacity("m") == 1.0


def test_measure_step_times_a_real_span(registry: ModelRegistry) -> None:
    span: Span = registry.load_span("nexus-1.1", 1, 3)
    s = measure_step(span)
    assert 0 < s < 1.0  # seconds per atom of one token through two blocks


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("models"))


def test_drift_and_throughputs_and_records() -> None:
    prof = SpanProfile("m", 2, 6, 0.005, 2048, True, 0.002)
    assert capacity_s([prof], "m", 2) == 0.002  # placement: the figure measured at load
    assert capacity_s([SpanProfile("m", 2, 6, 0.005, 2048)], "m", 2) == 0.005
    span = HostedSpan("m", 2, 6, "float32")
    advert = Advert((span,), 0, 0, (), (), NodeState.ONLINE, 0, "", (prof,), 1 << 30)
    assert decode(encode(advert), expect=Advert) == advert
    assert span_throughputs([prof]) == (("m", 2, pytest.approx(1 / (0.005 * 4))),)
    assert profile_drifted({}, [prof])  # first measure
    assert not profile_drifted({"m": 0.0045}, [prof])  # within 25 %
    assert profile_drifted({"m": 0.003}, [prof])
    for bad in (0.0, float("nan"), 1e9):
        with pytest.raises(ValueError, match="compute_s_per_atom"):
            SpanProfile("m", 0, 1, bad, 0)
    assert weight_memory_budget(AtomsConfig(memory_budget_bytes=123)) == 123
    assert weight_memory_budget(AtomsConfig()) > 0  # half the RAM
    with pytest.raises(ConfigError, match="placement_interval_s"):
        AtomsConfig(placement_interval_s=0)


def test_peers_and_doctor_show_the_bottleneck_and_its_fix() -> None:
    rows = (
        BottleneckRow(
            model_id="m",
            n_atoms=12,
            start=8,
            end=12,
            tokens_per_s=0.0,
            hosts=1,
            fix="host atoms 8-12 of m (nexusd host m --atoms 8-12)",
        ),
        BottleneckRow(
            model_id="n",
            n_atoms=4,
            start=0,
            end=4,
            tokens_per_s=42.0,
            hosts=2,
            fix="host atoms 0-4 of n (nexusd host n --atoms 0-4)",
        ),
    )
    reply = PeersReply("mesh", (), (), rows)
    lines = bottleneck_lines(reply)
    assert "m atoms 8-12 of 12: NOBODY serves them" in lines[0]
    assert "nexusd host m --atoms 8-12" in lines[0]
    assert "n atoms 0-4 of 4 at 42.0 tokens/s (2 hosts)" in lines[1]
    found = [f for f in _peer_findings(reply, Config()) if f.check == "bottleneck"]
    assert [f.level for f in found] == ["fail", "ok"]
    assert "nexusd host m --atoms 8-12" in found[0].detail
