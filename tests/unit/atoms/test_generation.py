"""Sampling, stopping, streaming and the sans-IO generation state machine."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from atoms.atom import Atom
from atoms.errors import GenerationStateError, NonFiniteInput, ShapeMismatch
from atoms.generation import (
    Done,
    GenerationParams,
    StepRequest,
    StopReason,
    TokenGenerator,
    generate,
    sample_next,
)
from atoms.llama import LlamaConfig, build_llama_atoms, init_random

VOCAB = "abcdefghijklmnopqrstuvwxyz .!"


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def logits_for(token: int, vocab: int = len(VOCAB)) -> torch.Tensor:
    out = torch.zeros(vocab)
    out[token] = 10.0
    return out


def drive(gen: TokenGenerator, script: str, prompt: Sequence[int] = (0,)) -> Done:
    """Feed logits that make the generator pick `script`'s characters one by one."""
    req: StepRequest | Done = gen.start(prompt)
    for ch in script:
        assert isinstance(req, StepRequest)
        req = gen.feed(logits_for(VOCAB.index(ch)))
        if isinstance(req, Done):
            return req
    raise AssertionError(f"generation did not stop, last request {req}")


@pytest.fixture(scope="module")
def tiny_atoms() -> list[Atom]:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    g = torch.Generator().manual_seed(0)
    return [init_random(a, g, std=0.2) for a in build_llama_atoms(cfg, model_id="g")]


# ------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an int >= 1, got 2.0"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"top_k": -1}, r"top_k must be an int >= 0 \(0 = off\), got -1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
        ({"seed": -1}, r"seed must be None or an int in \[0, 2\*\*63\), got -1"),
        ({"stop_token_ids": [2]}, r"stop_token_ids must be a tuple of ints >= 0, got \[2\]"),
        ({"stop_sequences": ("",)}, "stop_sequences must be a tuple of non-empty strings"),
    ],
)
def test_bad_params_are_rejected_with_clear_messages(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)  # type: ignore[arg-type]  # ill-typed on purpose


def test_stop_sequences_need_a_decoder() -> None:
    with pytest.raises(ValueError, match="stop_sequences need a decode function"):
        TokenGenerator(GenerationParams(stop_sequences=("x",)))


# ------------------------------------------------------------------------ sampling

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))


def test_greedy_is_argmax() -> None:
    assert sample_next(LOGITS, GenerationParams()).tolist() == [0, 3]
    assert int(sample_next(LOGITS[1], GenerationParams())) == 3


def test_top_k_one_equals_greedy() -> None:
    params = GenerationParams(temperature=1.5, top_k=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert sample_next(LOGITS, params, g).tolist() == [0, 3]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    params = GenerationParams(temperature=1.0, top_p=top_p)
    g = torch.Generator().manual_seed(2)
    draws = sample_next(LOGITS[0].expand(400, -1), params, g)
    assert set(draws.tolist()) == kept


def test_top_k_masks_before_sampling() -> None:
    params = GenerationParams(temperature=1.0, top_k=2)
    draws = sample_next(LOGITS[1].expand(400, -1), params, torch.Generator().manual_seed(3))
    assert set(draws.tolist()) == {2, 3}


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_atoms: list[Atom]) -> None:
    def run(seed: int) -> tuple[int, ...]:
        params = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return generate(tiny_atoms, [1, 2, 3], params).token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


# ------------------------------------------------------------------------ stopping


def test_stop_sequence_stops_and_is_never_streamed() -> None:
    pieces: list[tuple[int, str]] = []
    params = GenerationParams(max_new_tokens=50, stop_sequences=("end",))
    gen = TokenGenerator(params, decode=decode, on_token=lambda t, p: pieces.append((t, p)))
    done = drive(gen, "hi en e bend more")
    assert done.reason is StopReason.STOP_SEQUENCE
    assert done.text == "hi en e b"
    assert "".join(p for _, p in pieces) == done.text
    assert len(pieces) == len(done.token_ids) == len("hi en e bend")
    assert pieces[3] == (VOCAB.index("e"), "")  # "e" could start "end": held back


