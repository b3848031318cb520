"""Turn a `train lm` result into the Nexus 1.1 weights the project ships.

Reads the trained model folder (from `scripts/train_default_model.py`), keeps only its
trainable parameters (the two Nexus blocks and the head's norm, projection and bias; the
frozen MiniLM base and the tied word embeddings are rebuilt from the bundled MiniLM on
every node), stores them as bf16 in `data/models/nexus-1.1.safetensors`, copies the
training curve to `data/models/nexus-1.1-training.csv`, draws it to
`data/models/nexus-1.1-training.png`, and prints the SHA-256 to put in
`nexusd/model_registry.py` (`NEXUS_SHIPPED_SHA256`).

Usage:
    python -m scripts.ship_default_model --run /tmp/nexus-train
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atoms.model import Model, load_model
from atoms.nexus import trainable_tensors
from atoms.training import apply_trained
from nexusd.model_registry import ModelRegistry

from .train_default_model import JOB_ID

DATA = Path(__file__).resolve().parents[1] / "data" / "models"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the folder train_default_model wrote")
    p.add_argument("--model", default="nexus-1.1-trained", help="the trained model's id")
    p.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="ship the job's checkpoint of this step instead of its finished model (a run "
        "stopped early: its metrics are cut at that step)",
    )
    args = p.parse_args(argv)
    if args.checkpoint is None:
        run = json.loads((args.run / "run.json").read_text())
        model = load_model(args.run / "models" / args.model)
        metrics = args.run / "metrics.csv"
        command = run["command"]
    else:
        model, metrics = from_checkpoint(args.run, args.checkpoint)
        command = (args.run / "command.txt").read_text().strip()
    tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in trainable_tensors(model).items()}
    DATA.mkdir(parents=True, exist_ok=True)
    out = DATA / "nexus-1.1.safetensors"
    save_file(tensors, str(out), metadata={"model": "nexus-1.1", "trained_by": command})
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    shutil.copy(metrics, DATA / "nexus-1.1-training.csv")
    plot(DATA / "nexus-1.1-training.csv", DATA / "nexus-1.1-training.png")
    params = sum(t.numel() for t in tensors.values())
    print(
        json.dumps(
            {
                "file": str(out),
                "bytes": out.stat().st_size,
                "sha256": digest,
                "parameters": params,
                "checkpoint": args.checkpoint,
            },
            indent=2,
        )
    )
    return 0


def from_checkpoint(run: Path, step: int) -> tuple[Model, Path]:
    """The random-init parent with the trained parameters of the job's checkpoint at `step`,
    and the job's metrics up to that step (written beside the run as metrics-STEP.csv)."""
    job = run / "mesh" / "node0" / "train" / JOB_ID
    model = ModelRegistry(run / "models").load_model("nexus-1.1-random")
    apply_trained(model, load_file(str(job / f"step-{step:08d}.safetensors")))
    with open(job / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    cut = run / f"metrics-{step}.csv"
    with open(cut, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *(r for r in rows[1:] if int(r[0]) <= step)])
    return model, cut


def plot(csv_path: Path, png: Path) -> None:
    """Training loss per step and validation perplexity at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_ppl"])) for r in rows if r["val_ppl"]]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, loss, lw=0.8)
    ax[0].set(
        xlabel="optimiser step",
        ylabel="training loss (nats/token)",
        title="Nexus 1.1: training loss",
    )
    ax[1].plot([s for s, _ in val], [v for _, v in val], marker="o")
    ax[1].set(
        xlabel="optimiser step",
        ylabel="validation perplexity",
        yscale="log",
        title="validation perplexity",
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
