"""The local job API server: a Unix socket of mode 0600 speaking framed `mesh.wire` records.

Rule 1: one request per connection, then replies; intermediate replies are of a type in
`protocol.EVENT_TYPES`, anything else ends the exchange.
Rule 2: a bad request gets an `ErrorReply` and the server keeps serving: a malformed frame,
an unknown request type, a request over the size cap, a slow client (deadline) or a handler
bug never take the daemon down.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import MalformedMessage, OversizeMessage
from mesh.framing import FrameDecoder, frame
from mesh.wire import decode_any, encode

from ..errors import NEXUS_ERRORS, ApiError
from ..metrics import Metrics
from .records import MAX_REPLY_BYTES, ErrorReply

log = structlog.get_logger(__name__)

Emit = Callable[[object], Awaitable[None]]
Handler = Callable[[Any, Emit], Awaitable[object]]


class ApiServer:
    """Serves registered request types on a Unix socket.

    Args:
        path: the socket file; created 0600, replaced if stale (the caller holds the node lock).
        max_request_bytes: cap on one request frame.
        request_timeout_s: deadline for reading the request (not for the job itself).
        max_clients: requests read at once; more wait (a request's job may then run as long
            as it takes without holding a slot).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_request_bytes: int,
        request_timeout_s: float,
        max_clients: int,
        metrics: Metrics,
    ) -> None:
        self.path = path
        self._max = max_request_bytes
        self._timeout = request_timeout_s
        self._slots = trio.CapacityLimiter(max_clients)
        self._routes: dict[type, Handler] = {}
        self._metrics = metrics

    def route(self, request_type: type, handler: Handler) -> None:
        """Serve `request_type` with `handler(request, emit) -> final reply`."""
        self._routes[request_type] = handler

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Listen and serve forever; `task_status.started()` once the socket accepts."""
        sock = await self._bind()
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_one, stream)
        finally:
            self.path.unlink(missing_ok=True)
            await close_bounded(listener.aclose)

    async def _bind(self) -> trio.socket.SocketType:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.path.unlink(missing_ok=True)  # stale: we hold the node lock, no daemon owns it
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
        try:
            await sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
                raise ApiError("bad_request", f"socket path too long: {self.path}") from None
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        return sock

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                # The slot bounds clients sending requests at once; it is released before the
                # request runs, so clients waiting on long jobs never lock out status/cancel.
                async with self._slots:
                    request = await self._read_request(stream)
                reply = await self._dispatch(request, stream)
            except ApiError as exc:
                self._metrics.inc("api_requests_refused_total", code=exc.code)
                log.info("api_request_refused", code=exc.code, reason=exc.message)
                reply = ErrorReply(exc.code, exc.message)
            except NEXUS_ERRORS as exc:
                self._metrics.inc("api_requests_refused_total", code="failed")
                log.warning("api_request_failed", error=type(exc).__name__, reason=str(exc))
                reply = ErrorReply("failed", f"{type(exc).__name__}: {exc}")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("api_client_gone")
                return
            except Exception as exc:  # boundary: one client's request, never the daemon
                log.exception("api_handler_crashed", error=type(exc).__name__)
                self._metrics.inc("api_requests_refused_total", code="internal")
                reply = ErrorReply("internal", f"internal error ({type(exc).__name__}); see log")
            try:
                raw = frame(encode(reply), max_frame_bytes=MAX_REPLY_BYTES)
            except OversizeMessage as exc:
                log.warning("api_reply_too_large", kind=type(reply).__name__, reason=str(exc))
                self._metrics.inc("api_requests_refused_total", code="too_large")
                raw = frame(
                    encode(
                        ErrorReply(
                            "too_large",
                            f"the reply is too large to send ({exc}); "
                            "split the job into smaller ones",
                        )
                    ),
                    max_frame_bytes=MAX_REPLY_BYTES,
                )
            try:
                with trio.fail_after(self._timeout):
                    await stream.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                log.debug("api_client_gone_before_reply")

    async def _read_request(self, stream: trio.SocketStream) -> object:
        decoder = FrameDecoder(self._max)
        try:
            with trio.fail_after(self._timeout):
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ApiError("malformed", "connection closed before a whole request")
                    frames = decoder.feed(data)
                    if frames:
                        break
        except trio.TooSlowError:
            raise ApiError("malformed", f"no whole request within {self._timeout} s") from None
        except OversizeMessage as exc:
            raise ApiError("malformed", f"request too large: {exc}") from None
        if len(frames) > 1 or decoder.pending_bytes:
            raise ApiError("malformed", "one request per connection; got more bytes after it")
        try:
            return decode_any(frames[0], tuple(self._routes))
        except MalformedMessage as exc:
            raise ApiError("malformed", str(exc)) from None

    async def call(self, request: object, emit: Emit) -> object:
        """Serve one request in-process (the HTTP API): the same handler a socket client
        reaches, counted the same; refusals raise `ApiError` as they would be sent.

        Raises:
            ApiError: no handler for the request's type, or the handler refused it.
        """
        handler = self._routes.get(type(request))
        if handler is None:
            raise ApiError("malformed", f"no handler for {type(request).__name__}")
        self._metrics.inc("api_requests_total", kind=type(request).__name__)
        return await handler(request, emit)

    async def _dispatch(self, request: object, stream: trio.SocketStream) -> object:
        handler = self._routes[type(request)]
        kind = type(request).__name__
        self._metrics.inc("api_requests_total", kind=kind)
        log.debug("api_request", kind=kind)

        sending = trio.StrictFIFOLock()
        gone = False

        async def emit(event: object) -> None:
            """Send an event. Tasks of one handler may emit at once (an embed job's
            micro-batch lanes): their sends take turns, so frames never overlap (two sends at
            once on a trio stream raise BusyResourceError). A client that does not take an
            event within the request deadline is treated as gone (BrokenResourceError, for
            this and every later event: a send cut short may have left half a frame), so it
            never stalls a job."""
            nonlocal gone
            raw = frame(encode(event), max_frame_bytes=MAX_REPLY_BYTES)
            with trio.move_on_after(self._timeout) as scope:
                async with sending:
                    if gone:
                        raise trio.BrokenResourceError("client stopped reading events")
                    await stream.send_all(raw)
            if scope.cancelled_caught:
                gone = True
                raise trio.BrokenResourceError("client stopped reading events")

        return await handler(request, emit)
