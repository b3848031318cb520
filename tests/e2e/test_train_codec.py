"""`nexusd train --codec bf16` across two daemons: the hidden states and their gradients
between the stages travel in bf16, the run moves about half the bytes of the raw run,
reports it per hop, and ends close to it; the raw run still equals one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexusd.api.records import TrainReply
from nexusd.harness.cluster import local_cluster
from nexusd.model_registry import ModelRegistry

from .test_training import FAST, TEXT, assert_close, lm_request, reference, trained

pytestmark = pytest.mark.e2e


def test_bf16_training_hops_move_fewer_bytes_and_end_close_to_raw(
    tmp_path: Path, models_dir: Path, registry: ModelRegistry
) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    with local_cluster(tmp_path, 2, models_dir=models_dir, env=FAST) as c:
        c.host(0, "nexus-1.1:0-9")  # the frozen base and the first trainable block
        c.host(1, "nexus-1.1:9-11")  # the second block and the head: across the wire
        c.wait_hosts(0, 2, "nexus-1.1")
        raw_req = lm_request(data, "nexus-codec-raw", checkpoint_interval=0)
        raw = c.call(0, raw_req, expect=TrainReply, timeout_s=600)
        lossy = c.call(
            0,
            lm_request(data, "nexus-codec-bf16", checkpoint_interval=0, codec="bf16"),
            expect=TrainReply,
            timeout_s=600,
        )
    (raw_hop,) = [h for h in raw.route if h.start == 9]
    (hop,) = [h for h in lossy.route if h.start == 9]
    assert (raw_hop.codec, raw_hop.bytes_saved) == ("raw", 0)
    assert hop.codec == "bf16"
    sent, raw_sent = hop.bytes_out + hop.bytes_in, raw_hop.bytes_out + raw_hop.bytes_in
    assert sent + hop.bytes_saved == raw_sent  # the same tensors, counted at raw size
    assert sent < 0.52 * raw_sent  # float32 hidden states and gradients at 2 bytes
    # the raw run is the one-process run; the bf16 one is close to it. Tolerance: the
    # parameters' distance from the raw run's within 5 % of how far training moved them
    parent = registry.load_model("nexus-1.1")
    ref = reference(parent, raw_req, data)
    assert_close(ref, trained(registry, "nexus-codec-raw"))
    start = {n: p.detach() for n, p in parent.span(0, len(parent)).named_parameters()}
    got = trained(registry, "nexus-codec-bf16")
    moved = sum(float((p - start[n]).norm() ** 2) for n, p in ref.items()) ** 0.5
    apart = sum(float((got[n] - p).norm() ** 2) for n, p in ref.items()) ** 0.5
    assert 0 < apart < 0.05 * moved, (apart, moved)
    assert lossy.train_loss == pytest.approx(raw.train_loss, rel=1e-2)
