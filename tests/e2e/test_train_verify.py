"""Spot-checks of training across real daemons: a host that returns wrong input gradients
during `train lm` is caught on its first micro-batch, blamed "wrong_output" and banned; the
run redoes its steps on an honest host and ends where an honest run ends; an honest run
reports no false positive."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nexusd.api.records import PeersReply, PeersRequest, TrainReply
from nexusd.harness.cluster import Event, LocalCluster, local_cluster
from nexusd.model_registry import ModelRegistry

from .test_training import FAST, assert_close, data, lm_request, reference, trained

pytestmark = pytest.mark.e2e
__all__ = ["data"]  # the fixture

LIAR = Path(__file__).parent / "liar"  # its sitecustomize makes NEXUS_TEST_LIE=grad lie
ROOT = Path(__file__).resolve().parents[2]


def nth(name: str, n: int) -> Callable[[Event], bool]:
    """A `wait_for` predicate: true at the n-th `name` event."""
    seen = [0]

    def match(event: Event) -> bool:
        seen[0] += event.get("event") == name
        return seen[0] >= n

    return match


def about(c: LocalCluster, name: str, host: str) -> list[Event]:
    """The `name` events about `host` node 0 has logged so far."""
    return [e for e in c.daemon(0).seen if e.get("event") == name and e.get("host") == host[:8]]


def test_a_host_lying_about_gradients_is_caught_banned_and_the_run_ends_honest(
    tmp_path: Path, models_dir: Path, registry: ModelRegistry, data: Path
) -> None:
    # one wrong_output (34) bans, for the whole test
    env = {**FAST, "NEXUSD_MESH__BAN_SCORE_THRESHOLD": "30", "NEXUSD_MESH__BAN_BASE_S": "3600"}
    # the tree under test after the liar's module (sitecustomize imports nexusd early)
    liar_prefix = ["env", f"PYTHONPATH={LIAR}:{ROOT}", "NEXUS_TEST_LIE=grad"]
    with local_cluster(
        tmp_path,
        3,
        models_dir=models_dir,
        env=env,
        names=["origin", "liar", "honest"],
        prefixes=[[], liar_prefix, []],
    ) as c:
        c.host(0, "nexus-1.1:0-9")  # the frozen base and the first trained block: trusted
        c.host(1, "nexus-1.1:9-11")  # the last block and the head: it returns the gradient
        c.wait_hosts(0, 2, "nexus-1.1")
        ids = {p.name: p.node_id for p in c.call(0, PeersRequest(), expect=PeersReply).peers}
        req = lm_request(data, "nexus-verified", steps=3)
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["reply"] = c.call(0, req, expect=TrainReply, timeout_s=600)
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        job = threading.Thread(target=run, name="train")
        job.start()
        try:
            caught = c.daemon(0).wait_for("train_verify_failed", timeout_s=300)
            c.host(2, "nexus-1.1:9-11")  # an honest replica appears; the run waits for one
        finally:
            job.join(timeout=600)
        assert not job.is_alive() and "error" not in result, result
        reply = result["reply"]
        assert isinstance(reply, TrainReply)
        assert caught["host"] == ids["liar"][:8]
        assert "input gradient on atoms [9,11), training step 0 micro-batch 0" in str(
            caught["detail"]
        )
        assert len(reply.failovers) == 1 and "wrong training output" in reply.failovers[0]
        assert {h.name for h in reply.route if h.start == 9} == {"honest"}
        banned = {p.name: p.banned for p in c.call(0, PeersRequest(), expect=PeersReply).peers}
        assert banned["liar"] and not banned["honest"], banned
        # caught before any optimiser step: the run started again and ends as an honest one
        assert_close(
            reference(registry.load_model("nexus-1.1"), req, data),
            trained(registry, "nexus-verified"),
        )

        c.daemon(0).wait_for(nth("train_model_saved", 1))  # logged after the run's checks
        agreed = len(about(c, "train_verify_agreed", ids["honest"]))
        assert agreed >= 1  # the replacement was checked too

        # an honest run: its hosts are checked (the first micro-batch of each) and agree
        second = c.call(0, lm_request(data, "nexus-verified-2", steps=2), expect=TrainReply)
        c.daemon(0).wait_for(nth("train_model_saved", 2))
        assert second.failovers == ()
        assert len(about(c, "train_verify_agreed", ids["honest"])) > agreed
        assert len(about(c, "train_verify_failed", ids["liar"])) == 1
        assert not about(c, "train_verify_failed", ids["honest"])
