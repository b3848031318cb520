"""Real daemons under faults: hosts SIGKILLed and SIGSTOPped while jobs run, and a network
partition that heals. A Jepsen-style set checker classifies every submitted job at the end.

Test 1 (4 daemons on 127.0.0.1): node0 is the origin and hosts nothing; node1..3 host the
two models so that every atom has two hosts. Client threads submit generate and embed jobs
to the origin (each with its own job id) while a seeded killer, one host at a time, either
SIGKILLs it and restarts it (its spans come back from its config) or SIGSTOPs it and
SIGCONTs it. Fault timing follows the jobs: a fault starts after some jobs complete and
ends after more complete (with a deadline), so nothing waits a fixed time. At the end
every host runs, the origin is restarted, and each job id is asked for its stored result:
`ok` (equals the one-process reference), `failed` (a coded, explained error), `lost`
(acknowledged, no result after the final restart) or `wrong` (a result that differs).
lost == 0 and wrong == 0.

Test 2 (3 daemons in network namespaces, root only): node2 is cut off from nodes 0 and 1
(its bridge port down) while a long generation runs through it (it must fail over to
node1 with the same tokens), jobs run on both sides and both sides change their adverts;
after the heal every node sees the same members and hosted spans within a deadline, and
every acknowledged job has its correct result.

Figures (jobs, kills, stops, outcomes; partition result) are printed at the end of the run
and written as JSON under the pytest temp dir (`<basetemp>/faults/`).
"""

from __future__ import annotations

import json
import queue
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from atoms.embed import embed_texts
from atoms.generation import GenerationParams, generate
from nexusd.api.records import (
    ERROR_CODES,
    EmbedReply,
    EmbedRequest,
    GenerateReply,
    GenerateRequest,
    JobsReply,
    JobsRequest,
    PeersReply,
    PeersRequest,
    ResultRequest,
    RouteEvent,
    StatusReply,
    StatusRequest,
    WaitRequest,
    vectors_of,
)
from nexusd.errors import ApiError, DaemonUnavailable
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.model_registry import ModelRegistry

from .netns import Namespaces, namespaces, netns_available
from .test_distributed import FAST

pytestmark = pytest.mark.e2e

PROMPTS = (
    "Devices that share the work of a model",
    "The river ran past the mill",
    "In the morning the",
    "A mesh of small machines",
)
NEW_TOKENS = (12, 24)
TEXT_SETS = (
    ("cats purr", "the stock market fell", "rain again"),
    ("a violin", "fresh bread", "football on Sunday", "tides and moons"),
)
# node -> spans from its config (restarts bring them back); every atom has two hosts
HOSTS = {
    1: ("nexus-1.1:0-6", "minilm:0-4"),
    2: ("nexus-1.1:6-11", "minilm:4-8"),
    3: ("nexus-1.1", "minilm"),
}
JOB_TIMEOUT_S = 240.0
# a generation still running when the partition starts: the untrained model runs its full
# length (the trained one may end early at [SEP])
LONG_MODEL, LONG_TOKENS = "nexus-1.1-random", 400


# ---------------------------------------------------------------------------------------
# References, figures


@dataclass(frozen=True)
class References:
    tokens: dict[tuple[str, str, int], tuple[int, ...]]  # (model, prompt, max_new_tokens)
    vectors: dict[tuple[str, ...], torch.Tensor]

    def check(self, request: object, reply: object) -> bool:
        """True when `reply` equals the one-process result of `request`."""
        if isinstance(request, GenerateRequest) and isinstance(reply, GenerateReply):
            key = (request.model, request.prompt, request.max_new_tokens)
            return reply.token_ids == self.tokens[key]
        if isinstance(request, EmbedRequest) and isinstance(reply, EmbedReply):
            got = torch.tensor(vectors_of(reply))
            want = self.vectors[request.texts]
            if got.shape != want.shape:
                return False
            cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
            return bool(cos.min() >= 0.9999) and bool((got - want).abs().max() < 1e-4)
        return False


@pytest.fixture(scope="module")
def references(registry: ModelRegistry) -> References:
    def one_process(model_id: str, prompt: str, n: int) -> tuple[int, ...]:
        """The engine's encoding and stop, as a client sees them, in this process."""
        model, tok = registry.load_model(model_id), registry.tokenizer(model_id)
        params = GenerationParams(max_new_tokens=n, stop_token_ids=registry.eos_token_ids(model_id))
        return generate(model, tok.encode_prompt(prompt), params).token_ids

    keys = [("nexus-1.1", p, n) for p in PROMPTS for n in NEW_TOKENS]
    keys.append((LONG_MODEL, PROMPTS[0], LONG_TOKENS))
    tokens = {key: one_process(*key) for key in keys}
    minilm = registry.load_model("minilm")
    return References(tokens, {texts: embed_texts(minilm, list(texts)) for texts in TEXT_SETS})


