"""Publishing models as mesh state: versions, parents, training results saved from a worker
thread; and what a registry over sealed files reads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from atoms.training import renamed
from mesh.errors import AdminRequired
from mesh.identity.at_rest import SealedFiles, is_sealed
from mesh.state import PublishedModel
from nexusd.config import Config
from nexusd.metrics import Metrics
from nexusd.model_files import WeightFiles
from nexusd.model_registry import ModelRegistry, import_model
from nexusd.node.models_service import ModelsDaemonSide, ModelsService


class FakeNode:
    """The slice of MeshNode that publishing uses."""

    def __init__(self, *, admin: bool = True) -> None:
        self.state = object()
        self.node_id = b"\x01" * 32
        self.admin = admin
        self.published: dict[str, PublishedModel] = {}
        self.changed = trio.Event()

    def models(self) -> dict[str, PublishedModel]:
        return dict(self.published)

    async def publish_model(self, model_id: str, rec: PublishedModel) -> None:
        if not self.admin:
            raise AdminRequired("publish_model: only an admin of the mesh may publish models")
        self.published[model_id] = rec
        self.changed.set()
        self.changed = trio.Event()

    async def wait_published(self, model_id: str) -> None:
        with trio.fail_after(30):
            while model_id not in self.published:
                await self.changed.wait()


def tiny(folder: Path, seed: int) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def service(models: Path, node: FakeNode, files: WeightFiles | None = None) -> ModelsService:
    files = files or WeightFiles(None, seal_new=False)
    registry = ModelRegistry(models, reader=files.read)
    unused: Any = node
    return ModelsService(Config(), registry, files, Metrics(), lambda: unused)


async def test_publish_versions_grow_with_the_manifest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    import_model(tiny(tmp_path / "a", 0), "m", models)
    node = FakeNode()
    svc = service(models, node)
    rec = await svc.publish("m")
    assert rec is not None and rec.version == 1 and rec.model_id == "m"
    assert rec.manifest_digest.hex() == svc.registry.manifest("m").digest
    assert [a.digest.hex() for a in rec.atoms] == [
        e.digest for e in svc.registry.manifest("m").atoms
    ]
    assert await svc.publish("m") is None  # the same manifest: nothing new
    shutil.rmtree(models / "m")  # the admin re-imports other weights under the same id
    import_model(tiny(tmp_path / "b", 1), "m", models)
    svc.registry.forget("m")
    rec2 = await svc.publish("m")
    assert rec2 is not None and rec2.version == 2 and rec2.manifest_digest != rec.manifest_digest
    assert await service(models, FakeNode(admin=False)).publish("m") is None  # not an admin


async def test_a_model_saved_in_a_worker_thread_is_sealed_and_published(tmp_path: Path) -> None:
    models = tmp_path / "models"
    import_model(tiny(tmp_path / "a", 0), "base", models)
    node = FakeNode()
    files = WeightFiles(SealedFiles(os.urandom(32)), seal_new=True)
    svc = service(models, node, files)
    side = ModelsDaemonSide(svc, seal_new=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(side.run)
        await node.wait_published("base")  # published at start
        model = await trio.to_thread.run_sync(svc.registry.load_model, "base")
        trained = renamed(model, "child", config={"head_of": "base", "labels": json.dumps(["a"])})
        svc.registry.on_saved = side.saved  # as the daemon wires it (attach)
        await trio.to_thread.run_sync(svc.registry.save, trained)  # a training job's save
        await node.wait_published("child")
        nursery.cancel_scope.cancel()
    assert node.published["child"].parent == "base"
    weights = list((models / "child" / "weights").iterdir())
    assert weights and all(is_sealed(p) for p in weights)
    assert ModelRegistry(models, reader=files.read).load_span("child", 0, 1) is not None
    with pytest.raises(Exception, match="corrupt"):
        ModelRegistry(models).load_span("child", 0, 1)  # no key: the bytes are no weights


async def test_only_a_weightless_older_manifest_is_refetched(tmp_path: Path) -> None:
    """An origin that fetched version 1's manifest follows the mesh to version 2; a node
    with weights of its own keeps its version (its adverts name it)."""
    models = tmp_path / "models"
    import_model(tiny(tmp_path / "a", 0), "m", models)
    svc = service(models, FakeNode())
    v1 = await svc.publish("m")
    assert v1 is not None
    v2 = dataclasses.replace(v1, version=2, manifest_digest=bytes(32))  # the mesh moved on
    assert not svc._stale("m", v1) and not svc._stale("m", v2)  # weights here: ours
    for p in (models / "m" / "weights").iterdir():
        p.unlink()  # now only the manifest and tokenizer, as an origin fetched them
    assert not svc._stale("m", v1)  # the mesh's version: nothing to do
    assert svc._stale("m", v2)  # an older one: fetched again
    assert svc._stale("other", v2)  # missing


def test_a_builtin_built_from_older_weights_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node updated to new shipped weights rebuilds the built-in's folder instead of
    serving the old one; an up-to-date folder is kept as it is."""
    from nexusd import model_registry

    registry = model_registry.ModelRegistry(tmp_path)
    folder = registry.folder("nexus-1.1-random")
    manifest = (folder / "manifest.json").read_bytes()
    assert registry.folder("nexus-1.1-random") == folder  # current: not rebuilt
    marker = folder / "local-note"
    marker.write_text("kept while current")
    assert registry.folder("nexus-1.1-random") == folder and marker.exists()
    versions = {**model_registry.BUILTIN_VERSIONS, "nexus-1.1-random": "next"}
    monkeypatch.setattr(model_registry, "BUILTIN_VERSIONS", versions)
    assert registry.folder("nexus-1.1-random") == folder
    assert not marker.exists()  # rebuilt from scratch
    assert (folder / "manifest.json").read_bytes() == manifest  # the same builder
    assert (tmp_path / ".nexus-1.1-random.builtin").read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["nexus-1.1-random"]
