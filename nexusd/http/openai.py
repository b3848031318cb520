"""OpenAI's request and response shapes, mapped onto the job API's records (sans-IO).

Rule 1: a request body is checked field by field before a job exists; a bad field is an
`HttpError(400, ..., param=NAME)` naming it, in OpenAI's error shape.
Rule 2: only what the engine can honour is accepted: `n` other than 1, token-array prompts,
`logprobs`, `echo`, `best_of` are refused with 400, never silently ignored.
Rule 3: responses are built from the job API's replies (`GenerateReply`, `EmbedReply`);
nothing here runs a job.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

from .. import chat_template
from ..api.records import SEED_LIMIT, EmbedReply, EmbedRequest, GenerateReply, GenerateRequest
from ..errors import ApiError

MAX_STOP = 4  # stop sequences per request (as OpenAI)
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 128
CHAT_ROLES = ("system", "user", "assistant", "developer")

# ApiError codes of the job API -> (HTTP status, OpenAI error type)
STATUS_OF_CODE: dict[str, tuple[int, str]] = {
    "malformed": (400, "invalid_request_error"),
    "bad_request": (400, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "unavailable": (503, "service_unavailable"),
    "refused": (403, "permission_error"),
    "failed": (500, "server_error"),
    "too_large": (413, "invalid_request_error"),
    "internal": (500, "server_error"),
}


class HttpError(Exception):
    """A refusal sent as OpenAI's error JSON with `status`."""

    def __init__(
        self, status: int, message: str, *, kind: str = "", param: str | None = None, code: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code or None,
            }
        }


def from_api_error(exc: ApiError) -> HttpError:
    """The HTTP refusal of a job API refusal (same message, status by its code)."""
    status, kind = STATUS_OF_CODE.get(exc.code, (500, "server_error"))
    code = exc.code
    param = None
    if exc.code == "not_found" and "model" in exc.message:
        code, param = "model_not_found", "model"
    return HttpError(status, exc.message, kind=kind, param=param, code=code)


# ---- parsing --------------------------------------------------------------------------------


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _bad(param: str, expected: str, got: object) -> HttpError:
    shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
    return HttpError(400, f"{param}: expected {expected}, got {shown}", param=param)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(key, "a non-empty string", value)
    return value


