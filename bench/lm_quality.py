"""Benchmark: how well the shipped Nexus 1.1 writes English, against two baselines.

    python -m bench.lm_quality            # the full validation split (~3-5 min on 2 cores)
    python -m bench.lm_quality --smoke    # 24 paragraphs, for the tests

Per-token perplexity on the shipped corpus's validation split (`atoms.corpus`) of:
- the trained `nexus-1.1` (the weights in data/models/, trained by the mesh itself),
- `nexus-1.1-random` (the same architecture with untrained blocks),
- an interpolated Kneser-Ney 3-gram over the same WordPiece tokens (bench/lm_baseline.py),
all scored on exactly the same tokens: one sequence per paragraph, "[CLS] p [SEP]", [CLS]
never scored, every other token scored once. The neural models see at most `--window`
tokens of context (default 128, the shipped model's training window; longer paragraphs are
scored with sliding windows shaped like the training windows), the 3-gram two. The bar (issue 12):
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
from atoms.datasets import Examples, special_ids
from atoms.generation import GenerationParams, generate
from atoms.model import Model
from atoms.training import IGNORE
from nexusd.model_registry import ModelRegistry

from .lm_baseline import KneserNey3
from .lm_baseline import tokenize_paragraphs as kn_tokens

PROMPTS = (
    "It was a truth universally acknowledged that",
    "The ship sailed out of the harbour, and",
    "Emma could not help thinking that",
)
BATCH = 16


def strided_examples(seqs: list[list[int]], window: int, bos: int, eos: int) -> Examples:
    """Every target of every "[BOS] p [EOS]" scored exactly once, with up to `window` tokens
    of context: the first window of a paragraph as is; past it, windows "[BOS] + the last
    window-1 tokens" (the shape of the training windows) sliding by window // 2, each
    scoring only the targets the previous window did not."""
    stride = max(1, window // 2)
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for p in seqs:
        seq = [bos, *p, eos]
        n = len(seq) - 1  # targets seq[1..n]
        first = min(n, window)
        inputs.append(seq[:first])
        targets.append(seq[1 : first + 1])
        done = first  # targets seq[1..done] scored
        while done < n:
            end = min(n, done + stride)  # score targets seq[done+1 .. end]
            ctx = seq[end - (window - 1) : end]  # the tokens before seq[end], window-1 of them
            inputs.append([bos, *ctx])
            preds = [*ctx, seq[end]]  # what each input position predicts
            targets.append(
                [t if i >= len(preds) - (end - done) else IGNORE for i, t in enumerate(preds)]
            )
            done = end
    width = max(len(x) for x in inputs)
    x = torch.zeros((len(inputs), width), dtype=torch.long)
    y = torch.full((len(inputs), width), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(zip(inputs, targets, strict=True)):
        x[i, : len(a)] = torch.tensor(a)
        y[i, : len(b)] = torch.tensor(b)
    return Examples(inputs=x, targets=y)


def perplexity(model: Model, seqs: list[list[int]], window: int) -> tuple[float, int]:
    """exp(mean NLL) of the model over the "[CLS] p [SEP]" sequences (every target, with at
    most `window` tokens of context), and how many targets were scored."""
    tok = model.tokenizer
    assert tok is not None
    bos, eos = special_ids(tok)
    examples = strided_examples(seqs, window, bos, eos)
    total, count = 0.0, 0
    span = model.span()
    with torch.inference_mode():
        for i in range(0, len(examples), BATCH):
            ex = examples.take(range(i, min(i + BATCH, len(examples))))
            width = int((ex.inputs != 0).sum(dim=1).max())  # drop all-padding columns
            x, y = ex.inputs[:, :width], ex.targets[:, :width]
            logits = span(x, ForwardContext.for_tokens(x.shape[0], width, causal=True))
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            total += float(loss)
            count += int((y != IGNORE).sum())
    return math.exp(total / count), count


def samples(model: Model, n_tokens: int) -> list[str]:
    tok = model.tokenizer
    assert tok is not None
    out = []
    for seed, prompt in enumerate(PROMPTS):
        params = GenerationParams(
            max_new_tokens=n_tokens,
            temperature=0.8,
            top_k=40,
            seed=seed,
            stop_token_ids=(special_ids(tok)[1],),
        )
        done = generate(model, tok.encode_prompt(prompt), params, decode=tok.decode)
        out.append(f"{prompt}{done.text}".strip())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="24 paragraphs, no samples")
    p.add_argument(
        "--window",
        type=int,
        default=128,
        help="tokens of context at most (the training window of the shipped model)",
    )
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
    ppl, scored = perplexity(trained, seqs, args.window)
    ppl_random, _ = perplexity(random_init, seqs, args.window)
    kn = KneserNey3().fit(kn_tokens(corpus_text("train")))
    bos, eos = special_ids(tok)
    ppl_kn = kn.perplexity([[bos, *s, eos] for s in seqs])  # every target, as the models
    result = {
        "bench": "lm_quality",
        "paragraphs": len(seqs),
        "scored_tokens": scored,
        "nexus_val_ppl": round(ppl, 2),
        "random_init_val_ppl": round(ppl_random, 2),
        "kn3_val_ppl": round(ppl_kn, 2),
        "beats_kn3": ppl < ppl_kn,
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