@pytest.fixture(scope="module")
def figures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, dict[str, object]]]:
    """Each test adds its figures; printed (one line each) and saved when the module ends."""
    out: dict[str, dict[str, object]] = {}
    yield out
    if not out:
        return
    folder = Path(tmp_path_factory.getbasetemp()) / "faults"
    folder.mkdir(exist_ok=True)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    for name, data in out.items():
        (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
        scalars = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
        line = f"faults {name}: " + ", ".join(f"{k}={v}" for k, v in scalars.items())
        if reporter is None or capture is None:
            print(line)
            continue
        with capture.global_and_fixture_disabled():  # to the terminal, not the captured output
            reporter.ensure_newline()
            reporter.write_line(line)


# ---------------------------------------------------------------------------------------
# Jobs and the checker


@dataclass
class Job:
    job_id: str
    request: GenerateRequest | EmbedRequest
    reply: object | None = None  # what the submit call returned
    error: ApiError | None = None  # or the refusal it returned
    unanswered: str = ""  # or why it got no answer (connection broke, deadline)
    elapsed_s: float = 0.0


def make_jobs(rng: random.Random, n: int, tag: str) -> list[Job]:
    jobs = []
    for i in range(n):
        job_id = f"{tag}-{i:04d}"
        if rng.random() < 0.6:
            req: GenerateRequest | EmbedRequest = GenerateRequest(
                prompt=rng.choice(PROMPTS),
                model="nexus-1.1",
                max_new_tokens=rng.choice(NEW_TOKENS),
                job_id=job_id,
            )
        else:
            req = EmbedRequest(
                texts=rng.choice(TEXT_SETS), model="minilm", micro_batch=1, job_id=job_id
            )
        jobs.append(Job(job_id, req))
    return jobs


class Progress:
    """Completed submissions (the killer's clock, with a condition to wait on) and the hosts
    of the routes jobs use right now (the killer's favourite victims)."""

    def __init__(self) -> None:
        self.done = 0
        self.cond = threading.Condition()
        self.route_hosts: list[str] = []  # hex node ids of the latest RouteEvent

    def add(self) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def saw(self, event: object) -> None:
        if isinstance(event, RouteEvent):
            with self.cond:
                self.route_hosts = [h.host for h in event.hops]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout=timeout_s)


def submit(cluster: LocalCluster, node: int, job: Job, progress: Progress | None = None) -> None:
    start = time.monotonic()
    try:
        job.reply = cluster.call(
            node, job.request, timeout_s=JOB_TIMEOUT_S, on_event=progress.saw if progress else None
        )
    except ApiError as exc:
        job.error = exc
    except DaemonUnavailable as exc:
        job.unanswered = str(exc)
    job.elapsed_s = time.monotonic() - start


