"""The HTTP API's ASGI app against a fake job backend: shapes, refusals, limits, streaming,
disconnects (no server, no daemon: the app is called as hypercorn would call it)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from nexusd.api.records import (
    CancelRequest,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    TokenEvent,
)
from nexusd.config import ApiConfig
from nexusd.errors import ApiError, SetupError
from nexusd.http.app import HttpApp, ModelCard
from nexusd.http.openai import LLAMA3_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate, HttpError
from nexusd.http.server import TOKEN_FILE, hypercorn_config, is_loopback, load_token
from nexusd.metrics import Metrics

WORDS = (" one", " two", " three")


@dataclass
class FakeBackend:
    requests: list[object] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)

    async def call(self, request: object, emit: Any) -> object:
        self.requests.append(request)
        if isinstance(request, CancelRequest):
            self.cancelled.append(request.job_id)
            self.release.set()
            return None
        if isinstance(request, GenerateRequest):
            if request.model == "missing":
                raise ApiError("not_found", f"unknown model {request.model!r}; known: nexus-1.1")
            if request.model == "norooute":
                raise ApiError("unavailable", "no route: nobody hosts atoms 0-4")
            for i, w in enumerate(WORDS):
                await emit(TokenEvent(request.job_id, i, w))
                if request.model == "slow" and i == 0:
                    self.started.set()
                    await self.release.wait()
                    raise ApiError("failed", f"job {request.job_id} was cancelled")
            return GenerateReply(
                job_id=request.job_id,
                model=request.model,
                text="".join(WORDS),
                token_ids=(1, 2, 3),
                stop_reason="max_new_tokens",
                prompt_tokens=5,
                elapsed_s=0.1,
                tokens_per_s=30.0,
                route=(),
                failovers=(),
            )
        if isinstance(request, EmbedRequest):
            vecs = [[float(i), 0.5, -1.0] for i in range(len(request.texts))]
            return EmbedReply(
                job_id=request.job_id,
                model=request.model,
                count=len(vecs),
                dims=3,
                vectors=struct.pack(f"<{3 * len(vecs)}f", *(x for v in vecs for x in v)),
                elapsed_s=0.1,
                texts_per_s=10.0,
                route=(),
                failovers=(),
            )
        raise AssertionError(f"unexpected request {request!r}")

    def models(self) -> list[ModelCard]:
        return [ModelCard("minilm", "embed"), ModelCard("nexus-1.1", "generate")]

    def chat_template(self, model: str) -> ChatTemplate:
        return PLAIN_TEMPLATE

    def count_tokens(self, model: str, texts: Sequence[str]) -> int:
        return sum(len(t.split()) for t in texts)

    async def mesh(self) -> dict[str, Any]:
        return {"members": [{"name": "node0"}], "running": [], "recent": []}


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def make_app(backend: FakeBackend, **kw: Any) -> HttpApp:
    opts: dict[str, Any] = {
        "token": None,
        "max_body_bytes": 4096,
        "body_timeout_s": 5.0,
        "max_inflight": 4,
    }
    opts.update(kw)
    return HttpApp(backend, metrics=Metrics(), **opts)


async def call(
    app: HttpApp,
    method: str,
    path: str,
    body: bytes | object = b"",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    chunks: Sequence[bytes] | None = None,
    disconnect: trio.Event | None = None,
) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = list(chunks) if chunks is not None else [raw]
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if parts:
            data = parts.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(parts)}
        if disconnect is None:
            await trio.sleep_forever()
        else:
            await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    with trio.fail_after(10):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Reply(start["status"], dict(start["headers"]), data)


def error_of(reply: Reply) -> dict[str, Any]:
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    return dict(err)


async def test_models_and_completion_shapes() -> None:
    app = make_app(FakeBackend())
    models = (await call(app, "GET", "/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["minilm", "nexus-1.1"]
    one = await call(app, "GET", "/v1/models/nexus-1.1")
    assert one.status == 200 and one.json()["id"] == "nexus-1.1"
    assert (await call(app, "GET", "/v1/models/nope")).status == 404
    r = await call(app, "POST", "/v1/completions", {"model": "nexus-1.1", "prompt": "hi"})
    assert r.status == 200 and r.headers[b"content-type"] == b"application/json"
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == " one two three"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


async def test_chat_renders_the_template_and_passes_sampling() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    body = {
        "model": "nexus-1.1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello?"}]},
        ],
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 3,
        "stop": "\n\n",
    }
    r = await call(app, "POST", "/v1/chat/completions", body)
    assert r.status == 200
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": " one two three"}
    req = backend.requests[0]
    assert isinstance(req, GenerateRequest)
    assert req.prompt == "Be brief.\n\nUser: Hello?\nAssistant:"
    assert (req.max_new_tokens, req.temperature, req.top_p, req.seed) == (7, 0.0, 0.5, 3)
    assert req.stop == ("\n\n", "User:")


def test_llama3_template() -> None:
    text = LLAMA3_TEMPLATE.render([("user", "Hi")])
    assert text == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


async def test_streaming_is_server_sent_events_with_usage() -> None:
    app = make_app(FakeBackend())
    body = {
        "model": "nexus-1.1",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await call(app, "POST", "/v1/chat/completions", body)
    assert r.status == 200 and r.headers[b"content-type"] == b"text/event-stream"
    events = [e.removeprefix(b"data: ") for e in r.body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == " one two three"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


async def test_embeddings_float_and_base64() -> None:
    app = make_app(FakeBackend())
    r = await call(app, "POST", "/v1/embeddings", {"model": "minilm", "input": ["a b", "c"]})
    out = r.json()
    assert [d["embedding"] for d in out["data"]] == [[0.0, 0.5, -1.0], [1.0, 0.5, -1.0]]
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = {"model": "minilm", "input": "a", "encoding_format": "base64"}
    packed = (await call(app, "POST", "/v1/embeddings", body)).json()["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(packed)) == (0.0, 0.5, -1.0)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": "nexus-1.1"}, 400, "prompt"),
        ("/v1/completions", {"model": 5, "prompt": "x"}, 400, "model"),
        (
            "/v1/completions",
            {"model": "nexus-1.1", "prompt": "x", "max_tokens": "9"},
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": "nexus-1.1", "prompt": "x", "temperature": -1},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "nexus-1.1", "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "nexus-1.1", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"model": "nexus-1.1", "prompt": "x", "stop": [1]}, 400, "stop"),
        ("/v1/completions", {"model": "nexus-1.1", "prompt": [1, 2]}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "nexus-1.1", "messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "nexus-1.1", "messages": [{"role": "bot"}]},
            400,
            "messages[0]",
        ),
        ("/v1/embeddings", {"model": "minilm", "input": [3]}, 400, "input"),
        (
            "/v1/embeddings",
            {"model": "minilm", "input": "x", "encoding_format": "hex"},
            400,
            "encoding_format",
        ),
        ("/v1/completions", {"model": "missing", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": "norooute", "prompt": "x"}, 503, None),
        ("/v1/nothing", {}, 404, None),
    ],
)
async def test_bad_requests_get_openai_errors(
    path: str, body: object, status: int, param: str | None
) -> None:
    r = await call(make_app(FakeBackend()), "POST", path, body)
    assert r.status == status, r.body
    assert error_of(r)["param"] == param


async def test_wrong_method_and_huge_bodies() -> None:
    app = make_app(FakeBackend(), max_body_bytes=100)
    assert (await call(app, "GET", "/v1/completions")).status == 405
    declared = await call(
        app, "POST", "/v1/completions", b"{}", headers=[(b"content-length", b"5000")]
    )
    assert declared.status == 413 and error_of(declared)["code"] == "too_large"
    streamed = await call(app, "POST", "/v1/completions", chunks=[b"x" * 60, b"x" * 60])
    assert streamed.status == 413


async def test_token_required_when_configured() -> None:
    app = make_app(FakeBackend(), token="s3cret-token-0123456789")
    missing = await call(app, "GET", "/v1/models")
    assert missing.status == 401 and error_of(missing)["type"] == "authentication_error"
    wrong = await call(app, "GET", "/v1/models", headers=[(b"authorization", b"Bearer nope")])
    assert wrong.status == 401
    ok = [(b"authorization", b"Bearer s3cret-token-0123456789")]
    assert (await call(app, "GET", "/v1/models", headers=ok)).status == 200
    assert (await call(app, "GET", "/api/mesh")).status == 401
    page = await call(app, "GET", "/")  # the page holds no data; it asks with the token
    assert page.status == 200 and b"<html" in page.body


async def test_idempotency_key_is_the_job_id() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    key = [(b"idempotency-key", b"retry-me")]
    body = {"model": "nexus-1.1", "prompt": "x"}
    a = (await call(app, "POST", "/v1/completions", body, headers=key)).json()
    b = (await call(app, "POST", "/v1/completions", body, headers=key)).json()
    c = (await call(app, "POST", "/v1/completions", body)).json()
    assert a["id"] == b["id"] != c["id"]
    ids = [r.job_id for r in backend.requests if isinstance(r, GenerateRequest)]
    assert ids[0] == ids[1] and ids[0].startswith("http-") and ids[2] != ids[0]


async def test_busy_is_429_and_disconnect_cancels_the_job() -> None:
    backend = FakeBackend()
    app = make_app(backend, max_inflight=1)
    gone = trio.Event()
    body = {"model": "slow", "prompt": "x", "stream": True}
    async with trio.open_nursery() as nursery:
        result: list[Reply] = []

        async def slow() -> None:
            result.append(await call(app, "POST", "/v1/completions", body, disconnect=gone))

        nursery.start_soon(slow)
        await backend.started.wait()
        busy = await call(app, "POST", "/v1/completions", {"model": "nexus-1.1", "prompt": "x"})
        assert busy.status == 429 and error_of(busy)["type"] == "rate_limit_error"
        gone.set()
    job = next(r for r in backend.requests if isinstance(r, GenerateRequest))
    assert backend.cancelled == [job.job_id]
    assert result[0].status == 200  # the stream had begun: its first token went out
    assert b" one" in result[0].body
    again = await call(app, "POST", "/v1/completions", {"model": "nexus-1.1", "prompt": "x"})
    assert again.status == 200  # the slot came back


def test_http_error_shape() -> None:
    err = HttpError(429, "busy", kind="rate_limit_error", code="busy").body()
    assert err == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "busy"}
    }


def test_token_file_rules(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert load_token(tmp_path, "127.0.0.1") is None  # loopback, no file: open
    token = load_token(tmp_path, "0.0.0.0")  # any other bind: created, then required
    assert token is not None and len(token) >= 32
    path = tmp_path / TOKEN_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_token(tmp_path, "127.0.0.1") == token  # the file exists: loopback too
    path.chmod(0o644)
    with pytest.raises(SetupError, match="chmod 600"):
        load_token(tmp_path, "0.0.0.0")


def test_hypercorn_bounds_come_from_the_config() -> None:
    hc = hypercorn_config(ApiConfig(http_port=8123, http_host="::1", http_keep_alive_s=3.0))
    assert hc.bind == ["[::1]:8123"]
    assert hc.keep_alive_timeout == 3.0 and hc.h11_max_incomplete_size == 16 * 1024
    assert hc.read_timeout is None  # a client waiting on a long job is not cut off
