"""Train the default generator (Nexus 1.1's blocks and output projection) with the mesh.

Starts a local mesh of two daemons on 127.0.0.1, then runs the exact command

    nexusd --data-dir <node0> train lm --output <id> [settings...] --json

against the first, on the shipped English corpus; writes the reply, the metrics CSV and a
log of progress into --out.

Layouts (`--layout`): `replicas` (the default) has both daemons host the whole model and
trains two data-parallel replicas (`--replicas 2`, gradients summed every step): each
daemon's core computes whole micro-batches, so neither waits on the other; `pipeline` has
the first daemon host the frozen MiniLM base and the two Nexus blocks and the second the
output head (a 2-stage 1F1B pipeline: the head is two thirds of a micro-batch's compute,
so the first stage idles about a third of the time). `scripts/ship_default_model.py` turns the result into the
weights the project ships.

Usage:
    python -m scripts.train_default_model --out /tmp/nexus-train --steps 1500
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nexusd.harness.cluster import local_cluster

SETTINGS = {
    "--micro-batch": "8",
    "--accumulation": "8",
    "--seq-len": "128",
    "--lr": "0.004",
    "--warmup-steps": "80",
    "--decay": "cosine",
    "--min-lr-ratio": "0.1",
    "--weight-decay": "0.01",
    "--dropout": "0.1",
    "--clip": "1.0",
    "--precision": "bf16",
    "--schedule": "1f1b",
    "--eval-interval": "110",
    "--eval-examples": "240",
    "--checkpoint-interval": "110",
    "--seed": "1",
}
JOB_ID = "default-model"  # the job's checkpoints: OUT/mesh/node0/train/JOB_ID/
PARENT = "nexus-1.1-random"  # the architecture with untrained blocks
LAYOUTS = {
    "replicas": ((f"{PARENT}:0-11", f"{PARENT}:0-11"), ["--replicas", "2"]),
    "pipeline": ((f"{PARENT}:0-10", f"{PARENT}:10-11"), []),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the run (created)")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    p.add_argument("--output", default="nexus-1.1-trained", help="id of the trained model")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="replicas", help="see above")
    p.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="shared models dir of the daemons (default: OUT/models)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models_dir or args.out / "models"
    env = {"NEXUSD_NODE__TORCH_THREADS": "1", "NEXUSD_TRAIN__OP_TIMEOUT_S": "600"}
    with local_cluster(args.out / "mesh", 2, models_dir=models, env=env) as cluster:
        spans, layout_flags = LAYOUTS[args.layout]
        for i, spec in enumerate(spans):
            cluster.host(i, spec)
        cluster.wait_hosts(0, 2, PARENT)
        cmd = [
            sys.executable,
            "-m",
            "nexusd",
            "train",
            "lm",
            "--log-level",
            "warning",
            "--data-dir",
            str(cluster.data_dir(0)),
            "--model",
            PARENT,
            "--output",
            args.output,
            "--steps",
            str(args.steps),
            "--job-id",
            JOB_ID,
            *[x for kv in SETTINGS.items() for x in kv],
            *layout_flags,
            "--json",
            "-v",
        ]
        shown = " ".join(shlex.quote(c) for c in cmd)
        (args.out / "command.txt").write_text(shown + "\n")
        print(shown, flush=True)
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env=cluster_env(cluster))
        wall = time.time() - t0
        (args.out / "reply.json").write_text(done.stdout)
        (args.out / "stderr.txt").write_text(done.stderr)
        print(f"exit {done.returncode} after {wall:.0f} s", flush=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        reply = json.loads(done.stdout)
        shutil.copy(Path(reply["checkpoint"]) / "metrics.csv", args.out / "metrics.csv")
        (args.out / "run.json").write_text(
            json.dumps(
                {"command": shown, "wall_s": round(wall, 1), "spans": spans, "reply": reply},
                indent=2,
            )
            + "\n"
        )
    return 0


def cluster_env(cluster: object) -> dict[str, str]:
    from nexusd.harness.cluster import daemon_env

    return daemon_env(getattr(cluster, "env", {}))


if __name__ == "__main__":
    raise SystemExit(main())
