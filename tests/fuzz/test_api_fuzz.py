"""Fuzzing the local API server (`nexusd.api.server.ApiServer`) over a real Unix socket.

The server runs in a thread (its own trio loop) with stub routes: one answers, one streams
events then answers, one refuses (`ApiError`), one fails with a mesh error, one has a bug
(a plain exception). Clients are plain blocking sockets sending type-shaped request frames
of every record kind, byte-mutated valid requests, random bytes, and broken framing (short
or long length prefixes, two frames, a bare header, an oversize announcement), each
followed by a half-close.

What it shows: every connection gets well-formed reply frames, events then exactly one
final reply: a valid reply for a valid request, else an `ErrorReply` whose code is one of
the stable `ERROR_CODES` ("internal" only from the route with the bug); and the server
keeps serving (a status request answered after every example, and at the end).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import NoRoute
from mesh.framing import FrameDecoder, frame
from mesh.wire import decode_any, encode, kind_of
from nexusd.api.records import (
    ERROR_CODES,
    EVENT_TYPES,
    REPLY_TYPES,
    CancelRequest,
    ClassifyRequest,
    EmbedRequest,
    ErrorReply,
    GenerateRequest,
    JobsRequest,
    OkReply,
    ProgressEvent,
    ResultRequest,
    StatusRequest,
    TokenEvent,
)
from nexusd.api.server import ApiServer, Emit
from nexusd.errors import ApiError
from nexusd.metrics import Metrics

from .conftest import Tally
from .frames import RECORDS, corpus, fuzz_settings, mutated_frames, shaped_frames

MAX_REQUEST = 64 * 1024
CI, LONG = 250, 5000
BUDGETS = [pytest.param(CI, id="ci"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
ROUTED = (
    StatusRequest,
    GenerateRequest,
    CancelRequest,
    EmbedRequest,
    ClassifyRequest,
    JobsRequest,
    ResultRequest,
)


class Stubs:
    """The routes; each counts its calls (the bug route's calls must equal "internal" replies)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    async def status(self, req: StatusRequest, emit: Emit) -> object:
        self._count("status")
        return OkReply("serving")

    async def generate(self, req: GenerateRequest, emit: Emit) -> object:
        self._count("generate")
        await emit(TokenEvent("job", 1, "a"))
        await emit(ProgressEvent("job", 1, 2))
        return OkReply(f"{len(req.prompt)} chars")

    async def cancel(self, req: CancelRequest, emit: Emit) -> object:
        self._count("cancel")
        return OkReply("cancelled")

    async def embed(self, req: EmbedRequest, emit: Emit) -> object:
        self._count("embed")
        raise ApiError("bad_request", f"{len(req.texts)} texts refused by the stub")

    async def classify(self, req: ClassifyRequest, emit: Emit) -> object:
        self._count("classify")
        raise NoRoute("no host in the stub mesh", atom=0)

    async def jobs(self, req: JobsRequest, emit: Emit) -> object:
        self._count("bug")
        raise ZeroDivisionError("a handler bug")

    async def result(self, req: ResultRequest, emit: Emit) -> object:
        """Events from several tasks at once, as an embed job's micro-batch lanes send them."""
        self._count("lanes")
        lanes = max(1, min(len(req.job_id), 8))
        async with trio.open_nursery() as nursery:
            for lane in range(lanes):
                nursery.start_soon(self._lane, emit, lane)
        return OkReply(f"{lanes} lanes")

    async def _lane(self, emit: Emit, lane: int) -> None:
        for i in range(20):
            await emit(ProgressEvent(f"lane{lane}", i, 20, "x" * 2000))


class ServerThread:
    """An ApiServer on its own trio loop in a thread; `stop()` cancels it and joins."""

    def __init__(self, path: Path, stubs: Stubs) -> None:
        self.server = ApiServer(
            path,
            max_request_bytes=MAX_REQUEST,
            request_timeout_s=10.0,
            max_clients=8,
            metrics=Metrics(),
        )
        for cls, handler in zip(
            ROUTED,
            (
                stubs.status,
                stubs.generate,
                stubs.cancel,
                stubs.embed,
                stubs.classify,
                stubs.jobs,
                stubs.result,
            ),
            strict=True,
        ):
            self.server.route(cls, handler)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="api-fuzz-server", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.run)
                    self._ready.set()

        try:
            trio.run(serve)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(timeout=30), "the API server did not start"
        assert self.error is None, self.error

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the API server did not stop"
        assert self.error is None, self.error


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Stubs]]:
    path = tmp_path_factory.mktemp("api") / "nexusd.sock"
    stubs = Stubs()
    server = ServerThread(path, stubs)
    server.start()
    try:
        yield path, stubs
    finally:
        server.stop()


