"""Jobs across 3 real daemons equal one process; a host killed mid-generation changes nothing."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from atoms.embed import embed_texts
from atoms.generation import GenerationParams, generate
from nexusd.api.records import (
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    RouteEvent,
    TokenEvent,
    vectors_of,
)
from nexusd.harness.cluster import LocalCluster, even_spans, local_cluster
from nexusd.model_registry import ModelRegistry

pytestmark = pytest.mark.e2e

PROMPT = "Devices that share the work of a model"
TEXTS = tuple(
    f"Sentence number {i} is about {w}."
    for i, w in enumerate(["cats", "the stock market", "rain", "football", "a violin", "bread"])
)
FAST = {
    "NEXUSD_MESH__ADVERT_REFRESH_S": "1",
    "NEXUSD_MESH__ADVERT_LEASE_S": "4",
    "NEXUSD_MESH__PING_INTERVAL_S": "1",
    "NEXUSD_MESH__READ_TIMEOUT_S": "5",
}


@pytest.fixture(scope="module")
def reference(registry: ModelRegistry) -> tuple[tuple[int, ...], torch.Tensor]:
    model = registry.load_model("nexus-1.1")
    ids = registry.tokenizer("nexus-1.1").encode_prompt(PROMPT)
    eos = registry.eos_token_ids("nexus-1.1")
    tokens = generate(model, ids, GenerationParams(max_new_tokens=16, stop_token_ids=eos)).token_ids
    return tokens, embed_texts(registry.load_model("minilm"), list(TEXTS))


@pytest.fixture
def cluster(
    tmp_path: Path, models_dir: Path, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    """Three daemons; an indirect param is extra environment for all of them."""
    env = {**FAST, **getattr(request, "param", {})}
    with local_cluster(tmp_path, 3, models_dir=models_dir, env=env) as c:
        yield c


def test_three_daemons_equal_one_process(
    cluster: LocalCluster, reference: tuple[tuple[int, ...], torch.Tensor]
) -> None:
    tokens, vectors = reference
    for i, (a, b) in enumerate(even_spans(11, 3)):
        cluster.host(i, f"nexus-1.1:{a}-{b}")
    cluster.host(1, "minilm:0-4")
    cluster.host(2, "minilm:4-8")
    cluster.wait_hosts(0, 3, "nexus-1.1")
    cluster.wait_hosts(0, 2, "minilm")
    gen = cluster.call(0, GenerateRequest(prompt=PROMPT, model="nexus-1.1", max_new_tokens=16))
    assert isinstance(gen, GenerateReply)
    assert gen.token_ids == tokens
    assert [(h.start, h.end) for h in gen.route] == even_spans(11, 3)  # all three took part
    emb = cluster.call(
        0, EmbedRequest(texts=TEXTS, model="minilm", micro_batch=1)
    )  # several per lane
    assert isinstance(emb, EmbedReply)
    cos = torch.nn.functional.cosine_similarity(torch.tensor(vectors_of(emb)), vectors, dim=-1)
    assert float(cos.min()) >= 0.9999
    assert {h.name for h in emb.route} == {"node1", "node2"}


@pytest.mark.parametrize(
    "cluster",
    [{"NEXUSD_EXEC__FORWARD_MODE": mode} for mode in ("relay", "forward")],
    ids=["relay", "forward"],
    indirect=True,
)
def test_host_argmax_on_and_off_give_identical_tokens(
    cluster: LocalCluster,
    reference: tuple[tuple[int, ...], torch.Tensor],
    registry: ModelRegistry,
) -> None:
    """Greedy tokens with the last host sending the argmax ([exec] host_argmax, default)
    equal one process, and so do they with it off (node 0, the origin, restarted so)."""
    tokens, _ = reference
    spans = [f"nexus-1.1:{a}-{b}" for a, b in even_spans(11, 3)]
    for i, spec in enumerate(spans):
        cluster.host(i, spec)
    replies: dict[bool, GenerateReply] = {}
    for on in (True, False):
        if not on:
            cluster.daemon(0).stop()
            cluster.env["NEXUSD_EXEC__HOST_ARGMAX"] = "false"
            cluster.start(0)
            cluster.host(0, spans[0])
        cluster.wait_hosts(0, 3, "nexus-1.1")
        req = GenerateRequest(prompt=PROMPT, model="nexus-1.1", max_new_tokens=16)
        replies[on] = cluster.call(0, req, expect=GenerateReply)
        assert replies[on].token_ids == tokens
        assert [(h.start, h.end) for h in replies[on].route] == even_spans(11, 3)
    # the LM head's host sent 8 bytes a token, not the logits (but for its spot-checked
    # first step, and any other sampled step, which get the full logits)
    logits_bytes = 4 * registry.config_int("nexus-1.1", "vocab_size", 0)
    saved = replies[False].route[-1].bytes_in - replies[True].route[-1].bytes_in
    assert saved >= (len(tokens) - 4) * (logits_bytes - 8)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_host_failing_mid_generation_gives_identical_output(
    cluster: LocalCluster, reference: tuple[tuple[int, ...], torch.Tensor], how: str
) -> None:
    """Killed: the stream breaks at once. Frozen (SIGSTOP): only the step deadline tells."""
    tokens, _ = reference
    cluster.host(0, "nexus-1.1:0-4")
    cluster.host(1, "nexus-1.1:4-11")
    cluster.host(2, "nexus-1.1:4-11")
    cluster.wait_hosts(0, 3, "nexus-1.1")
    node_of = {cluster.call(i, _status()).node_id: i for i in range(3)}  # type: ignore[attr-defined]
    seen: dict[str, object] = {"tokens": 0, "route": None, "killed": None}

    def on_event(event: object) -> None:
        if isinstance(event, RouteEvent):
            seen["route"] = event
        elif isinstance(event, TokenEvent):
            seen["tokens"] = int(seen["tokens"]) + 1  # type: ignore[call-overload]
            if seen["tokens"] == 5:
                victim = node_of[seen["route"].hops[-1].host]  # type: ignore[union-attr]
                seen["killed"] = victim
                if how == "killed":
                    cluster.daemon(victim).kill()
                else:
                    cluster.daemon(victim).proc.send_signal(signal.SIGSTOP)

    try:
        req = GenerateRequest(prompt=PROMPT, model="nexus-1.1", max_new_tokens=16)
        gen = cluster.call(0, req, on_event=on_event)
    finally:
        if how == "frozen" and seen["killed"] is not None:
            cluster.daemon(int(seen["killed"])).proc.send_signal(signal.SIGCONT)  # type: ignore[call-overload]
    assert isinstance(gen, GenerateReply)
    assert gen.token_ids == tokens
    assert len(gen.failovers) == 1 and seen["killed"] in (1, 2)
    survivor = 3 - int(seen["killed"])  # type: ignore[call-overload]
    assert seen["route"].hops[-1].host == cluster.call(survivor, _status()).node_id  # type: ignore[union-attr, attr-defined]


def _status() -> object:
    from nexusd.api.records import StatusRequest

    return StatusRequest()
