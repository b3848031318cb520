"""Models as mesh state, on real daemons: a model one node imported is published, an origin
that imported nothing runs jobs on it, a host fetches the weights it lacks (verified, sealed
at rest), a peer serving corrupt bytes is refused and scored, and two versions of one model
id are never chained in one route."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from atoms.generation import GenerationParams, generate
from mesh.identity.at_rest import is_sealed
from nexusd.api.records import GenerateReply, GenerateRequest, ModelsReply, ModelsRequest
from nexusd.errors import ApiError
from nexusd.harness.cluster import LocalCluster, run_cli
from nexusd.model_registry import ModelRegistry, import_model

pytestmark = pytest.mark.e2e

FAST = {
    "NEXUSD_MESH__ADVERT_REFRESH_S": "1",
    "NEXUSD_MESH__ADVERT_LEASE_S": "4",
    "NEXUSD_MESH__PING_INTERVAL_S": "1",
    "NEXUSD_MESH__READ_TIMEOUT_S": "5",
}
PROMPT = "t3 t14 t15 t92 t65"


def tiny_llama(folder: Path, seed: int) -> Path:
    """A 4-atom Llama checkpoint (embedding, 2 blocks, head) with a word tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
    )
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(101)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (folder / "tokenizer.json").write_text(tok.to_str())
    return folder


def until(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    """Wait for `check` under a deadline (a condition, polled)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)


def mesh_models(cluster: LocalCluster, i: int) -> dict[str, object]:
    reply = cluster.call(i, ModelsRequest(), expect=ModelsReply)
    return {r.model_id: r for r in reply.models}


@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    c = LocalCluster(tmp_path, 3, models_dir=tmp_path / "unused", env=FAST)
    del c.env["NEXUSD_ATOMS__MODELS_DIR"]  # each node its own <data_dir>/models: sealed
    try:
        c.init()
        c.start_all()
        c.join_all()
        yield c  # type: ignore[misc]
    finally:
        c.stop_all()


def import_on(cluster: LocalCluster, i: int, folder: Path) -> str:
    res = run_cli(
        ["import-model", str(folder), "--id", "tiny", "--data-dir", str(cluster.data_dir(i))],
        env=cluster.env,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def reference_tokens(tmp_path: Path, folder: Path) -> tuple[int, ...]:
    registry = ModelRegistry(tmp_path / "ref")
    import_model(folder, "tiny", registry.models_dir)
    ids = registry.tokenizer("tiny").encode_prompt(PROMPT)
    params = GenerationParams(max_new_tokens=8, stop_token_ids=registry.eos_token_ids("tiny"))
    return tuple(generate(registry.load_model("tiny"), ids, params).token_ids)


def test_a_node_that_imported_nothing_runs_a_mesh_model_fetched_verified_sealed(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    folder = tiny_llama(tmp_path / "tiny-llama", seed=0)
    out = import_on(cluster, 0, folder)  # node0 is the founder: an admin, it publishes
    assert "published tiny version 1" in out and "encrypted at rest" in out
    until("node1 and node2 see the manifest", lambda: all(
        "tiny" in mesh_models(cluster, i) for i in (1, 2)))  # fmt: skip
    row = mesh_models(cluster, 2)["tiny"]
    assert (row.local, row.published, row.version) == (False, True, 1)  # type: ignore[attr-defined]
    listed = run_cli(["models", "--json", "--data-dir", str(cluster.data_dir(2))], env=cluster.env)
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows["tiny"]["where"] == "mesh" and rows["tiny"]["version"] == 1

    # A peer serving corrupt bytes: node0's copy of atom 1 replaced by wrong plaintext.
    manifest = ModelRegistry(cluster.data_dir(0) / "models").manifest("tiny")
    victim = (
        cluster.data_dir(0)
        / "models"
        / "tiny"
        / "weights"
        / f"{manifest.atoms[1].digest}.safetensors"
    )
    good = victim.read_bytes()
    victim.write_bytes(b"\0" * manifest.atoms[1].nbytes)
    with pytest.raises(ApiError, match="cannot fetch atom 1"):
        cluster.host(1, "tiny")
    refused = cluster.daemon(1).wait_for("weights_peer_refused")
    assert refused["reason"] == "bad_weights"
    part = cluster.data_dir(1) / "models" / "tiny" / "weights"
    assert not list(part.glob(f"{manifest.atoms[1].digest}*"))  # its bytes were discarded
    victim.write_bytes(good)

    cluster.host(1, "tiny")  # node1 fetches all four atoms (the others resumed from before)
    weights = sorted(part.glob("*.safetensors"))
    assert len(weights) == 4 and all(is_sealed(p) for p in weights)
    assert not list(part.glob("*.part*"))
    cluster.wait_hosts(2, 1, "tiny")

    gen = cluster.call(2, GenerateRequest(prompt=PROMPT, model="tiny", max_new_tokens=8))
    assert isinstance(gen, GenerateReply)
    assert tuple(gen.token_ids) == reference_tokens(tmp_path, folder)
    assert {h.name for h in gen.route} == {"node1"}
    thin = cluster.data_dir(2) / "models" / "tiny"
    assert (thin / "manifest.json").is_file() and (thin / "tokenizer.json").is_file()
    assert not list((thin / "weights").iterdir())  # the origin fetched no weights


def test_two_versions_of_one_model_id_are_never_chained(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    import_on(cluster, 0, tiny_llama(tmp_path / "v1", seed=0))  # published (v1)
    import_on(cluster, 2, tiny_llama(tmp_path / "v2", seed=1))  # node2 is no admin: local
    until("node1 sees the manifest", lambda: "tiny" in mesh_models(cluster, 1))
    cluster.host(1, "tiny:0-2")  # fetched: the published version
    cluster.host(2, "tiny:2-4")  # its own, other version
    cluster.wait_hosts(0, 2, "tiny")
    req = GenerateRequest(prompt=PROMPT, model="tiny", max_new_tokens=4)
    with pytest.raises(ApiError, match="no route"):
        cluster.call(0, req)  # atoms 2-4 exist only in another version: no mixed route
    cluster.host(1, "tiny:2-4")
    until("node1 advertises 2-4", lambda: any(
        "tiny:2-4" in p.hosted for p in cluster.wait_hosts(0, 2, "tiny").peers  # type: ignore[attr-defined]
        if p.name == "node1"))  # fmt: skip
    gen = cluster.call(0, req)
    assert isinstance(gen, GenerateReply)
    assert {h.name for h in gen.route} == {"node1"}
