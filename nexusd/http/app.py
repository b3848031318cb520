"""The ASGI app of the HTTP API: routing, limits, auth, streaming; jobs go to the job API.

Rule 1: every job goes through `Backend.call`, the same handlers as the Unix socket
(journaled, idempotent, routed across the mesh); an `Idempotency-Key` header becomes the
job id, so a retry with the same key joins or returns the same job.
Rule 2: everything is bounded before it is read: the body by `max_body_bytes` (413) and
`body_timeout_s` (408), jobs in flight by `max_inflight` (429). Every refusal is OpenAI's
error JSON with its status, logged with a reason and counted; never a stack trace.
Rule 3: a client that disconnects before its answer cancels its job, unless it sent an
`Idempotency-Key` (then the job finishes, and a retry with the key gets its result).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio

from ..api.records import CancelRequest, EmbedReply, GenerateReply, TokenEvent
from ..errors import NEXUS_ERRORS, ApiError
from ..jobs.journal import new_job_id
from ..metrics import Metrics
from .dashboard import DASHBOARD_HTML
from .openai import (
    ChatTemplate,
    HttpError,
    TextCall,
    chunk,
    embeddings_response,
    finish_reason,
    from_api_error,
    now_s,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_json,
    text_response,
)

log = structlog.get_logger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Emit = Callable[[object], Awaitable[None]]
MAX_IDEMPOTENCY_KEY = 256
_JOB_ERRORS: tuple[type[Exception], ...] = (HttpError, *NEXUS_ERRORS)  # ApiError among them
CANCEL_TRIES = 50  # a job not journaled yet cannot be cancelled: try again (0.1 s apart)


@dataclass(frozen=True, slots=True)
class ModelCard:
    model_id: str
    kind: str  # "generate" or "embed"


class Backend(Protocol):
    """What the HTTP API needs of the daemon."""

    async def call(self, request: object, emit: Emit) -> object:
        """One job API request, in-process (`ApiServer.call`)."""
        ...

    def models(self) -> list[ModelCard]: ...

    def chat_template(self, model: str) -> ChatTemplate: ...

    def count_tokens(self, model: str, texts: Sequence[str]) -> int: ...

    async def mesh(self) -> dict[str, Any]:
        """The dashboard's JSON: members, running and recent jobs."""
        ...


