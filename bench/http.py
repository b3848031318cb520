"""Benchmark: the HTTP API's cost over the Unix socket (docs/http.md "Benchmark").

Rule 1: prints exactly one JSON object on stdout (logs go to stderr and the daemon's log
file); socket and HTTP runs alternate round by round on the same daemon, because these
shared machines vary from run to run.
Rule 2: the daemon is stopped whatever happens (`hosted_mesh`), and every wait is bounded.

Setup: one daemon hosting Nexus 1.1 (untrained blocks: every generation runs its full
length) with `--http-port`. Latency: a greedy 16-token completion, the socket's
`GenerateRequest` (a connection per request, as the CLI does) against `POST
/v1/completions` (one kept-alive connection, as the openai client does); median of
`--repeat` rounds after a warm-up. Streaming: a 64-token generation streamed over the
socket (`TokenEvent`s, what `nexusd generate` shows) and over HTTP (server-sent events);
tokens/s from the request to the last token. Both must produce the same tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from pathlib import Path

import trio

from nexusd.api.client import call
from nexusd.api.records import GenerateReply, GenerateRequest, TokenEvent
from nexusd.harness.cluster import LocalCluster, free_port
from nexusd.harness.demo import PROMPT, default_models_dir

from .common import CALL_TIMEOUT_S, common_args, emit_json, median, quiet_logs, rounded, work_dir

MODEL = "nexus-1.1-random"
TARGET_RATIO = 1.1  # HTTP latency over socket latency, 16 tokens
LATENCY_TOKENS = 16
STREAM_TOKENS = 64


def socket_generate(sock: Path, tokens: int) -> tuple[float, GenerateReply, int]:
    """(seconds, reply, tokens streamed) of one socket generation, timed inside the loop."""
    seen = 0

    async def on_event(event: object) -> None:
        nonlocal seen
        seen += isinstance(event, TokenEvent)

    async def run() -> tuple[float, GenerateReply]:
        t0 = time.perf_counter()
        reply = await call(
            sock,
            GenerateRequest(prompt=PROMPT, model=MODEL, max_new_tokens=tokens),
            expect=GenerateReply,
            timeout_s=CALL_TIMEOUT_S,
            on_event=on_event,
        )
        return time.perf_counter() - t0, reply

    elapsed, reply = trio.run(run)
    return elapsed, reply, seen


def http_generate(
    conn: http.client.HTTPConnection, tokens: int, stream: bool
) -> tuple[float, str, int]:
    """(seconds, text, tokens streamed) of one HTTP completion on a kept-alive connection."""
    body = json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": stream}
    )
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        text = json.loads(resp.read())["choices"][0]["text"]
        return time.perf_counter() - t0, text, 0
    pieces: list[str] = []
    while True:
        line = resp.readline()
        if not line:
            raise RuntimeError("the stream ended without [DONE]")
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        choice = json.loads(data)["choices"][0]
        if choice["finish_reason"] is None:
            pieces.append(choice["text"])
    elapsed = time.perf_counter() - t0
    resp.read()
    return elapsed, "".join(pieces), len(pieces)


def run(models_dir: Path, root: Path, repeat: int, smoke: bool) -> dict[str, object]:
    port = free_port()
    cluster = LocalCluster(
        root,
        1,
        models_dir=models_dir,
        env={"NEXUSD_ATOMS__HOST": MODEL},
        node_args=[["--http-port", str(port)]],
    )
    try:
        cluster.init()
        cluster.start_all()
        cluster.daemon(0).wait_for("http_api_started", timeout_s=60)
        sock = cluster.daemon(0).socket
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
        socket_s: list[float] = []
        http_s: list[float] = []
        same = True
        for i in range(repeat + 1):  # round 0 warms both paths up
            a, reply, _ = socket_generate(sock, LATENCY_TOKENS)
            b, text, _ = http_generate(conn, LATENCY_TOKENS, stream=False)
            same &= text == reply.text and len(reply.token_ids) == LATENCY_TOKENS
            if i:
                socket_s.append(a)
                http_s.append(b)
        stream_tokens = 24 if smoke else STREAM_TOKENS
        sock_rate: list[float] = []
        http_rate: list[float] = []
        for _ in range(1 if smoke else 2):
            a, reply, n_sock = socket_generate(sock, stream_tokens)
            conn.close()  # idle past the keep-alive timeout meanwhile: a fresh connection
            b, text, n_http = http_generate(conn, stream_tokens, stream=True)
            same &= text == reply.text and n_sock == n_http == stream_tokens
            sock_rate.append(n_sock / a)
            http_rate.append(n_http / b)
        conn.close()
    finally:
        cluster.stop_all()
    ratio = median(http_s) / median(socket_s)
    return {
        "bench": "http",
        "smoke": smoke,
        "model": MODEL,
        "latency_tokens": LATENCY_TOKENS,
        "rounds": repeat,
        "socket_ms": rounded(median(socket_s) * 1000, 2),
        "http_ms": rounded(median(http_s) * 1000, 2),
        "latency_ratio": rounded(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "stream_tokens": stream_tokens,
        "socket_stream_tokens_per_s": rounded(median(sock_rate), 2),
        "http_stream_tokens_per_s": rounded(median(http_rate), 2),
        "stream_ratio": rounded(median(http_rate) / median(sock_rate), 3),
        "same_tokens": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--repeat", type=int, default=8, help="latency rounds (default 8)")
    args = p.parse_args()
    quiet_logs()
    models_dir = args.models_dir or default_models_dir()
    with work_dir(args.workdir) as root:
        emit_json(run(models_dir, root, 2 if args.smoke else args.repeat, args.smoke))


if __name__ == "__main__":
    main()
