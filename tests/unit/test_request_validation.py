"""Out-of-range request parameters are clear refusals naming the parameter: at the command
line (one `nexusd: error:` line, never a traceback), in the API records, and in the engine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from mesh.errors import MalformedMessage
from mesh.wire import WIRE_VERSION, decode
from nexusd.api.records import ClassifyRequest, GenerateRequest
from nexusd.cli.app import main
from nexusd.errors import ApiError
from nexusd.jobs.engine import MAX_LABELS, MAX_TEXTS, JobEngine
from nexusd.metrics import Metrics


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1", "many"])
def test_a_seed_out_of_range_is_one_usage_error_line(
    seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "hi", "--seed", seed, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(
        "nexusd: error: nexusd generate: argument --seed:"
    )
    assert "Traceback" not in err


def test_the_largest_seed_is_accepted_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "hi", "--seed", str(2**63 - 1), "--data-dir", str(tmp_path)])
    assert code == 1  # past the parser: no daemon runs here, which is a plain error
    assert "--seed" not in capsys.readouterr().err


def test_the_generate_record_refuses_a_seed_out_of_range() -> None:
    with pytest.raises(
        ValueError, match=r"seed: expected an integer in 0..2\*\*63-1, got 9223372036854775808"
    ):
        GenerateRequest(prompt="hi", seed=2**63)
    # from the wire (a 64-bit unsigned seed fits msgpack): a malformed request naming it
    raw = msgpack.packb(
        [WIRE_VERSION, "api.generate", "hi", "nexus-1.1", 32, 0.0, 0, 1.0, 2**63, [], "", "raw"]
    )
    with pytest.raises(MalformedMessage, match=r"seed: expected an integer in 0\.\.2"):
        decode(raw, GenerateRequest)


def engine() -> JobEngine:
    """An engine whose mesh and models are never reached (validation comes first)."""
    unused: Any = None
    host: Any = SimpleNamespace()  # the engine sets its forward-mode dialer on it
    return JobEngine(
        view=unused,
        host=host,
        registry=unused,
        signer=unused,
        verifier=unused,
        metrics=Metrics(),
        step_timeout_s=1.0,
    )


async def no_events(_event: object) -> None:
    raise AssertionError("nothing should run")


async def test_classify_with_too_many_labels_names_labels() -> None:
    labels = tuple(f"label{i}" for i in range(MAX_LABELS + 1))
    with pytest.raises(
        ApiError, match=rf"labels: expected 2..{MAX_LABELS} distinct labels, got 1001 labels"
    ):
        await engine().classify(ClassifyRequest(texts=("a text",), labels=labels), "job", no_events)


async def test_classify_with_too_many_texts_names_texts() -> None:
    texts = tuple("t" for _ in range(MAX_TEXTS + 1))
    with pytest.raises(ApiError, match=rf"texts: expected 1..{MAX_TEXTS}, got 10001"):
        await engine().classify(ClassifyRequest(texts=texts, labels=("a", "b")), "job", no_events)