def _int(data: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(key, f"an integer in {lo}..{hi}", value)
    return value


def _float(data: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise _bad(key, f"a number in {lo}..{hi}", value)
    return float(value)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(key, "true or false", value)
    return value


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or len(items) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
    ):
        raise _bad("stop", f"a string or a list of at most {MAX_STOP} non-empty strings", value)
    return tuple(items)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    if _int(data, "n", 1, 1, 128) != 1:
        raise HttpError(400, "n: only n=1 is supported", param="n", code="unsupported")
    for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if data.get(key) not in (None, False, [], 0):
            raise HttpError(400, f"{key}: not supported by nexusd", param=key, code="unsupported")
    if data.get("best_of") not in (None, 1):
        raise HttpError(400, "best_of: only 1 is supported", param="best_of", code="unsupported")
    for key in ("presence_penalty", "frequency_penalty"):
        _float(data, key, 0.0, -2.0, 2.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TextCall:
    """A parsed /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompt: str  # chat: the rendered template
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    def job(self, job_id: str) -> GenerateRequest:
        return GenerateRequest(
            prompt=self.prompt,
            model=self.model,
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            job_id=job_id,
        )


def _sampling(
    data: dict[str, Any], *, chat: bool, prompt: str, extra_stop: tuple[str, ...]
) -> TextCall:
    _refuse_unsupported(data)
    default = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_MAX_TOKENS
    key = "max_completion_tokens" if chat and data.get("max_completion_tokens") else "max_tokens"
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    stop = _stop(data)
    return TextCall(
        chat=chat,
        model=_str(data, "model"),
        prompt=prompt,
        max_tokens=_int(data, key, default, 1, 4096),
        temperature=_float(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(data, "top_p", 1.0, 1e-9, 1.0),
        seed=_int(data, "seed", -1, 0, SEED_LIMIT - 1) if data.get("seed") is not None else None,
        stop=stop + tuple(s for s in extra_stop if s not in stop),
        stream=_bool(data, "stream"),
        include_usage=bool(options and options.get("include_usage") is True),
    )


def parse_completion(data: dict[str, Any]) -> TextCall:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "a non-empty string (one prompt per request)", prompt)
    return _sampling(data, chat=False, prompt=prompt, extra_stop=())


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(f"messages[{i}].content", "text parts only", part)
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"messages[{i}].content", "text parts with a string text", part)
            parts.append(text)
        content = "".join(parts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content", "a string", content)
    return content


def parse_chat(data: dict[str, Any], template: ChatTemplate) -> TextCall:
    messages = data.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise _bad("messages", f"a list of 1..{MAX_MESSAGES} messages", messages)
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}]", f"an object with a role in {CHAT_ROLES}", m)
        turns.append((str(m["role"]), _content(m, i)))
    return _sampling(data, chat=True, prompt=template.render(turns), extra_stop=template.stop)


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """How a conversation becomes one prompt for a model, and where its answer ends."""

    @classmethod
    def shipped(cls, text: str, *, model: str, eos: str) -> ChatTemplate:
        """The Jinja template an imported model shipped (its end-of-sequence id stops it)."""
        return cls("shipped", "", "", "", "", (), jinja=text, model=model, eos=eos)

    name: str
    system: str  # format of a system turn, with {content}
    user: str
    assistant: str
    generation: str  # appended after the last turn: the assistant's turn begins
    stop: tuple[str, ...]
    jinja: str = ""  # a template the model shipped (`nexusd.chat_template`): used instead
    model: str = ""
    eos: str = ""

    def render(self, turns: list[tuple[str, str]]) -> str:
        if self.jinja:
            return chat_template.render(self.jinja, turns, model=self.model, eos=self.eos)
        fmt = {"system": self.system, "developer": self.system, "user": self.user}
        return (
            "".join(fmt.get(role, self.assistant).format(content=c.strip()) for role, c in turns)
            + self.generation
        )


# Nexus 1.1 (and any plain decoder): a transcript of "User:" / "Assistant:" lines.
PLAIN_TEMPLATE = ChatTemplate(
    name="plain",
    system="{content}\n\n",
    user="User: {content}\n",
    assistant="Assistant: {content}\n",
    generation="Assistant:",
    stop=("User:",),
)
# Llama 3 instruct imports (their tokenizer declares the header tokens).
LLAMA3_TEMPLATE = ChatTemplate(
    name="llama3",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stop=("<|eot_id|>",),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedCall:
    model: str
    texts: tuple[str, ...]
    base64: bool

    def job(self, job_id: str) -> EmbedRequest:
        return EmbedRequest(texts=self.texts, model=self.model, job_id=job_id)


def parse_embeddings(data: dict[str, Any]) -> EmbedCall:
    value = data.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise _bad("input", "a non-empty string or a list of non-empty strings", value)
    fmt = data.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", '"float" or "base64"', fmt)
    if data.get("dimensions") is not None:
        raise HttpError(400, "dimensions: not supported", param="dimensions", code="unsupported")
    return EmbedCall(model=_str(data, "model"), texts=tuple(texts), base64=fmt == "base64")


# ---- responses ------------------------------------------------------------------------------


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "max_new_tokens" else "stop"


def usage(reply: GenerateReply) -> dict[str, int]:
    done = len(reply.token_ids)
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": reply.prompt_tokens + done,
    }


def response_id(call: TextCall, job_id: str) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + job_id


def text_response(call: TextCall, reply: GenerateReply, created: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "logprobs": None}
    choice["finish_reason"] = finish_reason(reply.stop_reason)
    if call.chat:
        choice["message"] = {"role": "assistant", "content": reply.text}
    else:
        choice["text"] = reply.text
    return {
        "id": response_id(call, reply.job_id),
        "object": "chat.completion" if call.chat else "text_completion",
        "created": created,
        "model": reply.model,
        "choices": [choice],
        "usage": usage(reply),
        "system_fingerprint": None,
    }


def chunk(
    call: TextCall,
    job_id: str,
    created: int,
    *,
    text: str | None = None,
    finish: str | None = None,
    usage_of: GenerateReply | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a text piece, the finish reason, or (choices empty) the usage."""
    choices: list[dict[str, Any]] = []
    if usage_of is None:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if call.chat:
            choice["delta"] = {} if text is None else {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choices.append(choice)
    out: dict[str, Any] = {
        "id": response_id(call, job_id),
        "object": "chat.completion.chunk" if call.chat else "text_completion",
        "created": created,
        "model": call.model,
        "choices": choices,
    }
    if usage_of is not None:
        out["usage"] = usage(usage_of)
    return out


def embeddings_response(call: EmbedCall, reply: EmbedReply, prompt_tokens: int) -> dict[str, Any]:
    row = reply.dims * 4
    data = []
    for i in range(reply.count):
        raw = reply.vectors[i * row : (i + 1) * row]
        vec: Any
        if call.base64:
            vec = base64.b64encode(raw).decode()
        else:
            vec = list(struct.unpack(f"<{reply.dims}f", raw))
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {
        "object": "list",
        "data": data,
        "model": reply.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def now_s() -> int:
    return int(time.time())
