"""Shared e2e fixtures: one models directory for the whole session (built-ins built once);
a failed test's report carries the tail of every daemon log written while it ran."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


LOG_ROOT = pytest.StashKey[Path]()
STARTED = pytest.StashKey[float]()
LOG_TAIL_LINES = 40
LOG_FILES_SHOWN = 8


@pytest.fixture(scope="session", autouse=True)
def _log_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    request.config.stash[LOG_ROOT] = tmp_path_factory.getbasetemp()


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    root = item.config.stash.get(LOG_ROOT, None)
    if not report.failed or report.when == "teardown" or root is None:
        return
    since = item.stash.get(STARTED, 0.0) - 1.0
    logs = sorted(
        (p for p in root.rglob("*.log") if p.stat().st_mtime >= since),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for log in logs[:LOG_FILES_SHOWN]:
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        tail = "\n".join(line[:400] for line in lines)
        report.sections.append((f"daemon log {log.relative_to(root)} (last {len(lines)})", tail))
