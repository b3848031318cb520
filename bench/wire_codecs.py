"""Wire codecs: what each costs in accuracy when activations cross hop boundaries in it.

For each codec (raw, fp16, bf16, int8), the models run cut into three spans, the hidden
states encoded and decoded (`atoms.codecs`) at both cuts, as a routed job over lossy
links does: MiniLM embedding cosine against raw (mean / min over held-out paragraphs);
Nexus 1.1 logits cosine, top-1 next-token agreement with raw and perplexity. Bytes per
hidden vector against raw, and the transfer time of one embed micro-batch (32 x 128 tokens
x 384) over a 10 Mbit/s link: the figures `--codec auto` ([exec] slow_link_codec) trades.
The "cpu" section times one encode plus one decode per codec on one core (a 1.5 MB float32
micro-batch and a 1.5 KB token): the per-byte and per-message costs
`nexusd.exec.adaptive.CPU_COSTS` holds.

    python -m bench.wire_codecs [--smoke]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from atoms.codecs import CODECS, decode, encode, wire_bytes
from atoms.compress import Batch, CompressSettings, text_batches
from atoms.minilm import load_minilm
from atoms.model import Model
from atoms.precision import cosine_report

from .common import emit_json

LINK_BYTES_PER_S = 10e6 / 8  # 10 Mbit/s


def _run(model: Model, batch: Batch, cuts: Sequence[int], codec: str) -> torch.Tensor:
    """The model's output with the activation at each cut sent through `codec`."""
    x = batch.ids
    with torch.no_grad():
        for i, atom in enumerate(model.atoms):
            if i in cuts and x.is_floating_point():
                x = decode(encode(x, codec))
            x = atom(x, batch.ctx)
    return x.float()


def _rows(out: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1, out.shape[-1])[real.reshape(-1)] if out.dim() == 3 else out


def embeddings(model: Model, batch: Batch, cuts: Sequence[int]) -> dict[str, object]:
    ref = _run(model, batch, cuts, "raw")
    out: dict[str, object] = {}
    for codec in sorted(CODECS):
        rep = cosine_report(
            _rows(ref, batch.real), _rows(_run(model, batch, cuts, codec), batch.real)
        )
        out[codec] = {"cosine": round(rep.mean, 6), "cosine_min": round(rep.min, 6)}
    return out


def language(model: Model, batch: Batch, cuts: Sequence[int]) -> dict[str, object]:
    assert batch.targets is not None
    valid = batch.targets.reshape(-1) != -100
    ref = _run(model, batch, cuts, "raw")
    ref_rows = ref.reshape(-1, ref.shape[-1])[valid]
    targets = batch.targets.reshape(-1)[valid]
    out: dict[str, object] = {}
    for codec in sorted(CODECS):
        got = _run(model, batch, cuts, codec).reshape(-1, ref.shape[-1])[valid]
        nll = float(F.cross_entropy(got, targets))
        out[codec] = {
            "logits_cosine": round(float(F.cosine_similarity(got, ref_rows, dim=-1).mean()), 6),
            "top1_agreement": round(
                float((got.argmax(-1) == ref_rows.argmax(-1)).float().mean()), 5
            ),
            "perplexity": round(math.exp(nll), 4),
        }
    return out


def sizes(hidden: int) -> dict[str, object]:
    raw = wire_bytes(hidden, torch.float32, "raw")
    batch = 32 * 128 * hidden
    return {
        codec: {
            "bytes_ratio": round(wire_bytes(hidden, torch.float32, codec) / raw, 4),
            "ms_at_10_mbit": round(
                1000 * wire_bytes(batch, torch.float32, codec) / LINK_BYTES_PER_S, 1
            ),
        }
        for codec in sorted(CODECS)
    }


def _encode_decode_s(x: torch.Tensor, codec: str, repeats: int) -> float:
    """Median seconds of one encode plus one decode of `x` in `codec`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode(encode(x, codec))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_costs(repeats: int = 30) -> dict[str, object]:
    """Each codec's CPU cost on one core: seconds per raw float32 byte and per message,
    from a 1.5 MB micro-batch (32 x 32 tokens x 384) and a 1.5 KB one (a token)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        big = torch.randn(32 * 32 * 384, generator=gen)
        small = torch.randn(384, generator=gen)
        out: dict[str, object] = {}
        for codec in sorted(CODECS):
            t_big = _encode_decode_s(big, codec, repeats)
            t_small = _encode_decode_s(small, codec, repeats * 10)
            per_byte = max(0.0, (t_big - t_small) / (4 * (big.numel() - small.numel())))
            out[codec] = {
                "per_byte_ns": round(per_byte * 1e9, 4),
                "per_message_us": round(max(0.0, t_small - per_byte * 4 * small.numel()) * 1e6, 2),
                "big_ms": round(t_big * 1e3, 3),
            }
        return out
    finally:
        torch.set_num_threads(threads)


def measure_all(minilm: Model, nexus: Model | None, *, texts: int) -> dict[str, object]:
    settings = CompressSettings(model_id="x", calib_texts=1, eval_texts=texts)
    _, mb = text_batches(minilm, settings)
    doc: dict[str, object] = {
        "cuts": "three spans, codec at both cuts",
        "minilm_embeddings": embeddings(minilm, mb, (3, 6)),
        "sizes_hidden_384": sizes(384),
        "cpu": cpu_costs(),
    }
    if nexus is not None:
        _, nb = text_batches(nexus, settings)
        doc["nexus"] = {"model": nexus.model_id, **language(nexus, nb, (4, 8))}
    return doc


def main(argv: list[str] | None = None) -> int:
    from .compress import nexus_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="MiniLM only, 4 paragraphs")
    p.add_argument("--workdir", default=None, help="unused (the benches' common flag)")
    args = p.parse_args(argv)
    nexus = None if args.smoke else nexus_model()
    doc = measure_all(load_minilm(), nexus, texts=4 if args.smoke else 32)
    emit_json({"bench": "wire_codecs", **doc})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
