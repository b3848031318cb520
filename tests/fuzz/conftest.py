"""Fuzz-suite fixtures: a per-module tally of frames tried and refusals by reason.

Each fuzz module takes the module-scoped `tally` fixture and records every frame it feeds
to the code under test (`tally.tried(...)`) and how it ended (`tally.refused(reason)` or
`tally.accepted()`). When the module ends, its figures are written as JSON under the pytest
temp dir (`<basetemp>/fuzz/<module>.json`) and one summary line per module is printed at
the end of the run, so the figures can be quoted (README).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

_SUMMARIES: list[str] = []


class Tally:
    """Frames fed to one target, and what became of them (thread-safe: the API fuzz
    counts from trio tasks and hypothesis from the main thread)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames = 0
        self.accepted_count = 0
        self.refusals: Counter[str] = Counter()
        self._lock = threading.Lock()

    def tried(self, n: int = 1) -> None:
        with self._lock:
            self.frames += n

    def accepted(self) -> None:
        with self._lock:
            self.accepted_count += 1

    def refused(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.name,
            "frames": self.frames,
            "accepted": self.accepted_count,
            "refused": sum(self.refusals.values()),
            "refusals": dict(self.refusals.most_common()),
        }

    def summary(self) -> str:
        top = ", ".join(f"{r}={n}" for r, n in self.refusals.most_common())
        return (
            f"fuzz {self.name}: {self.frames} frames, {self.accepted_count} accepted, "
            f"{sum(self.refusals.values())} refused ({top or 'none'})"
        )


@pytest.fixture(scope="module")
def tally(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tally]:
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    t = Tally(name)
    yield t
    if t.frames:
        out = Path(tmp_path_factory.getbasetemp()) / "fuzz"
        out.mkdir(exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(t.as_dict(), indent=1))
        _SUMMARIES.append(t.summary())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _SUMMARIES:
        terminalreporter.write_line(line)
