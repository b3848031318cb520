"""Weights over the mesh: how long a fresh host takes to fetch and serve a span it lacks.

Three real daemons on 127.0.0.1, each with its own (sealed) models directory. node0 imports
a Llama checkpoint of about 34 MB (random weights, 4 atoms) and publishes it; node1, which
has nothing, is asked to host all of it: the time of `nexusd host` (fetch from node0 over
/nexus/weights/1, verify, seal, load, warm up) and the fetch rate. Then node2 hosts it
too, pulling pieces from node0 and node1 at once. Loopback only, one run.

    python -m bench.weights_fetch [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from nexusd.api.records import ModelsReply, ModelsRequest, ProgressEvent
from nexusd.harness.cluster import LocalCluster, run_cli

from .common import emit_json, quiet_logs

FAST = {"NEXUSD_MESH__ADVERT_REFRESH_S": "1", "NEXUSD_MESH__PING_INTERVAL_S": "1"}


def checkpoint(folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4000,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _host(cluster: LocalCluster, i: int) -> tuple[float, int]:
    fetched = 0

    def on_event(event: object) -> None:
        nonlocal fetched
        if isinstance(event, ProgressEvent) and event.job_id == "weights":
            fetched = max(fetched, event.total)

    from nexusd.api.records import HostRequest

    t0 = time.perf_counter()
    cluster.call(i, HostRequest("big"), timeout_s=600, on_event=on_event)
    return time.perf_counter() - t0, fetched


def measure(root: Path) -> dict[str, object]:
    cluster = LocalCluster(root, 3, models_dir=root / "unused", env=FAST)
    del cluster.env["NEXUSD_ATOMS__MODELS_DIR"]  # own, sealed models directories
    try:
        cluster.init()
        cluster.start_all()
        cluster.join_all()
        ckpt = checkpoint(root / "ckpt")
        args = ["import-model", str(ckpt), "--id", "big", "--data-dir", str(cluster.data_dir(0))]
        res = run_cli(args, env=cluster.env)
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        deadline = time.monotonic() + 60
        while not all(
            any(
                r.model_id == "big"
                for r in cluster.call(i, ModelsRequest(), expect=ModelsReply).models
            )
            for i in (1, 2)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the manifest did not replicate within 60 s")
            time.sleep(0.2)
        one_s, nbytes = _host(cluster, 1)
        cluster.wait_hosts(2, 1, "big")
        two_s, nbytes2 = _host(cluster, 2)
        return {
            "span_bytes": nbytes,
            "host_from_1_peer_s": round(one_s, 3),
            "rate_1_peer_mb_s": round(nbytes / one_s / 1e6, 1),
            "host_from_2_peers_s": round(two_s, 3),
            "rate_2_peers_mb_s": round(nbytes2 / two_s / 1e6, 1),
            "note": "times are the whole `nexusd host`: fetch, verify, seal, load, warm-up",
        }
    finally:
        cluster.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where the daemons live (default: tmp)")
    args = p.parse_args(argv)
    quiet_logs()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        emit_json({"bench": "weights_fetch", **measure(Path(tmp))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
