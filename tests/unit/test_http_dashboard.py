"""The dashboard's JSON from the job API's answers: members, running jobs, recent jobs'
routes (looked up once), training loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nexusd.api.records import (
    GenerateReply,
    HopReport,
    JobRow,
    JobsReply,
    JobsRequest,
    PeerRow,
    PeersReply,
    PeersRequest,
    ResultRequest,
    RouteEvent,
    RouteHop,
    TrainProgressEvent,
    TrainReply,
)
from nexusd.http.dashboard import MeshSnapshot
from nexusd.jobs.service import RunningJob

HOP = HopReport(
    host="ab" * 32,
    name="node1",
    start=0,
    end=11,
    steps=4,
    compute_s=0.02,
    queue_s=0.001,
    transfer_s=0.004,
    bytes_out=10,
    bytes_in=20,
)


def row(job_id: str, kind: str, state: str = "succeeded") -> JobRow:
    return JobRow(
        job_id=job_id, kind=kind, state=state, created_ms=1, updated_ms=2, attempts=1, error=""
    )


async def test_snapshot(tmp_path: Path) -> None:
    run_dir = tmp_path / "train" / "t1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "step,lr,train_loss,val_loss,val_ppl,val_accuracy,tokens,elapsed_s\n"
        "1,0.001,5.5,,,,100,1.0\n2,0.001,4.25,4.5,90.0,,200,2.0\n"
    )
    asked: list[object] = []

    async def call(request: object, _emit: Any) -> object:
        asked.append(request)
        if isinstance(request, PeersRequest):
            peer = PeerRow(
                node_id="ab" * 32,
                name="node1",
                roles=("member",),
                is_self=False,
                connected=True,
                state="online",
                rtt_ms=1.5,
                hosted=("nexus-1.1:0-11",),
                lease_left_s=20.0,
                queue_depth=0,
                banned=False,
            )
            return PeersReply("mesh", (peer,), (("refused", 2),))
        if isinstance(request, JobsRequest):
            return JobsReply(
                (row("g1", "generate"), row("t1", "train"), row("f1", "embed", "failed"))
            )
        assert isinstance(request, ResultRequest)
        if request.job_id == "g1":
            return GenerateReply(
                job_id="g1",
                model="nexus-1.1",
                text="x",
                token_ids=(1,),
                stop_reason="stop_token",
                prompt_tokens=3,
                elapsed_s=0.5,
                tokens_per_s=2.0,
                route=(HOP,),
                failovers=(),
            )
        return TrainReply(
            job_id="t1",
            task="lm",
            model="my-nexus",
            parent="nexus-1.1",
            steps=2,
            train_loss=4.25,
            val_loss=4.5,
            val_perplexity=90.0,
            val_accuracy=0.1,
            tokens=200,
            elapsed_s=2.0,
            tokens_per_s=100.0,
            resumed_from=-1,
            checkpoint=str(run_dir),
            route=(HOP,),
            failovers=(),
            bubble=(),
        )

    running = RunningJob(
        job_id="r1",
        kind="train",
        started_ms=5,
        route=RouteEvent("r1", (RouteHop("ab" * 32, "node1", 0, 11),), "opened"),
        tokens=0,
        progress=None,
        losses=(
            TrainProgressEvent(
                job_id="r1", step=1, steps=9, loss=6.0, lr=1e-3, tokens_per_s=5.0, eta_s=3.0
            ),
        ),
    )
    snap = MeshSnapshot(call, lambda: [running], tmp_path / "train")
    doc = await snap()
    assert doc["mesh_id"] == "mesh" and doc["members"][0]["name"] == "node1"
    assert doc["counters"] == {"refused": 2}
    assert doc["running"] == [
        {
            "job_id": "r1",
            "kind": "train",
            "started_ms": 5,
            "tokens": 0,
            "route": [{"host": "ab" * 32, "name": "node1", "start": 0, "end": 11}],
            "route_reason": "opened",
            "progress": None,
            "losses": [[1, 6.0, -1.0]],
        }
    ]
    g1, t1, f1 = doc["recent"]
    assert g1["route"][0]["compute_s"] == 0.02 and g1["tokens_per_s"] == 2.0
    assert t1["losses"] == [[1.0, 5.5, -1.0], [2.0, 4.25, 4.5]] and t1["model"] == "my-nexus"
    assert "route" not in f1  # failed: nothing to look up
    before = len(asked)
    await snap()
    assert len(asked) - before == 2  # peers and jobs again; finished routes come from the cache
