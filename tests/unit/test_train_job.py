"""Training jobs without a mesh: request checks, checkpoints, metrics, data errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nexusd.api.records import TrainRequest
from nexusd.errors import ApiError
from nexusd.jobs.training import CheckpointStore, load_data, request_digest, validate
from nexusd.model_registry import ModelRegistry


def request(**kw: object) -> TrainRequest:
    return TrainRequest(**{"task": "lm", "model": "nexus-1.1-random", "output": "out", **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("task", "rl", "task: expected one of"),
        ("output", "a/b", "output: expected a model id"),
        ("output", "nexus-1.1-random", "output: expected an id other than"),
        ("steps", 0, "steps: expected 1.."),
        ("warmup_steps", 500, "warmup_steps: expected 0..steps"),
        ("schedule", "zigzag", "schedule: expected one of"),
        ("replicas", 0, "replicas: expected 1..64"),
        ("checkpoint_interval", 3, "checkpoint_interval: expected a multiple of average_every"),
        ("decay", "step", "decay must be one of"),
        ("precision", "fp8", "precision must be one of"),
    ],
)
def test_bad_settings_name_their_field(field: str, value: object, message: str) -> None:
    kw: dict[str, object] = {field: value}
    if field == "checkpoint_interval":
        kw["average_every"] = 2
    with pytest.raises(ApiError, match=message) as err:
        validate(request(**kw))
    assert err.value.code == "bad_request"


def test_checkpoints_are_atomic_keep_two_and_belong_to_their_run(tmp_path: Path) -> None:
    req = request()
    store = CheckpointStore(tmp_path / "run", request_digest(req))
    assert store.latest() is None
    for step in (5, 10, 15):
        store.save(step, {"param/atoms.9.w": torch.full((2,), float(step))})
    assert [p.name for p in store.checkpoints()] == [
        "step-00000010.safetensors",
        "step-00000015.safetensors",
    ]
    step, tensors = store.latest()  # type: ignore[misc]
    assert step == 15 and tensors["param/atoms.9.w"].tolist() == [15.0, 15.0]
    store.checkpoints()[-1].write_bytes(b"torn write")  # the newest is unreadable
    assert store.latest()[0] == 10  # type: ignore[index]
    other = CheckpointStore(tmp_path / "run", request_digest(request(lr=0.5)))
    assert other.latest() is None  # another run's checkpoints are never restored


def test_metrics_rewind_to_a_resumed_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run", "d")
    store.rewind_metrics(-1)
    for step in range(1, 5):
        store.append_metrics(
            {
                "step": step,
                "lr": 0.1,
                "train_loss": 1.0,
                "val_loss": "",
                "val_ppl": "",
                "val_accuracy": "",
                "tokens": step,
                "elapsed_s": 1.0,
            }
        )
    store.rewind_metrics(2)
    assert [r["step"] for r in store.metrics_rows()] == ["1", "2"]


def test_bad_data_is_refused_before_a_step(tmp_path: Path) -> None:
    model = ModelRegistry(tmp_path / "models").load_model("minilm")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ApiError, match="is empty"):
        load_data(request(data=str(empty)), model)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ApiError, match="expected UTF-8, got byte 0xe9 at offset 3"):
        load_data(request(data=str(latin)), model)
    with pytest.raises(ApiError, match="needs a labelled"):
        load_data(request(task="classify", model="minilm"), model)