def test_stop_token_ends_and_is_kept_out_of_text() -> None:
    eos = VOCAB.index("!")
    gen = TokenGenerator(GenerationParams(max_new_tokens=50, stop_token_ids=(eos,)), decode=decode)
    done = drive(gen, "ok!more")
    assert done == Done(token_ids=(14, 10, eos), text="ok", reason=StopReason.STOP_TOKEN)


def test_max_new_tokens_ends_with_all_text() -> None:
    pieces: list[str] = []
    params = GenerationParams(max_new_tokens=3, stop_sequences=("xyz",))
    gen = TokenGenerator(params, decode=decode, on_token=lambda _t, p: pieces.append(p))
    done = drive(gen, "abxyz")
    assert (done.text, done.reason) == ("abx", StopReason.MAX_NEW_TOKENS)
    assert pieces == ["a", "b", "x"]


def test_requests_carry_positions_for_cached_decode() -> None:
    gen = TokenGenerator(GenerationParams(max_new_tokens=3))
    first = gen.start([4, 5, 6])
    assert first == StepRequest(token_ids=(4, 5, 6), start=0, step=0)
    second = gen.feed(logits_for(9)[None, None].expand(1, 3, -1))  # (1, T, V) is accepted
    assert second == StepRequest(token_ids=(9,), start=3, step=1)
    assert second.context().positions.tolist() == [[3]]
    assert gen.sequence == (4, 5, 6, 9)


# ------------------------------------------------------------------------ state errors


def test_out_of_order_calls_raise() -> None:
    gen = TokenGenerator(GenerationParams(max_new_tokens=1))
    with pytest.raises(GenerationStateError, match="feed\\(\\) on a generator in state new"):
        gen.feed(logits_for(0))
    gen.start([1])
    with pytest.raises(GenerationStateError, match="start\\(\\) on a generator in state running"):
        gen.start([1])
    assert isinstance(gen.feed(logits_for(0)), Done)
    with pytest.raises(GenerationStateError, match="state done"):
        gen.feed(logits_for(0))


def test_bad_logits_and_prompts_are_rejected() -> None:
    gen = TokenGenerator(GenerationParams())
    with pytest.raises(ValueError, match="prompt must be a non-empty sequence"):
        gen.start([])
    gen.start([1])
    with pytest.raises(ShapeMismatch, match=r"got \(2, 29\)"):
        gen.feed(torch.zeros(2, len(VOCAB)))
    bad = logits_for(0)
    bad[3] = float("nan")
    with pytest.raises(NonFiniteInput, match="NaN or Inf"):
        gen.feed(bad)


def test_feed_token_takes_the_same_path_as_feed() -> None:
    """A token picked elsewhere (the greedy argmax on the LM head's host) gives the same
    requests, pieces, stop handling and result as the logits it came from."""
    eos = VOCAB.index("!")
    params = GenerationParams(max_new_tokens=50, stop_token_ids=(eos,), stop_sequences=("xy",))
    runs: list[tuple[list[object], list[tuple[int, str]]]] = []
    for by_token in (False, True):
        pieces: list[tuple[int, str]] = []
        gen = TokenGenerator(
            params, decode=decode, on_token=lambda t, p, out=pieces: out.append((t, p))
        )
        reqs: list[object] = [gen.start([1, 2])]
        for ch in "ab e!":
            tok = VOCAB.index(ch)
            reqs.append(gen.feed_token(tok) if by_token else gen.feed(logits_for(tok)))
        runs.append((reqs, pieces))
    assert runs[0] == runs[1]
    assert runs[1][0][-1] == Done((0, 1, 26, 4, eos), "ab e", StopReason.STOP_TOKEN)


def test_feed_token_needs_greedy_params_and_a_token_id() -> None:
    sampled = TokenGenerator(GenerationParams(temperature=0.7, seed=1))
    sampled.start([1])
    with pytest.raises(GenerationStateError, match="feed_token\\(\\) needs greedy params"):
        sampled.feed_token(3)
    greedy = TokenGenerator(GenerationParams(max_new_tokens=1))
    with pytest.raises(GenerationStateError, match="state new"):
        greedy.feed_token(3)
    greedy.start([1])
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="token must be an int >= 0"):
            greedy.feed_token(bad)  # type: ignore[arg-type]
    assert isinstance(greedy.feed_token(3), Done)
    with pytest.raises(GenerationStateError, match="state done"):
        greedy.feed_token(3)


