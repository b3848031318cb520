"""Encryption at rest: what sealed weight files cost when a host loads its span.

Loads every atom of Nexus 1.1 (11 atoms, ~150 MB of fp32 weights; MiniLM with --smoke) from
a plaintext model folder and from the same folder sealed with a mesh secret's key
(`mesh.identity.at_rest`: ChaCha20-Poly1305 per 1 MiB chunk), alternating, and reports the
median load time of each, the overhead (target: sealed load under 1.10x the plaintext
one) and the decryption rate. Both loads verify every file's BLAKE2b digest and build the
atoms, as `nexusd host` does.

    python -m bench.at_rest [--smoke] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mesh.identity.at_rest import SealedFiles
from nexusd.model_files import WeightFiles
from nexusd.model_registry import ModelRegistry

from .common import emit_json, quiet_logs


def _time_load(registry: ModelRegistry, model_id: str, n: int) -> float:
    t0 = time.perf_counter()
    span = registry.load_span(model_id, 0, n)
    elapsed = time.perf_counter() - t0
    del span
    return elapsed


def measure(model_id: str, rounds: int, workdir: Path) -> dict[str, object]:
    plain = ModelRegistry(workdir / "plain")
    plain.folder(model_id)  # materialise the built-in, in plaintext
    sealed_dir = workdir / "sealed"
    shutil.copytree(plain.models_dir / model_id, sealed_dir / model_id)
    files = WeightFiles(SealedFiles(os.urandom(32)), seal_new=True)
    t0 = time.perf_counter()
    n_sealed = files.seal_folder(sealed_dir / model_id)
    seal_s = time.perf_counter() - t0
    sealed = ModelRegistry(sealed_dir, reader=files.read)
    m = plain.manifest(model_id)
    n, nbytes = len(m.atoms), sum(e.nbytes for e in m.atoms)
    _time_load(plain, model_id, n)  # warm the page cache and torch
    _time_load(sealed, model_id, n)
    t_plain, t_sealed = [], []
    for _ in range(rounds):
        t_plain.append(_time_load(plain, model_id, n))
        t_sealed.append(_time_load(sealed, model_id, n))
    p, s = statistics.median(t_plain), statistics.median(t_sealed)
    t_dec = []
    weights = sorted((sealed_dir / model_id / "weights").glob("*.safetensors"))
    for _ in range(rounds):
        t0 = time.perf_counter()
        for path in weights:
            files.read(path)
        t_dec.append(time.perf_counter() - t0)
    return {
        "model": model_id,
        "atoms": n,
        "weight_bytes": nbytes,
        "files_sealed": n_sealed,
        "seal_s": round(seal_s, 3),
        "load_plain_s": round(p, 4),
        "load_sealed_s": round(s, 4),
        "overhead": round(s / p, 4),
        "target_overhead": 1.10,
        "ok": s / p < 1.10,
        "decrypt_mb_per_s": round(nbytes / statistics.median(t_dec) / 1e6, 1),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="MiniLM, 3 rounds")
    p.add_argument("--rounds", type=int, default=0, help="load rounds (default 7, smoke 3)")
    p.add_argument("--workdir", default=None, help="where the model copies go (default: tmp)")
    args = p.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(1)
    rounds = args.rounds or (3 if args.smoke else 7)
    model_id = "minilm" if args.smoke else "nexus-1.1"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        emit_json({"bench": "at_rest", **measure(model_id, rounds, Path(tmp))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