def exchange(path: Path, raw: bytes) -> list[object]:
    """Send raw bytes, half-close, and read every reply frame until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading everything we sent
        decoder = FrameDecoder(64 * 1024 * 1024)
        frames: list[bytes] = []
        while chunk := sock.recv(65536):
            frames += decoder.feed(chunk)
        assert decoder.pending_bytes == 0, "the server closed mid-frame"
    return [decode_any(f, REPLY_TYPES + EVENT_TYPES) for f in frames]


def check_exchange(path: Path, raw: bytes, tally: Tally) -> object:
    tally.tried()
    replies = exchange(path, raw)
    assert replies, "no reply at all"
    *events, final = replies
    assert all(isinstance(e, EVENT_TYPES) for e in events), events
    assert isinstance(final, REPLY_TYPES) and not isinstance(final, EVENT_TYPES), final
    if isinstance(final, ErrorReply):
        assert final.code in ERROR_CODES, final
        assert len(final.message) <= 2048, f"unbounded error message ({len(final.message)} chars)"
        tally.refused(final.code)
    else:
        assert isinstance(final, OkReply), final
        tally.accepted()
    return final


def still_serving(path: Path) -> None:
    final = exchange(path, frame(encode(StatusRequest()), max_frame_bytes=MAX_REQUEST))
    assert final == [OkReply("serving")]


@st.composite
def framings(draw: st.DrawFn, payloads: st.SearchStrategy[bytes]) -> bytes:
    """A payload in a length-prefixed frame, mostly honest, sometimes broken."""
    payload = draw(payloads)
    how = draw(
        st.sampled_from(
            ["honest"] * 6 + ["short", "long", "two", "header_only", "oversize", "bare"]
        )
    )
    honest = struct.pack(">I", len(payload)) + payload
    if how == "short" and payload:
        return struct.pack(">I", draw(st.integers(0, len(payload) - 1))) + payload
    if how == "long":
        return struct.pack(">I", len(payload) + draw(st.integers(1, 1000))) + payload
    if how == "two":
        return honest + honest
    if how == "header_only":
        return honest[: draw(st.integers(0, 3))]
    if how == "oversize":
        return struct.pack(">I", draw(st.integers(MAX_REQUEST + 1, 2**32 - 1))) + payload[:64]
    if how == "bare":
        return payload
    return honest


def valid_requests() -> list[bytes]:
    return [
        encode(r)
        for r in (
            StatusRequest(),
            GenerateRequest(prompt="hi"),
            CancelRequest("job-1"),
            EmbedRequest(texts=("a", "b")),
            ClassifyRequest(texts=("x",), labels=("a", "b")),
            JobsRequest(5),
        )
    ]


def routed_shapes() -> st.SearchStrategy[bytes]:
    """Type-shaped frames of the routed request kinds (the other kinds come from all RECORDS)."""
    kinds = {kind_of(c) for c in ROUTED}
    return shaped_frames(tuple(c for c in RECORDS if kind_of(c) in kinds))


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_frame_gets_a_coded_reply_and_the_server_keeps_serving(
    api: tuple[Path, Stubs], tally: Tally, budget: int
) -> None:
    path, stubs = api
    payloads = st.one_of(
        routed_shapes(),
        shaped_frames(),
        mutated_frames(valid_requests() + corpus()),
        st.sampled_from(valid_requests()),
        st.binary(max_size=200),
    )
    internal_before = tally.refusals["internal"]
    bugs_before = stubs.calls.get("bug", 0)

    @fuzz_settings(budget)
    @given(framings(payloads))
    def run(raw: bytes) -> None:
        check_exchange(path, raw, tally)

    run()
    still_serving(path)
    # "internal" comes from the route with the bug, and from nothing else
    assert tally.refusals["internal"] - internal_before == stubs.calls.get("bug", 0) - bugs_before


def test_valid_requests_get_their_replies(api: tuple[Path, Stubs], tally: Tally) -> None:
    path, _ = api
    codes = [check_exchange(path, struct.pack(">I", len(r)) + r, tally) for r in valid_requests()]
    assert [c.code if isinstance(c, ErrorReply) else "ok" for c in codes] == [
        "ok",
        "ok",
        "ok",
        "bad_request",
        "failed",
        "internal",
    ]


def test_many_clients_at_once_all_get_replies(api: tuple[Path, Stubs], tally: Tally) -> None:
    """More concurrent clients than request slots, half of them sending garbage: all are
    answered, none blocks another for longer than its own exchange."""
    path, _ = api
    raws = [struct.pack(">I", len(r)) + r for r in valid_requests()] * 4
    raws += [struct.pack(">I", 5) + b"\xc1" * 5, b"\x00\x00"] * 8
    results: list[object] = []
    errors: list[BaseException] = []

    def client(raw: bytes) -> None:
        try:
            results.append(check_exchange(path, raw, tally))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(raw,)) for raw in raws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert len(results) == len(raws)
    still_serving(path)


def test_events_from_concurrent_tasks_all_arrive(api: tuple[Path, Stubs], tally: Tally) -> None:
    """Regression: a handler whose tasks emit at the same time (an embed job's micro-batch
    lanes) made two sends overlap on the client's socket (trio.BusyResourceError), and the
    job ended as an "internal" error. Every event must arrive, then the final reply."""
    path, _ = api
    for lanes in (2, 8):
        raw = frame(encode(ResultRequest("j" * lanes)), max_frame_bytes=MAX_REQUEST)
        tally.tried()
        replies = exchange(path, raw)
        assert replies[-1] == OkReply(f"{lanes} lanes"), replies[-1]
        tally.accepted()
        events = replies[:-1]
        assert len(events) == 20 * lanes
        for lane in range(lanes):  # each lane's events in its own order
            done = [
                e.done for e in events if isinstance(e, ProgressEvent) and e.job_id == f"lane{lane}"
            ]
            assert done == list(range(20)), (lane, done)
