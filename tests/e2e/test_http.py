"""The HTTP API on real daemons: the official `openai` client, the same answers as the Unix
socket, bad input and hostile clients, and the dashboard in a real headless browser."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import trio

from nexusd.api.records import (
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    JobsReply,
    JobsRequest,
    ResultRequest,
    vectors_of,
)
from nexusd.errors import ApiError
from nexusd.harness.cluster import LocalCluster, free_port

pytestmark = pytest.mark.e2e

TOKEN = "test-token-0123456789abcdef"
PROMPT = "The history of the mesh begins"
TEXTS = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome."]
CHROMIUM = "/usr/bin/chromium"


class Node:
    def __init__(self, cluster: LocalCluster, port: int) -> None:
        self.cluster = cluster
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=TOKEN, max_retries=0)

    @property
    def pid(self) -> int:
        return self.cluster.daemon(0).proc.pid


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Node]:
    port = free_port()
    env = {
        "NEXUSD_ATOMS__HOST": "nexus-1.1,nexus-1.1-random,minilm",
        "NEXUSD_API__HTTP_MAX_BODY_BYTES": "65536",
        "NEXUSD_API__HTTP_KEEP_ALIVE_S": "2",
    }
    cluster = LocalCluster(
        tmp_path_factory.mktemp("http"),
        1,
        models_dir=models_dir,
        env=env,
        node_args=[["--http-port", str(port)]],
    )
    try:
        cluster.init()
        token_file = cluster.data_dir(0) / "http_token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)  # on loopback the token is required once this file exists
        cluster.start_all()
        cluster.daemon(0).wait_for("http_api_started")
        served = Node(cluster, port)
        yield served
        served.client.close()
    finally:
        cluster.stop_all()


def raw_http(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the server closes); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post(path: str, body: bytes, *, token: str | None = TOKEN, extra: bytes = b"") -> bytes:
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + auth
        + extra
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_openai_client_matches_the_socket(node: Node) -> None:
    c = node.client
    assert {"nexus-1.1", "minilm"} <= {m.id for m in c.models.list().data}

    socket_gen = node.cluster.call(
        0, GenerateRequest(prompt=PROMPT, max_new_tokens=16), expect=GenerateReply
    )
    done = c.completions.create(model="nexus-1.1", prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.choices[0].text == socket_gen.text
    assert done.usage is not None
    assert done.usage.completion_tokens == len(socket_gen.token_ids)
    assert done.usage.prompt_tokens == socket_gen.prompt_tokens

    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model="nexus-1.1", prompt=PROMPT, max_tokens=16, temperature=0, stream=True
        )
    ]
    assert len(pieces) > 2 and "".join(pieces) == socket_gen.text

    chat = c.chat.completions.create(
        model="nexus-1.1",
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=12,
        temperature=0.7,
        seed=5,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 12
    streamed = c.chat.completions.create(
        model="nexus-1.1",
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=12,
        temperature=0.7,
        seed=5,
        stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content  # same seed, same tokens

    socket_emb = node.cluster.call(0, EmbedRequest(texts=tuple(TEXTS)), expect=EmbedReply)
    want = vectors_of(socket_emb)
    as_float = c.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert [d.embedding for d in as_float.data] == want
    as_b64 = c.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64
    assert [d.embedding for d in as_b64.data] == want
    one = c.embeddings.create(model="minilm", input=TEXTS[0])
    assert one.data[0].embedding == want[0] and one.usage.prompt_tokens > 0


def test_bad_input_gets_openai_errors(node: Node) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        node.client.completions.create(model="no-such-model", prompt="x")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        node.client.completions.create(model="nexus-1.1", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError):  # an encoder cannot generate
        node.client.completions.create(model="minilm", prompt="x")
    anonymous = openai.OpenAI(base_url=node.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()

    status, body = raw_http(node.port, post("/v1/completions", b"{nope"))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, body = raw_http(node.port, post("/v1/completions", b'{"model": 1, "prompt": 2}'))
    assert status == 400 and json.loads(body)["error"]["param"] in ("model", "prompt")
    status, body = raw_http(node.port, post("/v1/completions", b"{}", token=None))
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    huge = b'{"model": "nexus-1.1", "prompt": "' + b"x" * 200_000 + b'"}'
    status, body = raw_http(node.port, post("/v1/completions", huge))
    assert status == 413 and "Traceback" not in body.decode()
    status, _ = raw_http(
        node.port, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 404


def test_slow_loris_is_closed(node: Node) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=15) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # one header byte every 0.25 s: never a whole request
            try:
                s.sendall(b"X")
                s.settimeout(0.25)
                if s.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed, "a client trickling its headers was not closed"
    assert time.monotonic() - t0 < 8  # keep-alive timeout 2 s (+ slack for a loaded machine)


@pytest.mark.parametrize("clients", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_many_concurrent_clients_are_served(node: Node, clients: int) -> None:
    rss_before = _rss_kb(node.pid)
    statuses = trio.run(_many_clients, node.port, clients)
    # 0: closed unanswered, idle past the keep-alive timeout while the others were opening
    assert set(statuses) <= {200, 0} and len(statuses) == clients, sorted(set(statuses))
    assert statuses.count(200) >= clients // 2
    assert _rss_kb(node.pid) - rss_before < 200_000  # bounded: no per-connection buildup
    assert node.client.models.list().data  # still serving


async def _many_clients(port: int, n: int) -> list[int]:
    statuses: list[int] = []
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    opened = trio.Event()
    streams: list[trio.SocketStream] = []

    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        streams.append(stream)
        if len(streams) == n:
            opened.set()
        await opened.wait()  # all n connections are open at once before any asks
        async with stream:
            data = b""
            try:
                await stream.send_all(request)
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:  # the server closed it already (idle)
                data = b""
            statuses.append(int(data.split(b" ")[1]) if data else 0)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return statuses


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_leaving_a_stream_cancels_its_job(node: Node) -> None:
    body = json.dumps(
        {"model": "nexus-1.1-random", "prompt": PROMPT, "max_tokens": 400, "stream": True}
    ).encode()
    key = b"leave-" + str(time.time_ns()).encode()
    job_id = "http-" + hashlib.sha256(key).hexdigest()[:40]
    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as s:
        s.sendall(post("/v1/completions", body, extra=b"Idempotency-Key: " + key + b"\r\n"))
        data = b""
        while b"data: " not in data:  # the first token arrived: the job runs
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200")
    node.cluster.daemon(0).wait_for("http_client_gone", timeout_s=60)
    with pytest.raises(ApiError, match="cancelled"):  # waits for the job's end
        node.cluster.call(0, ResultRequest(job_id))
    jobs = node.cluster.call(0, JobsRequest(50), expect=JobsReply).jobs
    assert next(j.state for j in jobs if j.job_id == job_id) == "cancelled"


@pytest.fixture
def mesh3(tmp_path: Path, models_dir: Path) -> Iterator[tuple[LocalCluster, int]]:
    port = free_port()
    cluster = LocalCluster(
        tmp_path / "mesh",
        3,
        models_dir=models_dir,
        env={"NEXUSD_ATOMS__HOST": "minilm"},
        node_args=[["--http-port", str(port)], [], []],
    )
    try:
        cluster.init()
        cluster.start_all()
        cluster.join_all()
        cluster.wait_hosts(0, 3, "minilm")
        cluster.call(0, EmbedRequest(texts=("a recent job",)), expect=EmbedReply)
        yield cluster, port
    finally:
        cluster.stop_all()


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (`make install` installs it)"
)
def test_dashboard_in_a_headless_browser(mesh3: tuple[LocalCluster, int], tmp_path: Path) -> None:
    cluster, port = mesh3
    url = f"http://127.0.0.1:{port}/"
    profile = tmp_path / "chromium-profile"
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--window-size=412,915",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="ok"' in html, html[-3000:]
    assert '<pre id="errors"></pre>' in html  # no script or fetch error
    for name in cluster.names:
        assert f'<div class="name">{name}' in html, name
    assert html.count('class="member"') == 3
    assert "<td>embed</td>" in html  # the recent job's row
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 5000  # the artefact, in the test's tmp

    # nobody in this mesh hosts Nexus 1.1: no route, 503 in OpenAI's shape
    body = b'{"model": "nexus-1.1", "prompt": "x", "max_tokens": 2}'
    status, answer = raw_http(port, post("/v1/completions", body, token=None), timeout_s=120)
    assert status == 503, answer
    assert json.loads(answer)["error"]["type"] == "service_unavailable"