# ------------------------------------------------------------------------ local driver


def test_cached_generation_equals_recomputation_and_streams(tiny_atoms: list[Atom]) -> None:
    seen: list[int] = []
    params = GenerationParams(max_new_tokens=20)
    cached = generate(tiny_atoms, [1, 2, 3, 4], params, on_token=lambda t, _p: seen.append(t))
    full = generate(tiny_atoms, [1, 2, 3, 4], params, use_cache=False)
    assert cached.token_ids == full.token_ids
    assert tuple(seen) == cached.token_ids and len(seen) == 20


def test_a_decoder_that_rewrites_text_keeps_done_text_exact() -> None:
    def merging(ids: Sequence[int]) -> str:  # "ab" renders as "X", like a merged piece
        return decode(ids).replace("ab", "X")

    pieces: list[str] = []
    gen = TokenGenerator(
        GenerationParams(max_new_tokens=3), decode=merging, on_token=lambda _t, p: pieces.append(p)
    )
    done = drive(gen, "abc")
    assert done.text == "Xc"
    assert pieces == ["a", "", "c"]


def test_a_stream_never_shows_text_the_wordpiece_tidy_rewrites() -> None:
    """Streamed pieces of a BERT-vocabulary generation concatenate to the final text even
    where a later token joins punctuation to the word before ("father ' s" -> "father's")."""
    from atoms.minilm import minilm_dir
    from atoms.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=64)
    ids = tok.encode_prompt("so his father's well-known account (at last) -- isn't it; yes.")
    prompt, rest = ids[:2], ids[2:]
    pieces: list[str] = []
    gen = TokenGenerator(
        GenerationParams(max_new_tokens=len(rest), temperature=0.0),
        decode=tok.decode,
        on_token=lambda _t, s: pieces.append(s),
    )
    gen.start(prompt)
    for token in rest:
        logits = torch.full((tok.vocab_size,), -1e9)
        logits[token] = 0.0
        done = gen.feed(logits)
    assert isinstance(done, Done)
    assert (
        "".join(pieces)
        == done.text
        == " his father's well-known account (at last) -- isn't it; yes."
    )


def test_a_long_stream_decodes_a_bounded_window_and_stays_exact() -> None:
    """Streaming decodes at most a window of the latest tokens per step (not the whole
    text: quadratic over a long generation), and the pieces still add up to the whole
    decode, across WordPiece "##" pieces and tidied punctuation at every window cut."""
    from atoms.generation import WINDOW_MAX
    from atoms.minilm import minilm_dir
    from atoms.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(minilm_dir() / "tokenizer.json", max_length=4096)
    sentence = "his father's unremarkable well-known account (at last) -- isn't it; yes. "
    (ids,) = tok.encode_untruncated([sentence * 12])
    prompt, rest = ids[:2], ids[2:]
    sizes: list[int] = []

    def counting(seq: Sequence[int]) -> str:
        sizes.append(len(seq))
        return tok.decode(seq)

    pieces: list[str] = []
    gen = TokenGenerator(
        GenerationParams(max_new_tokens=len(rest), temperature=0.0),
        decode=counting,
        on_token=lambda _t, s: pieces.append(s),
    )
    gen.start(prompt)
    for token in rest:
        done = gen.feed_token(token)
    assert isinstance(done, Done) and len(rest) > 6 * WINDOW_MAX
    assert (
        "".join(pieces)
        == done.text
        == tok.decode([prompt[-1], *rest])[len(tok.decode(prompt[-1:])) :]
    )
    final = max(i for i, n in enumerate(sizes) if n >= len(rest))  # the last step: all
    # the window (+ the token before it), a few tokens wider where a cut had to wait
    assert max(sizes[:final]) <= 2 * WINDOW_MAX < len(rest)
