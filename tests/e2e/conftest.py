"""Shared e2e fixtures: one models directory for the whole session (built-ins built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexusd.model_registry import ModelRegistry


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    registry = ModelRegistry(path)
    for model_id in ("minilm", "nexus-1.1"):
        registry.folder(model_id)
    return path


@pytest.fixture(scope="session")
def registry(models_dir: Path) -> ModelRegistry:
    return ModelRegistry(models_dir)
