"""Jobs on a real daemon: same answers as one process, idempotent, durable, clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from atoms.embed import embed_texts
from atoms.generation import GenerationParams, generate
from nexusd.model_registry import ModelRegistry

from .harness import ROOT, DaemonProcess, nexusd_env, run_cli, running

pytestmark = pytest.mark.e2e

PROMPT = "The history of the mesh begins"
TEXTS = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome."]


def _new_node(data: Path, models_dir: Path) -> tuple[Path, dict[str, str]]:
    assert run_cli(["init", "--data-dir", str(data), "--new-mesh"]).returncode == 0
    env = {
        "NEXUSD_ATOMS__MODELS_DIR": str(models_dir),
        "NEXUSD_ATOMS__HOST": "nexus-1.1,nexus-1.1-random,minilm",
    }
    return data, env


@pytest.fixture
def node(tmp_path: Path, models_dir: Path) -> tuple[Path, dict[str, str]]:
    return _new_node(tmp_path / "node", models_dir)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[DaemonProcess]:
    """One running node shared by the bad-request cases (each leaves it as it was)."""
    data, env = _new_node(tmp_path_factory.mktemp("serving") / "node", models_dir)
    with running(data, "--port", "0", env=env) as daemon:
        yield daemon


def cli_json(data: Path, *args: str) -> dict[str, object]:
    res = run_cli([*args, "--data-dir", str(data), "--json"], timeout_s=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_jobs_equal_single_process(
    node: tuple[Path, dict[str, str]], registry: ModelRegistry
) -> None:
    data, env = node
    model = registry.load_model("nexus-1.1")
    tok = registry.tokenizer("nexus-1.1")
    eos = registry.eos_token_ids("nexus-1.1")
    want = generate(
        model, tok.encode_prompt(PROMPT), GenerationParams(max_new_tokens=12, stop_token_ids=eos)
    )
    minilm = registry.load_model("minilm")
    ref = embed_texts(minilm, TEXTS)
    with running(data, "--port", "0", env=env):
        gen = cli_json(data, "generate", PROMPT, "--max-tokens", "12")
        assert tuple(gen["token_ids"]) == want.token_ids
        assert gen["route"][0]["steps"] == len(want.token_ids)
        emb = cli_json(data, "embed", *TEXTS)
        got = torch.tensor(emb["vectors"])
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        assert float(cos.min()) >= 0.9999
        cls = cli_json(data, "classify", "the striker scored twice", "--labels", "football,finance")
        assert cls["predicted"] == ["football"]


def test_job_id_is_an_idempotency_key(node: tuple[Path, dict[str, str]]) -> None:
    data, env = node
    with running(data, "--port", "0", env=env):
        first = cli_json(data, "embed", "hello", "--job-id", "job-1")
        again = cli_json(data, "embed", "hello", "--job-id", "job-1")
        assert again["vectors"] == first["vectors"] and again["job_id"] == "job-1"
        other = run_cli(["embed", "goodbye", "--job-id", "job-1", "--data-dir", str(data)])
        assert other.returncode == 1
        assert "job-1" in other.stderr and "[conflict]" in other.stderr
        jobs = cli_json(data, "jobs")["jobs"]
        assert [j["job_id"] for j in jobs].count("job-1") == 1


def test_no_acknowledged_job_is_lost_across_a_crash(node: tuple[Path, dict[str, str]]) -> None:
    data, env = node
    daemon = DaemonProcess(data, "--port", "0", env=env).started(120)
    try:
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexusd",
                "generate",
                PROMPT,
                "--model",
                "nexus-1.1-random",  # untrained: runs its full length (no early [SEP])
                "--max-tokens",
                "400",
                "--job-id",
                "long-1",
                "--data-dir",
                str(data),
                "--json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=nexusd_env(env),
            cwd=ROOT,
        )
        daemon.wait_for(lambda e: e.get("event") == "job_started" and e.get("job") == "long-1", 60)
        daemon.proc.send_signal(signal.SIGKILL)  # a crash: no graceful anything
        daemon.stop()
        client.wait(timeout=30)
    finally:
        daemon.kill()
    with running(data, "--port", "0", env=env) as again:
        again.wait_for(lambda e: e.get("event") == "job_resumed" and e.get("job") == "long-1", 60)
        res = cli_json(data, "result", "long-1")
        assert len(res["token_ids"]) == 400
        jobs = {j["job_id"]: j for j in cli_json(data, "jobs")["jobs"]}
        assert jobs["long-1"]["state"] == "succeeded" and jobs["long-1"]["attempts"] == 2


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["generate", "hi", "--model", "nope"], "not_found", "unknown model 'nope'"),
        (["generate", "hi", "--temperature", "-1"], "bad_request", "temperature"),
        (["generate", "hi", "--max-tokens", "0"], "bad_request", "max_new_tokens"),
        (["generate", "hi", "--max-tokens", "4000"], "bad_request", "context of 512 positions"),
        (["generate", "x" * 100_001], "bad_request", "prompt"),
        (["generate", "hi", "--model", "minilm"], "bad_request", "encoder"),
        (["embed", "hi", "--model", "nexus-1.1"], "bad_request", "decoder"),
        (["classify", "hi", "--labels", "one"], "bad_request", "labels"),
        (["result", "no-such-job"], "not_found", "no job"),
    ],
)
def test_bad_requests_get_clear_errors(
    serving: DaemonProcess, args: list[str], code: str, words: str
) -> None:
    data = serving.data_dir
    res = run_cli([*args, "--data-dir", str(data)], timeout_s=120)
    assert res.returncode == 1
    assert f"[{code}]" in res.stderr and words in res.stderr, res.stderr
    assert serving.proc.poll() is None
    assert run_cli(["status", "--data-dir", str(data)]).returncode == 0
