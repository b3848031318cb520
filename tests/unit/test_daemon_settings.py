"""Daemon settings that reach the network as configured: the gossip heartbeat, the join
window, the addresses we advertise (never 0.0.0.0), the free KV tokens of our advert (in
the hosted spans' own bytes per token), the metrics endpoint, and the systemd reload."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import trio

from atoms.llama import build_llama_atoms
from atoms.span import Span
from mesh.transport.base import local_ipv4_addresses
from nexusd.config import MeshConfig, load_config
from nexusd.errors import ConfigError
from nexusd.exec.hosting import SpanHost, warm_up
from nexusd.exec.profile import measure_step
from nexusd.metrics import Metrics, serve_metrics
from nexusd.node.mesh_service import (
    UNBOUNDED_KV_TOKENS,
    advertise_hosts,
    free_kv_tokens,
    transport_config,
)

from .exec_fixtures import TINY, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_gossip_heartbeat_and_join_window_reach_transport_and_node(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[mesh]\ngossip_heartbeat_s = 0.25\njoin_window_s = 2.5\n")
    cfg = load_config(path)
    assert transport_config(cfg).gossip_heartbeat_s == 0.25
    assert cfg.mesh.node_config().join_window_s == 2.5


def test_all_interfaces_is_never_advertised() -> None:
    assert advertise_hosts(MeshConfig(listen_host="192.0.2.7")) == ("192.0.2.7",)
    assert advertise_hosts(MeshConfig(listen_host="0.0.0.0", advertise_host="192.0.2.9")) == (
        "192.0.2.9",
    )
    derived = advertise_hosts(MeshConfig(listen_host="0.0.0.0"))
    assert "0.0.0.0" not in derived and derived == tuple(local_ipv4_addresses() or ["127.0.0.1"])
    with pytest.raises(ConfigError, match=r"mesh\.advertise_host: 0\.0\.0\.0 cannot be dialled"):
        MeshConfig(advertise_host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"mesh\.advertise_host: expected an IPv4 address"):
        MeshConfig(advertise_host="my-laptop")


def host_of(*spans: Span) -> SpanHost:
    return SpanHost(
        list(spans),
        kv_budget_bytes=1 << 20,
        max_sessions=1,
        limiter=trio.CapacityLimiter(1),
        metrics=Metrics(),
    )


def test_free_kv_tokens_use_the_hosted_spans_bytes_per_token() -> None:
    # tiny Llama: 4 blocks x keys and values x 2 KV heads x head_dim 8 x 4 bytes
    per_token = TINY.num_hidden_layers * 2 * TINY.num_key_value_heads * TINY.head_dim * 4
    assert per_token == 512
    assert free_kv_tokens(1 << 20, host_of(tiny_llama())) == (1 << 20) // 512
    two_blocks = Span(tiny_llama().atom_list()[1:3])
    assert free_kv_tokens(1 << 20, host_of(two_blocks)) == (1 << 20) // 256
    # several spans: the most demanding one decides (a session may land on any)
    assert free_kv_tokens(1 << 20, host_of(two_blocks, tiny_llama("other"))) == (1 << 20) // 512
    # spans with no KV cache (an embedding alone) never run out of token room
    embedding = Span(build_llama_atoms(TINY, model_id="e")[:1])
    assert free_kv_tokens(0, host_of(embedding)) == UNBOUNDED_KV_TOKENS


async def http_get(port: int, path: bytes) -> bytes:
    """A plain HTTP/1.0 GET over a TCP socket: the whole response (the server closes)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET " + path + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                response += chunk
    return response


async def test_metrics_endpoint_serves_prometheus_text_to_a_plain_client() -> None:
    metrics = Metrics()
    metrics.inc("mesh_rejections_total", 3, reason="oversize")
    metrics.set_total("direct_refusals_total", 2, reason="not_member")
    metrics.set("host_sessions", 1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        response = await http_get(port, b"/metrics")
        missing = await http_get(port, b"/secrets")
        nursery.cancel_scope.cancel()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.0 200 OK"
    assert "Content-Type: text/plain; version=0.0.4" in lines
    assert f"Content-Length: {len(body)}" in lines
    text = body.decode()
    assert "# TYPE nexus_mesh_rejections_total counter" in text
    assert 'nexus_mesh_rejections_total{reason="oversize"} 3' in text
    assert 'nexus_direct_refusals_total{reason="not_member"} 2' in text
    assert "# TYPE nexus_host_sessions gauge" in text and "nexus_host_sessions 1" in text
    assert missing.startswith(b"HTTP/1.0 404 Not Found")


def test_systemd_reload_sends_sighup_not_sigterm() -> None:
    """`systemctl reload` must not stop the node: SIGTERM is a clean exit, which
    Restart=on-failure does not restart."""
    for unit in ("nexusd.service", "nexusd-user.service"):
        lines = (ROOT / "systemd" / unit).read_text().splitlines()
        assert [ln for ln in lines if ln.startswith("ExecReload=")] == [
            "ExecReload=/bin/kill -HUP $MAINPID"
        ], unit


def test_a_span_hosted_before_the_heap_is_frozen_is_freed_when_unhosted() -> None:
    """Daemon Rule 4 freezes the start-up heap, config-hosted spans included; frozen
    objects are never collected, so a span must be freed by reference counts alone when
    it is unhosted (no cycle may hold its weights)."""
    span = tiny_llama()
    warm_up(span)
    measure_step(span)
    host = host_of(span)
    key = (span.model_id, span.start, span.end)
    weight = weakref.ref(next(span.atom_list()[1].parameters()))
    held = weakref.ref(span)
    del span
    gc.collect()
    gc.freeze()
    try:
        assert host.remove_span(*key)
        assert held() is None and weight() is None
    finally:
        gc.unfreeze()
