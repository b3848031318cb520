"""Autoregressive generation: sampling, stopping, streaming, as a sans-IO state machine.

`TokenGenerator` knows nothing about where logits come from: `start(prompt)` returns a
`StepRequest` (the tokens to run and their first position), the caller runs them through
the model (locally, or span by span on remote hosts, each with its own KV cache) and hands
the last position's logits to `feed(logits)`, which samples the next token and returns the
next `StepRequest` or `Done`. `generate()` is the local driver over a list of atoms.

Driving it over remote spans (what the daemon does)::

    gen = TokenGenerator(params, decode=tok.decode, on_token=stream)
    req = gen.start(prompt_ids)
    while isinstance(req, StepRequest):
        x = req.input_ids()                        # (1, T) ids for the first span
        for host in route:                         # each host: its span + its SessionCache
            x = host.run(x, start=req.start)       # ForwardContext.for_tokens(1, T,
        req = gen.feed(x)                          #   start=req.start, causal=True, cache=...)
    done = req                                     # Done(token_ids, text, reason)

On fail-over the origin replays earlier inputs to the new host; the generator is untouched
because it only ever sees logits. With greedy params, the caller may pick the token where
the logits are (the last host takes the argmax) and hand it to `feed_token(token)`.

Rule 1: all randomness comes from one `torch.Generator` seeded from `GenerationParams.seed`;
the same seed, prompt and logits give the same tokens. No global RNG.
Rule 2: `sample_next` is pure (logits in, token ids out); temperature 0 is greedy argmax.
Rule 3: state transitions are explicit (NEW -> RUNNING -> DONE); calling `start` or `feed`
in the wrong state raises `GenerationStateError`, never returns None.
Rule 4: streamed text never shows a stop sequence: text that could still become one is held
back until it cannot, and the stop sequence and everything after it are dropped.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .atom import Atom, ForwardContext
from .cache import SessionCache
from .codecs import all_finite
from .errors import GenerationStateError, NonFiniteInput, ShapeMismatch
from .span import Span

Decode = Callable[[Sequence[int]], str]
OnToken = Callable[[int, str], None]
DEFAULT_CACHE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How to pick tokens and when to stop.

    Args:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy argmax, else logits are divided by it (> 0, finite).
        top_k: keep only the k most likely tokens; 0 turns it off.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose
            probability sums to >= top_p; 1.0 turns it off. In (0, 1].
        seed: seed of the sampling RNG; None seeds it from the OS (not reproducible).
        stop_token_ids: tokens (e.g. eos) that end generation; the token is kept in
            `Done.token_ids` but not in the text.
        stop_sequences: strings that end generation when they appear in the decoded text;
            the text is cut before the first occurrence. Needs a `decode` function.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(i) and i >= 0 for i in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a tuple of ints >= 0, got {self.stop_token_ids!r}"
            )
        if not isinstance(self.stop_sequences, tuple) or not all(
            isinstance(s, str) and s for s in self.stop_sequences
        ):
            raise ValueError(
                f"stop_sequences must be a tuple of non-empty strings, got {self.stop_sequences!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sample_next(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token from next-token logits.

    Order: temperature, then top-k, then top-p (as in `transformers`' logits warpers), then
    one draw from the renormalised distribution. Greedy (temperature 0) ignores top-k/top-p.

    Args:
        logits: (V,) or (B, V) float logits of the next token.
        params: the sampling settings.
        generator: the RNG for the draw (unused when greedy).

    Returns:
        int64 token ids of shape `logits.shape[:-1]`.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float().reshape(-1, logits.shape[-1]) / params.temperature  # (B, V)
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        scores = _top_p_filter(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    picked = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return picked.reshape(logits.shape[:-1])


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the most likely tokens until their cumulative probability reaches top_p: a token
    # is dropped when the mass strictly before it already reaches top_p, so the top token
    # always stays and the kept set is the smallest one with mass >= top_p.
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


class StopReason(enum.StrEnum):
    """Why generation ended."""

    MAX_NEW_TOKENS = "max_new_tokens"
    STOP_TOKEN = "stop_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, slots=True)
class StepRequest:
    """Run these tokens through the model (with the session's caches) and feed the logits.

    Args:
        token_ids: the new tokens: the whole prompt on step 0, one sampled token after.
        start: absolute position of `token_ids[0]` (= tokens already in the KV caches).
        step: 0 for the prefill, then 1, 2, ...
    """

    token_ids: tuple[int, ...]
    start: int
    step: int

    def input_ids(self) -> torch.Tensor:
        """(1, T) int64 ids, the input of the model's first (embedding) atom."""
        return torch.tensor([self.token_ids], dtype=torch.long)

    def context(self, cache: SessionCache | None = None) -> ForwardContext:
        """The causal `ForwardContext` every span of this step runs with: the LM head
        projects the last position only (the next token reads no other)."""
        return ForwardContext.for_tokens(
            1, len(self.token_ids), start=self.start, causal=True, cache=cache, logits_to_keep=1
        )


@dataclass(frozen=True, slots=True)
class Done:
    """The end of a generation.

    Args:
        token_ids: every generated token, including a final stop token.
        text: the decoded text, without stop token/sequence ("" without a decoder).
        reason: why it stopped.
    """

    token_ids: tuple[int, ...]
    text: str
    reason: StopReason


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"


class TokenGenerator:
    """Sans-IO generation loop for one sequence (batch 1).

    Args:
        params: sampling and stopping settings.
        decode: token ids -> text (e.g. the tokenizer's decode); needed for stop sequences
            and streamed text.
        on_token: called once per generated token with (token_id, text_piece); pieces
            concatenate to `Done.text` unless the decoder rewrites text it already gave
            (then the rewritten part is not streamed again; `Done.text` is still exact).

    Raises:
        ValueError: stop sequences without a decoder.
    """

    def __init__(
        self,
        params: GenerationParams,
        *,
        decode: Decode | None = None,
        on_token: OnToken | None = None,
    ) -> None:
        if params.stop_sequences and decode is None:
            raise ValueError("stop_sequences need a decode function to match text against")
        self.params = params
        self._decode = decode
        self._on_token = on_token
        self._rng = torch.Generator()
        if params.seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(params.seed)
        self._state = _State.NEW
        self.prompt: tuple[int, ...] = ()
        self.generated: list[int] = []
        self._emitted = ""  # text already passed to on_token
        self._window = 0  # generated tokens before it are decoded as `_settled` (_text_of)
        self._settled = ""
        self._step = 0
        self.result: Done | None = None

    @property
    def sequence(self) -> tuple[int, ...]:
        """Prompt plus generated tokens (what a cache-less full forward would run)."""
        return self.prompt + tuple(self.generated)

    def start(self, prompt_ids: Sequence[int]) -> StepRequest:
        """Begin with a prompt; returns the prefill request.

        Raises:
            GenerationStateError: already started.
            ValueError: empty prompt or negative ids.
        """
        if self._state is not _State.NEW:
            raise GenerationStateError(f"start() on a generator in state {self._state.value}")
        ids = tuple(int(i) for i in prompt_ids)
        if not ids or min(ids) < 0:
            raise ValueError(f"prompt must be a non-empty sequence of ids >= 0, got {ids!r}")
        self.prompt, self._state = ids, _State.RUNNING
        return StepRequest(token_ids=ids, start=0, step=0)

    def feed(self, logits: torch.Tensor) -> StepRequest | Done:
        """Take the model's logits for the last request; sample; say what to run next.

        Args:
            logits: (V,), (1, V) or (1, T, V) float; only the last position is used.

        Raises:
            GenerationStateError: not waiting for logits.
            ShapeMismatch / NonFiniteInput: logits of another shape, or NaN/Inf in them.
        """
        if self._state is not _State.RUNNING:
            raise GenerationStateError(f"feed() on a generator in state {self._state.value}")
        last = self._last_logits(logits)
        return self._accept(int(sample_next(last, self.params, self._rng)))

    def feed_token(self, token: int) -> StepRequest | Done:
        """Take the next token picked elsewhere (the greedy argmax of the last request's
        logits, e.g. by the host of the LM head); say what to run next, as `feed` does.

        Raises:
            GenerationStateError: not waiting for the next token, or the params are not
                greedy (a sampled token needs this generator's RNG: use `feed`).
            ValueError: `token` is not an int >= 0.
        """
        if self._state is not _State.RUNNING:
            raise GenerationStateError(f"feed_token() on a generator in state {self._state.value}")
        if not self.params.greedy:
            raise GenerationStateError(
                f"feed_token() needs greedy params (temperature 0), got temperature "
                f"{self.params.temperature}: sampling happens here, from logits (feed)"
            )
        if not _is_int(token) or token < 0:
            raise ValueError(f"token must be an int >= 0, got {token!r}")
        return self._accept(token)

    def _accept(self, token: int) -> StepRequest | Done:
        """Append the next token; stop tokens, text pieces, and the next request."""
        self.generated.append(token)
        self._step += 1
        reason = self._stop_reason(token)
        stop_token = reason is StopReason.STOP_TOKEN
        piece, hit_stop = self._advance_text(final=reason is not None, stop_token=stop_token)
        if hit_stop:
            reason = StopReason.STOP_SEQUENCE
        if self._on_token is not None:
            self._on_token(token, piece)
        if reason is not None:
            self._state = _State.DONE
            self.result = Done(tuple(self.generated), self._emitted, reason)
            return self.result
        start = len(self.prompt) + len(self.generated) - 1
        return StepRequest(token_ids=(token,), start=start, step=self._step)

    def _last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3 and logits.shape[0] == 1:
            logits = logits[0, -1]
        elif logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 1 or not logits.is_floating_point():
            raise ShapeMismatch(
                f"generation: expected (V,), (1, V) or (1, T, V) float logits, "
                f"got {tuple(logits.shape)} {logits.dtype}"
            )
        if not all_finite(logits):
            raise NonFiniteInput("generation: next-token logits hold NaN or Inf")
        return logits

    def _stop_reason(self, token: int) -> StopReason | None:
        if token in self.params.stop_token_ids:
            return StopReason.STOP_TOKEN
        if len(self.generated) >= self.params.max_new_tokens:
            return StopReason.MAX_NEW_TOKENS
        return None

    def _advance_text(self, *, final: bool, stop_token: bool) -> tuple[str, bool]:
        # Decode everything generated so far and emit what is new and safe to show: an
        # incomplete UTF-8 tail ("\ufffd") and any tail that could still grow into a stop
        # sequence wait for the next token, unless this is the last one.
        if self._decode is None:
            return "", False
        ids = self.generated[:-1] if stop_token else self.generated
        text = self._text_of(ids, final=final)
        cut = _first_stop(text, self.params.stop_sequences)
        if cut is not None:
            text, final = text[:cut], True
        elif not final:
            text = text[: _safe_length(text, self.params.stop_sequences)]
        # A decoder may rewrite earlier text (merging pieces): a stream cannot take text back,
        # so such a step streams nothing and later pieces follow the new text; Done.text is exact.
        extends = text.startswith(self._emitted)
        piece = text[len(self._emitted) :] if extends else ""
        self._emitted = text
        return piece, cut is not None

    def _text_of(self, ids: list[int], *, final: bool) -> str:
        """The text of `ids` (generated tokens), decoded after the prompt.

        The last step decodes all of them (`Done.text` is exactly the whole decode); the
        steps before decode a window of the latest tokens after the settled text before it
        (at most `WINDOW_MAX` tokens, so a token costs the same at 500 tokens as at 5: a
        whole decode per token made a long generation quadratic). The window moves forward
        only where the settled text plus the new window's decode equals the text as it
        stands, so a decoder that joins tokens across the cut (a WordPiece "##" piece, a
        byte-level character split over tokens) keeps the wider window until it settles.
        """
        if final:
            return self._decode_after(self.prompt[-1], ids)
        text = self._settled + self._decode_after(
            self._anchor(ids, self._window), ids[self._window :]
        )
        if len(ids) - self._window >= WINDOW_MAX:
            cut = len(ids) - WINDOW_KEEP
            settled = self._settled + self._decode_after(
                self._anchor(ids, self._window), ids[self._window : cut]
            )
            if settled + self._decode_after(ids[cut - 1], ids[cut:]) == text:
                self._window, self._settled = cut, settled
        return text

    def _anchor(self, ids: list[int], start: int) -> int:
        return ids[start - 1] if start > 0 else self.prompt[-1]

    def _decode_after(self, anchor: int, ids: Sequence[int]) -> str:
        # Decode after the token before `ids`, then drop its text: the first piece then
        # starts as it would in the whole text (" he" after "that", "s" after "that##")
        assert self._decode is not None
        head = self._decode([anchor])
        full = self._decode([anchor, *ids])
        return full[len(head) :] if full.startswith(head) else self._decode(ids)

    def __repr__(self) -> str:
        return (
            f"TokenGenerator(state={self._state.value}, prompt={len(self.prompt)}, "
            f"generated={len(self.generated)}/{self.params.max_new_tokens})"
        )


# Incremental decoding (TokenGenerator._text_of): a streamed step decodes at most
# WINDOW_MAX of the latest tokens; the window then moves up to keep WINDOW_KEEP.
WINDOW_MAX = 32
WINDOW_KEEP = 8

# Tails a WordPiece decode rewrites once the next token comes ("father '" + "s" ->
# "father's", "well -" + "known" -> "well-known"): held back, so a stream never shows text
# the final text changes.
HELD_TAILS = (" '", " -")


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of `text` that can be shown now (see `_advance_text`)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    if text.endswith(HELD_TAILS, 0, end):
        end -= 2  # the next token may join it to the word before (atoms.tokenizer)
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[end - n : end] == s[:n]:
                hold = max(hold, n)
                break
    return end - hold


# ------------------------------------------------------------------------ local driver


def as_span(runner: Span | Sequence[Atom] | object) -> Span:
    """A `Span` over a Span, a list of atoms, or anything with an `atoms` attribute (Model).

    Raises:
        TypeError: nothing atom-like was given.
    """
    if isinstance(runner, Span):
        return runner
    atoms = getattr(runner, "atoms", runner)
    items = list(atoms) if isinstance(atoms, Sequence | torch.nn.ModuleList) else None
    found = [a for a in items or () if isinstance(a, Atom)]
    if items is None or len(found) != len(items):
        raise TypeError(
            f"expected a Span, atoms, or an object with .atoms; got {type(runner).__name__}"
        )
    return Span(found)


@torch.no_grad()
def generate(
    runner: Sequence[Atom] | object,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    *,
    decode: Decode | None = None,
    on_token: OnToken | None = None,
    use_cache: bool = True,
    max_len: int | None = None,
    budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> Done:
    """Generate locally: prefill, then one cached decode step per token.

    Args:
        runner: a Span, the model's atoms (embedding first, LM head last), or a Model
            (anything with `.atoms`).
        prompt_ids: the prompt's token ids.
        params, decode, on_token: see `TokenGenerator`.
        use_cache: False re-runs the whole sequence every step (reference path for tests).
        max_len: KV cache capacity in tokens; default prompt + max_new_tokens.
        budget_bytes: the KV cache byte budget.

    Raises:
        CacheExhausted: the cache does not fit the budget, or the sequence outgrows max_len.
    """
    span = as_span(runner)
    gen = TokenGenerator(params, decode=decode, on_token=on_token)
    req: StepRequest | Done = gen.start(prompt_ids)
    cache: SessionCache | None = None
    if use_cache:
        length = max_len if max_len is not None else len(gen.prompt) + params.max_new_tokens
        cache = span.new_session_cache(batch=1, max_len=length, budget_bytes=budget_bytes)
    while isinstance(req, StepRequest):
        if cache is None:
            req = StepRequest(token_ids=gen.sequence, start=0, step=req.step)
        logits = span(req.input_ids(), req.context(cache))
        req = gen.feed(logits[:, -1])
    return req