class _Response:
    """The ASGI send side, remembering whether the response has begun."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.status = 0

    async def start(
        self, status: int, content_type: str, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.started, self.status = True, status
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
        await self._send(
            {"type": "http.response.start", "status": status, "headers": [*headers, *extra]}
        )

    async def body(self, data: bytes, *, more: bool = False) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, payload: object) -> None:
        await self.whole(status, "application/json", json.dumps(payload).encode())

    async def whole(self, status: int, content_type: str, data: bytes) -> None:
        await self.start(status, content_type, [(b"content-length", str(len(data)).encode())])
        await self.body(data)


class HttpApp:
    """The OpenAI-compatible API and the dashboard, as one ASGI application.

    Args:
        backend: the daemon's job API and mesh data.
        token: the bearer token every API request must carry; None: no auth (loopback).
        max_body_bytes, body_timeout_s: bounds on reading a request body.
        max_inflight: HTTP jobs at once; more are refused with 429.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        token: str | None,
        max_body_bytes: int,
        body_timeout_s: float,
        max_inflight: int,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self._token = token
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_s
        self._inflight = trio.CapacityLimiter(max_inflight)
        self._metrics = metrics

    @property
    def token_required(self) -> bool:
        return self._token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websockets: not served (hypercorn closes the connection)
        res = _Response(send)
        path, method = scope["path"], scope["method"]
        try:
            await self._route(scope, receive, res)
        except HttpError as exc:
            await self._refuse(res, path, exc)
        except ApiError as exc:
            await self._refuse(res, path, from_api_error(exc))
        except NEXUS_ERRORS as exc:
            await self._refuse(res, path, HttpError(500, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # boundary: one request's bug, never the daemon
            log.exception("http_handler_crashed", path=path, error=type(exc).__name__)
            await self._refuse(
                res,
                path,
                HttpError(500, f"internal error ({type(exc).__name__}); see log", code="internal"),
            )
        self._metrics.inc("http_requests_total", method=method, status=str(res.status or 0))

    async def _refuse(self, res: _Response, path: str, exc: HttpError) -> None:
        self._metrics.inc("http_requests_refused_total", status=str(exc.status))
        log.info("http_request_refused", path=path, status=exc.status, reason=exc.message)
        if res.started:  # a stream began: the error goes into it
            await res.body(b"data: " + json.dumps(exc.body()).encode() + b"\n\n")
            await res.body(b"")
            return
        await res.json(exc.status, exc.body())

    async def _route(self, scope: Scope, receive: Receive, res: _Response) -> None:
        path, method = scope["path"], scope["method"]
        routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/": ("GET", self._dashboard),
            "/api/mesh": ("GET", self._mesh),
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/embeddings": ("POST", self._embeddings),
        }
        if path.startswith("/v1/models/"):
            self._authorise(scope)
            await self._model(path.removeprefix("/v1/models/"), res)
            return
        if path not in routes:
            raise HttpError(404, f"no route {path}", code="not_found")
        want, handler = routes[path]
        if method != want:
            raise HttpError(405, f"{path} takes {want}, got {method}", code="method_not_allowed")
        if path != "/":
            self._authorise(scope)
        if method == "POST":
            data = parse_json(await self._read_body(scope, receive))
            await handler(scope, receive, res, data)
        else:
            await handler(res)

    def _authorise(self, scope: Scope) -> None:
        if self._token is None:
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not given or not hmac.compare_digest(given, self._token.encode()):
            raise HttpError(
                401,
                "a bearer token is required (Authorization: Bearer TOKEN; see DATA_DIR/http_token)",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            raise HttpError(413, f"the body is over {self._max_body} bytes", code="too_large")
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self._body_timeout) as scope_:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise HttpError(400, "the client went away before its body was in")
                data = msg.get("body", b"")
                size += len(data)
                if size > self._max_body:
                    raise HttpError(
                        413, f"the body is over {self._max_body} bytes", code="too_large"
                    )
                parts.append(data)
                if not msg.get("more_body", False):
                    break
        if scope_.cancelled_caught:
            raise HttpError(408, f"no whole body within {self._body_timeout} s", code="timeout")
        return b"".join(parts)

    # ---- pages ----------------------------------------------------------------------------

    async def _dashboard(self, res: _Response) -> None:
        await res.whole(200, "text/html; charset=utf-8", DASHBOARD_HTML)

    async def _mesh(self, res: _Response) -> None:
        await res.json(200, await self.backend.mesh())

    async def _models(self, res: _Response) -> None:
        await res.json(200, {"object": "list", "data": [_card(m) for m in self.backend.models()]})

    async def _model(self, model_id: str, res: _Response) -> None:
        for m in self.backend.models():
            if m.model_id == model_id:
                await res.json(200, _card(m))
                return
        raise HttpError(404, f"unknown model {model_id!r}", param="model", code="model_not_found")

    # ---- jobs -----------------------------------------------------------------------------

    async def _completions(
        self, scope: Scope, receive: Receive, res: _Response, data: dict[str, Any]
    ) -> None:
        await self._text(scope, receive, res, parse_completion(data))

    async def _chat(
        self, scope: Scope, receive: Receive, res: _Response, data: dict[str, Any]
    ) -> None:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise HttpError(400, "model: expected a non-empty string", param="model")
        # off the event loop: it may read the model's manifest and tokenizer from disk
        template = await trio.to_thread.run_sync(self.backend.chat_template, model)
        await self._text(scope, receive, res, parse_chat(data, template))

    async def _embeddings(
        self, scope: Scope, receive: Receive, res: _Response, data: dict[str, Any]
    ) -> None:
        call = parse_embeddings(data)
        job_id, keyed = _job_id(scope)
        reply = await self._job(call.job(job_id), job_id, receive, None, cancel=not keyed)
        if not isinstance(reply, EmbedReply):
            raise HttpError(500, f"the job answered {type(reply).__name__}", code="internal")
        tokens = await trio.to_thread.run_sync(self.backend.count_tokens, call.model, call.texts)
        await res.json(200, embeddings_response(call, reply, tokens))

    async def _text(self, scope: Scope, receive: Receive, res: _Response, call: TextCall) -> None:
        job_id, keyed = _job_id(scope)
        created = now_s()
        if not call.stream:
            reply = await self._job(call.job(job_id), job_id, receive, None, cancel=not keyed)
            if not isinstance(reply, GenerateReply):
                raise HttpError(500, f"the job answered {type(reply).__name__}", code="internal")
            await res.json(200, text_response(call, reply, created))
            return

        async def on_token(event: TokenEvent) -> None:
            if not res.started:  # the first token: the job was accepted, the stream begins
                await res.start(200, "text/event-stream")
                if call.chat:
                    first = chunk(call, job_id, created, text="")
                    await res.body(_sse(first), more=True)
            await res.body(_sse(chunk(call, job_id, created, text=event.text)), more=True)

        # A streaming client that leaves cancels its job, keyed or not: nobody reads it.
        reply = await self._job(call.job(job_id), job_id, receive, on_token, cancel=True)
        if not isinstance(reply, GenerateReply):
            raise HttpError(500, f"the job answered {type(reply).__name__}", code="internal")
        if not res.started:  # no token at all (e.g. the stored result of a keyed retry)
            await res.start(200, "text/event-stream")
            await res.body(_sse(chunk(call, job_id, created, text=reply.text)), more=True)
        end = chunk(call, job_id, created, finish=finish_reason(reply.stop_reason))
        await res.body(_sse(end), more=True)
        if call.include_usage:
            await res.body(_sse(chunk(call, job_id, created, usage_of=reply)), more=True)
        await res.body(b"data: [DONE]\n\n")

    async def _job(
        self,
        request: object,
        job_id: str,
        receive: Receive,
        on_token: Callable[[TokenEvent], Awaitable[None]] | None,
        *,
        cancel: bool,
    ) -> object:
        """Run one job through the backend; its tokens go to `on_token` in order. A client
        that disconnects meanwhile stops the wait and (with `cancel`) cancels the job."""
        try:
            self._inflight.acquire_nowait()
        except trio.WouldBlock:
            raise HttpError(
                429,
                f"busy: {self._inflight.total_tokens} HTTP jobs are running; retry later",
                kind="rate_limit_error",
                code="busy",
            ) from None
        tokens: trio.MemorySendChannel[TokenEvent]
        tokens, token_out = trio.open_memory_channel[TokenEvent](math.inf)  # <= max_tokens
        outcome: list[object] = []
        failure: list[BaseException] = []
        gone = False
        try:
            async with trio.open_nursery() as nursery:

                async def emit(event: object) -> None:
                    if isinstance(event, TokenEvent) and on_token is not None:
                        tokens.send_nowait(event)  # never blocks the job

                async def work() -> None:
                    try:
                        outcome.append(await self.backend.call(request, emit))
                    except _JOB_ERRORS as exc:
                        failure.append(exc)
                    finally:
                        tokens.close()

                async def watch() -> None:
                    nonlocal gone
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    gone = True
                    log.info("http_client_gone", job=job_id, cancel=cancel)
                    self._metrics.inc("http_clients_gone_total")
                    if cancel:
                        await self._cancel(job_id)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(work)
                nursery.start_soon(watch)
                async for event in token_out:
                    assert on_token is not None  # tokens are only queued for a listener
                    await on_token(event)
                nursery.cancel_scope.cancel()
        finally:
            self._inflight.release()
        if gone:
            raise HttpError(499, "the client went away", code="client_gone")
        if failure:
            raise failure[0]
        return outcome[0]

    async def _cancel(self, job_id: str) -> None:
        async def ignore(_event: object) -> None:
            return None

        for _ in range(CANCEL_TRIES):
            try:
                await self.backend.call(CancelRequest(job_id), ignore)
                return
            except ApiError as exc:
                if exc.code != "not_found":  # "conflict": it ended already
                    return
            await trio.sleep(0.1)  # not journaled yet: the submission is still on its way


def _card(m: ModelCard) -> dict[str, Any]:
    return {"id": m.model_id, "object": "model", "created": 0, "owned_by": f"nexusd ({m.kind})"}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _job_id(scope: Scope) -> tuple[str, bool]:
    """The job id: derived from the `Idempotency-Key` header, or a fresh one."""
    key = _header(scope, b"idempotency-key")
    if key is None:
        return new_job_id(), False
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise HttpError(
            400, f"Idempotency-Key: 1..{MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key"
        )
    return "http-" + hashlib.sha256(key.encode()).hexdigest()[:40], True


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