def run_clients(
    cluster: LocalCluster, node: int, jobs: list[Job], workers: int, progress: Progress
) -> None:
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        todo.put(job)
    crashed: list[BaseException] = []

    def worker() -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                submit(cluster, node, job, progress)
            except BaseException as exc:  # a harness bug: fail the test with it
                crashed.append(exc)
                return
            finally:
                progress.add()

    threads = [threading.Thread(target=worker, name=f"client-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not crashed, crashed


def stored_outcome(cluster: LocalCluster, node: int, job_id: str) -> object:
    """The journal's answer for a job: its reply, an ApiError, or a DaemonUnavailable."""
    try:
        return cluster.call(node, ResultRequest(job_id), timeout_s=JOB_TIMEOUT_S)
    except (ApiError, DaemonUnavailable) as exc:
        return exc


def classify(refs: References, job: Job, stored: object) -> str:
    """The verdict on one acknowledged job (see the module docstring): ok, failed (a coded,
    explained failure), failed_unclear (an "internal" code or no message), lost or wrong."""
    if isinstance(stored, DaemonUnavailable) or (
        isinstance(stored, ApiError) and stored.code == "not_found"
    ):
        return "lost"
    if isinstance(stored, ApiError):
        if job.reply is not None:
            return "wrong"  # the client got a result, the journal keeps a failure
        errors = [stored] if job.error is None else [stored, job.error]
        clear = all(e.code in ERROR_CODES and e.code != "internal" and e.message for e in errors)
        return "failed" if clear else "failed_unclear"
    if not refs.check(job.request, stored):
        return "wrong"
    if job.error is not None or (job.reply is not None and not refs.check(job.request, job.reply)):
        return "wrong"  # the client saw a failure or another result than the journal keeps
    return "ok"


def check_all(
    cluster: LocalCluster, node: int, refs: References, jobs: list[Job]
) -> tuple[Counter[str], dict[str, str]]:
    outcomes: Counter[str] = Counter()
    details: dict[str, str] = {}
    listed = cluster.call(node, JobsRequest(1000), expect=JobsReply)
    known = {row.job_id for row in listed.jobs}
    for job in jobs:
        acknowledged = job.reply is not None or job.error is not None or job.job_id in known
        if not acknowledged:
            outcomes["not_acknowledged"] += 1
            continue
        verdict = classify(refs, job, stored_outcome(cluster, node, job.job_id))
        outcomes[verdict] += 1
        if verdict != "ok":
            err = job.error or job.unanswered
            details[job.job_id] = f"{verdict}: {type(job.request).__name__} {err}"
    return outcomes, details


# ---------------------------------------------------------------------------------------
# Test 1: kills and stops


def write_hosted_spans(cluster: LocalCluster) -> None:
    """Put each host's spans in its config file, so a restarted daemon serves them again."""
    for i, specs in HOSTS.items():
        path = cluster.data_dir(i) / "config.toml"
        text, n = re.subn(
            r"(?m)^host = \[\]$", "host = " + json.dumps(list(specs)), path.read_text()
        )
        assert n == 1, f"no `host = []` line in {path}"
        path.write_text(text)


@pytest.fixture
def four(tmp_path: Path, models_dir: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path, 4, models_dir=models_dir, env=FAST)
    try:
        cluster.init()
        write_hosted_spans(cluster)
        cluster.start_all()
        cluster.join_all()
        for model in ("nexus-1.1", "minilm"):
            cluster.wait_hosts(0, 3, model)
        yield cluster
    finally:
        for d in cluster.daemons:  # a stopped daemon ignores SIGTERM until continued
            if d is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
        cluster.stop_all()


@dataclass
class Killer:
    """One fault at a time on a host (never the origin), timed by job progress: mostly a
    host of a route in use, else any host."""

    cluster: LocalCluster
    rng: random.Random
    progress: Progress
    node_of: dict[str, int]  # hex node id -> node index
    stop: threading.Event = field(default_factory=threading.Event)
    kills: int = 0
    stops: int = 0
    log: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def _after_jobs(self, n: int, deadline_s: float) -> None:
        target = self.progress.done + n
        self.progress.wait_for(
            lambda: self.progress.done >= target or self.stop.is_set(), deadline_s
        )

    def _victim(self) -> int:
        with self.progress.cond:
            on_route = [self.node_of[h] for h in self.progress.route_hosts if h in self.node_of]
        on_route = [i for i in on_route if i in HOSTS]
        if on_route and self.rng.random() < 0.75:
            return self.rng.choice(on_route)
        return self.rng.choice(sorted(HOSTS))

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._after_jobs(self.rng.randint(0, 1), deadline_s=120)
                if self.stop.is_set():
                    return
                victim = self._victim()
                daemon = self.cluster.daemon(victim)
                if self.rng.random() < 0.5:
                    daemon.kill()  # SIGKILL, reaped
                    self.kills += 1
                    self.log.append(f"kill node{victim} at job {self.progress.done}")
                    self._after_jobs(self.rng.randint(1, 2), deadline_s=30)
                    self.cluster.start(victim)
                else:
                    daemon.proc.send_signal(signal.SIGSTOP)
                    self.stops += 1
                    self.log.append(f"stop node{victim} at job {self.progress.done}")
                    self._after_jobs(self.rng.randint(1, 2), deadline_s=20)
                    daemon.proc.send_signal(signal.SIGCONT)
                # back to full strength first (a precondition, not the property tested: a
                # restarted daemon on a loaded 2-core box took over 60 s to advertise once)
                for model in ("nexus-1.1", "minilm"):
                    self.cluster.wait_hosts(0, 3, model, timeout_s=120)
        except BaseException as exc:
            self.error = exc


@pytest.mark.parametrize(
    "n_jobs",
    # a soak (about 2 min here, 6 with 200 jobs): `make test-all` / `-m slow` runs it; the
    # default run keeps the single-fault tests (test_distributed, test_jobs, test_training)
    [
        pytest.param(24, id="24jobs", marks=pytest.mark.slow),
        pytest.param(200, id="200jobs", marks=pytest.mark.slow),
    ],
)
def test_jobs_survive_hosts_killed_and_frozen(
    four: LocalCluster,
    references: References,
    figures: dict[str, dict[str, object]],
    n_jobs: int,
) -> None:
    seed = 20261206 + n_jobs
    rng = random.Random(seed)
    jobs = make_jobs(rng, n_jobs, "fault")
    progress = Progress()
    node_of = {node_hex(four, i): i for i in range(4)}
    killer = Killer(four, random.Random(seed + 1), progress, node_of)
    killer_thread = threading.Thread(target=killer.run, name="killer")
    started = time.monotonic()
    killer_thread.start()
    try:
        run_clients(four, 0, jobs, workers=2, progress=progress)
    finally:
        killer.stop.set()
        with progress.cond:
            progress.cond.notify_all()
        killer_thread.join(timeout=180)
    run_s = time.monotonic() - started
    assert not killer_thread.is_alive(), "the killer did not stop"
    assert killer.error is None, killer.error
    # final restart: every host up, the origin restarted from its journal
    for i in HOSTS:
        if four.daemon(i).proc.poll() is not None:
            four.start(i)
    # honest outages (kills, freezes) must not get a host banned: a ban outlives the
    # restart and leaves the model without its replica (tests/unit/test_host_failures.py)
    peers = four.call(0, PeersRequest(), expect=PeersReply)
    bans = dict(peers.counters).get("ban", 0)
    banned = sorted(p.name for p in peers.peers if p.banned)  # the flags, as `peers` shows them
    four.daemon(0).stop()
    four.start(0)
    outcomes, details = check_all(four, 0, references, jobs)
    figures[f"kill_stop_{n_jobs}"] = {
        "seed": seed,
        "jobs": n_jobs,
        "kills": killer.kills,
        "stops": killer.stops,
        "ok": outcomes["ok"],
        "failed": outcomes["failed"],
        "lost": outcomes["lost"],
        "wrong": outcomes["wrong"],
        "failed_unclear": outcomes["failed_unclear"],
        "not_acknowledged": outcomes["not_acknowledged"],
        "unanswered": sum(1 for j in jobs if j.unanswered),
        "run_s": round(run_s, 1),
        "max_job_s": round(max(j.elapsed_s for j in jobs), 1),
        "failovers": sum(len(getattr(j.reply, "failovers", ())) for j in jobs),
        "bans": bans,
        "banned": banned,
        "faults": killer.log,
        "not_ok": details,
    }
    assert outcomes["lost"] == 0 and outcomes["wrong"] == 0, (details, killer.log)
    assert outcomes["failed_unclear"] == 0, (details, killer.log)
    assert bans == 0, (bans, killer.log)
    assert banned == [], (banned, killer.log)  # no honest host is banned at the end
    assert outcomes["not_acknowledged"] == 0, details  # the origin never died
    assert killer.kills + killer.stops >= 1, killer.log
    assert outcomes["ok"] >= n_jobs // 2, (outcomes, details, killer.log)


# ---------------------------------------------------------------------------------------
# Test 2: a partition in network namespaces, healed


def set_port(ns: Namespaces, i: int, up: bool) -> None:
    """Bring node i's port on the namespaces' bridge down (cut off) or up (healed)."""
    cmd = ["ip", "-n", ns.bridge, "link", "set", f"nxb{i}", "up" if up else "down"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def node_hex(cluster: LocalCluster, i: int) -> str:
    return cluster.call(i, StatusRequest(), expect=StatusReply).node_id


def mesh_view(cluster: LocalCluster, i: int) -> dict[str, tuple[str, ...]]:
    """What node i believes: every member and the spans its live advert hosts."""
    reply = cluster.call(i, PeersRequest(), expect=PeersReply)
    return {p.node_id: tuple(sorted(p.hosted)) for p in reply.peers}


@pytest.mark.netns
def test_partition_heals_state_converges_and_no_job_is_lost(
    tmp_path: Path,
    models_dir: Path,
    references: References,
    figures: dict[str, dict[str, object]],
) -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    with (
        namespaces(3) as ns,
        local_cluster(
            tmp_path,
            3,
            models_dir=models_dir,
            env=FAST,
            prefixes=[ns.prefix(i) for i in range(3)],
            listen_hosts=ns.addrs,
        ) as cluster,
    ):
        # node1 hosts nexus-1.1 in two spans, node2 whole; the long job's model only node2
        for spec in ("nexus-1.1:0-6", "nexus-1.1:6-11"):
            cluster.host(1, spec)
        cluster.host(2, "nexus-1.1")
        cluster.host(2, LONG_MODEL)
        cluster.wait_hosts(0, 2, "nexus-1.1")
        cluster.wait_hosts(0, 1, LONG_MODEL)
        ids = {i: node_hex(cluster, i) for i in range(3)}
        rng = random.Random(7)
        progress = Progress()
        # a long job in flight through node2 when the partition starts
        long_job = Job(
            "part-long",
            GenerateRequest(
                prompt=PROMPTS[0], model=LONG_MODEL, max_new_tokens=LONG_TOKENS, job_id="part-long"
            ),
        )
        first_token = threading.Event()

        def long_generation() -> None:
            try:
                long_job.reply = cluster.call(
                    0,
                    long_job.request,
                    timeout_s=JOB_TIMEOUT_S,
                    on_event=lambda e: first_token.set(),
                )
            except (ApiError, DaemonUnavailable) as exc:
                long_job.unanswered = f"{type(exc).__name__}: {exc}"
            first_token.set()

        in_flight = threading.Thread(target=long_generation)
        in_flight.start()
        assert first_token.wait(timeout=60), "the long generation did not start"
        cluster.host(1, LONG_MODEL)  # its replica, for the failover, once it runs on node2
        cluster.wait_hosts(0, 2, LONG_MODEL)
        set_port(ns, 2, up=False)
        started = time.monotonic()
        try:
            # each side sees the other's advert lapse (no refresh crosses the cut)
            cluster.call(0, WaitRequest("no_advert", ids[2], timeout_s=60))
            cluster.call(2, WaitRequest("no_advert", ids[1], timeout_s=60))
            cut_s = time.monotonic() - started
            generates = [
                j for j in make_jobs(rng, 16, "part") if isinstance(j.request, GenerateRequest)
            ]
            majority, minority = generates[:4], generates[4:7]  # node2 alone runs nexus-1.1 too
            sides = [
                threading.Thread(target=run_clients, args=(cluster, 0, majority, 1, progress)),
                threading.Thread(target=run_clients, args=(cluster, 2, minority, 1, progress)),
            ]
            for t in sides:
                t.start()
            # adverts change on both sides while they cannot talk; the majority embeds
            cluster.host(1, "minilm")
            cluster.host(2, "minilm:0-4")
            cluster.wait_hosts(0, 1, "minilm", timeout_s=60)
            embeds = [
                Job(f"part-e{i}", EmbedRequest(texts=texts, model="minilm", job_id=f"part-e{i}"))
                for i, texts in enumerate(TEXT_SETS)
            ]
            run_clients(cluster, 0, embeds, 1, progress)
            majority += embeds
            for t in sides:
                t.join()
        finally:
            set_port(ns, 2, up=True)
        healed = time.monotonic()
        in_flight.join(timeout=JOB_TIMEOUT_S)
        # converged: every node sees both minilm hosts, all three connected, equal views
        for i in range(3):
            cluster.wait_hosts(i, 2, "minilm", timeout_s=90)
            for j in range(3):
                if i != j:
                    cluster.call(i, WaitRequest("connected", ids[j], timeout_s=90))
        views = [mesh_view(cluster, i) for i in range(3)]
        converge_s = time.monotonic() - healed
        assert views[0] == views[1] == views[2], views
        assert set(views[0]) == set(ids.values())
        hosted_1 = ("minilm:0-8", f"{LONG_MODEL}:0-11", "nexus-1.1:0-6", "nexus-1.1:6-11")
        assert views[0][ids[1]] == tuple(sorted(hosted_1)), views[0]
        assert views[0][ids[2]] == tuple(
            sorted(("minilm:0-4", f"{LONG_MODEL}:0-11", "nexus-1.1:0-11"))
        )
        jobs = [long_job, *majority]
        outcomes, details = check_all(cluster, 0, references, jobs)
        side_b, details_b = check_all(cluster, 2, references, minority)
        outcomes.update(side_b)
        details.update(details_b)
        figures["partition"] = {
            "jobs": len(jobs) + len(minority),
            "ok": outcomes["ok"],
            "failed": outcomes["failed"],
            "lost": outcomes["lost"],
            "wrong": outcomes["wrong"],
            "cut_detected_s": round(cut_s, 1),
            "converged_after_heal_s": round(converge_s, 1),
            "views_equal": True,
            "in_flight_failovers": len(getattr(long_job.reply, "failovers", ())),
            "in_flight_route": [h.name for h in getattr(long_job.reply, "route", ())],
        }
        assert outcomes["lost"] == 0 and outcomes["wrong"] == 0, details
        assert outcomes["failed_unclear"] == 0 and outcomes["not_acknowledged"] == 0, details
        assert outcomes["ok"] >= 1, details
        assert long_job.reply is not None and len(getattr(long_job.reply, "failovers", ())) >= 1
