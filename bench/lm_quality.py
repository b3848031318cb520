"""Benchmark: how well the shipped Nexus 1.1 writes English, against two baselines.

    python -m bench.lm_quality            # the full validation split (~3-5 min on 2 cores)
    python -m bench.lm_quality --smoke    # 24 paragraphs, for the tests

Per-token perplexity on the shipped corpus's validation split (`atoms.corpus`) of:
- the trained `nexus-1.1` (the weights in data/models/, trained by the mesh itself),
- `nexus-1.1-random` (the same architecture with untrained blocks),
- an interpolated Kneser-Ney 3-gram over the same WordPiece tokens (bench/lm_baseline.py),
all scored on exactly the same sequences: one per paragraph, "[CLS] p [SEP]", [CLS] never
scored, truncated at the model's context (`--max-tokens`, default 512: the corpus has a
few longer paragraphs; the figure says how many tokens were scored). The bar (issue 12):
the neural model's perplexity is below the 3-gram's. Also prints three sample
continuations at temperature 0.8 (fixed seeds) for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from atoms.atom import ForwardContext
from atoms.corpus import corpus_text, paragraphs
from atoms.datasets import paragraph_examples, special_ids
from atoms.generation import GenerationParams, generate
from atoms.model import Model
from nexusd.model_registry import ModelRegistry

from .lm_baseline import KneserNey3
from .lm_baseline import tokenize_paragraphs as kn_tokens

PROMPTS = ("It was a truth universally acknowledged that",
           "The ship sailed out of the harbour, and",
           "Emma could not help thinking that")
BATCH = 16


def perplexity(model: Model, seqs: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """exp(mean NLL) of the model over "[CLS] p [SEP]" sequences (truncated), and the count."""
    tok = model.tokenizer
    assert tok is not None
    bos, eos = special_ids(tok)
    examples = paragraph_examples(seqs, max_tokens, bos, eos)
    total, count = 0.0, 0
    span = model.span()
    with torch.inference_mode():
        for i in range(0, len(examples), BATCH):
            ex = examples.take(range(i, min(i + BATCH, len(examples))))
            width = int((ex.targets != -100).sum(dim=1).max())  # drop all-padding columns
            x, y = ex.inputs[:, :width], ex.targets[:, :width]
            logits = span(x, ForwardContext.for_tokens(x.shape[0], width, causal=True))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((y != -100).sum())
    return math.exp(total / count), count


def samples(model: Model, n_tokens: int) -> list[str]:
    tok = model.tokenizer
    assert tok is not None
    out = []
    for seed, prompt in enumerate(PROMPTS):
        params = GenerationParams(max_new_tokens=n_tokens, temperature=0.8, top_k=40, seed=seed,
                                  stop_token_ids=(special_ids(tok)[1],))
        done = generate(model, tok.encode_prompt(prompt), params, decode=tok.decode)
        out.append(f"{prompt} {done.text}".strip())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="24 paragraphs, no samples")
    p.add_argument("--max-tokens", type=int, default=512, help="context per paragraph")
    p.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/nexusd/models")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    registry = ModelRegistry(args.models_dir)
    trained, random_init = registry.load_model("nexus-1.1"), registry.load_model("nexus-1.1-random")
    tok = trained.tokenizer
    assert tok is not None
    val = paragraphs(corpus_text("validation"))
    if args.smoke:
        val = val[:24]
    seqs = tok.encode_untruncated(val)
    ppl, scored = perplexity(trained, seqs, args.max_tokens)
    ppl_random, _ = perplexity(random_init, seqs, args.max_tokens)
    kn = KneserNey3().fit(kn_tokens(corpus_text("train")))
    bos, eos = special_ids(tok)
    cut = [[bos, *s, eos][: args.max_tokens + 1] for s in seqs]
    ppl_kn = kn.perplexity(cut)
    result = {
        "bench": "lm_quality", "paragraphs": len(seqs), "scored_tokens": scored,
        "nexus_val_ppl": round(ppl, 2), "random_init_val_ppl": round(ppl_random, 2),
        "kn3_val_ppl": round(ppl_kn, 2), "beats_kn3": ppl < ppl_kn,
        "ratio_to_kn3": round(ppl / ppl_kn, 3),
        "samples": [] if args.smoke else samples(trained, 40),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m bench.lm_quality" + (" --smoke" if args.smoke else ""),
    }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
