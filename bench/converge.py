"""Benchmark: time for a mesh to agree after a change, real and simulated (docs/architecture.md §9 "converge").

Rule 1: prints exactly one JSON object on stdout; each figure comes with its floor measured
in the same run (real: the local API round trip and the peers' ping RTT; simulated: the
mean one-way link delay and the gossip pacing interval), since these machines are noisy.
Rule 2: every daemon started is stopped (`local_cluster`); every wait is on a condition
under a deadline, never a sleep: the real watchers block in `PeersRequest(wait_hosts=...)`
and the simulation re-checks its predicate after every node change.
Rule 3: the simulation is seeded (keys, links, faults, peer choice) and runs under trio's
`MockClock` with autojump, so virtual seconds are exact and the CPU seconds are what it
cost to compute them.

Real: three daemons joined by invite and hosting nothing. In each trial one node starts
hosting a span of MiniLM while the other two wait (`peers --wait-hosts`) to see one more
host advertised; convergence = when a watcher's answer arrives minus the changed node's
`span_hosted` log time (its advert is re-signed and gossiped right then).
Simulated: `--sim-nodes` `MeshNode`s over `MemoryNetwork` (link delays 2-50 ms, optional
drops and duplicates), bootstrapped from the founder and two random earlier nodes; after
the initial convergence, one node per trial changes its advert; we measure the virtual
time until every node sees it and until every state fingerprint is equal. Then the mesh
is split in halves, each side changes an advert, and after the heal we measure the virtual
time until all fingerprints agree again (the anti-entropy path). (Built here, not imported
from tests/, which benches must not depend on.)
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path

import trio
import trio.testing

from mesh.hlc import HybridClock, wall_ms_of
from mesh.identity import MeshSecret, NodeKey
from mesh.node import MeshIdentity, MeshNode, MeshNodeConfig
from mesh.state import HostedSpan, MemberCert, MeshState, Slot, SlotKind
from mesh.transport.base import TransportConfig
from mesh.transport.memory import LinkFaults, MemoryNetwork, open_memory_transport
from nexusd.api.client import call
from nexusd.api.records import HostRequest, OkReply, PeersReply, PeersRequest
from nexusd.harness.cluster import LocalCluster, local_cluster
from nexusd.harness.demo import default_models_dir
from nexusd.model_registry import DEFAULT_EMBED_MODEL

from .common import common_args, emit_json, median, quiet_logs, rounded, work_dir

WAIT_S = 30.0
SIM_DEADLINE_S = 120.0  # virtual seconds
WALL_EPOCH = 1_800_000_000.0
PARTITION_HOLD_S = 10.0  # virtual seconds the two halves spend apart
# The simulation's knobs: the daemon's defaults, with quiet adverts (no refresh inside a
# measurement) and a 3 s anti-entropy period as in the sim tests.
SIM_CFG = MeshNodeConfig(
    advert_refresh_s=60.0,
    advert_lease_s=180.0,
    anti_entropy_interval_s=3.0,
    ping_interval_s=5.0,
    read_timeout_s=3.0,
    max_clock_drift_s=5.0,
    max_peers=8,
    redial_base_s=0.5,
    redial_max_s=8.0,
    ban_score_threshold=100.0,
)
TRANSPORT_CFG = TransportConfig(read_timeout_s=5.0, write_timeout_s=5.0, connect_timeout_s=2.0)


# ---- real daemons ---------------------------------------------------------------------------------


def log_time(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


async def timed_peers(sock: Path, req: PeersRequest) -> tuple[PeersReply, float]:
    reply = await call(sock, req, expect=PeersReply, timeout_s=req.timeout_s + 10)
    return reply, time.time()


def real_trial(
    cluster: LocalCluster, changer: int, spec: str, hosts_after: int
) -> dict[str, object]:
    """`changer` hosts `spec`; the others wait for `hosts_after` MiniLM hosts."""
    watchers = [i for i in range(cluster.size) if i != changer]
    seen: dict[int, float] = {}

    async def watch(i: int) -> None:
        req = PeersRequest(hosts_after, DEFAULT_EMBED_MODEL, WAIT_S)
        reply, at = await timed_peers(cluster.daemon(i).socket, req)
        hosting = sum(
            1 for p in reply.peers if any(h.startswith(DEFAULT_EMBED_MODEL + ":") for h in p.hosted)
        )
        if hosting < hosts_after:
            raise RuntimeError(
                f"{cluster.names[i]} saw {hosting} hosts after {WAIT_S}s, expected {hosts_after}"
            )
        seen[i] = at

    async def trial() -> None:
        async with trio.open_nursery() as nursery:
            for i in watchers:
                nursery.start_soon(watch, i)
            await trio.testing.wait_all_tasks_blocked()  # the watchers' requests are out
            sock = cluster.daemon(changer).socket
            await call(sock, HostRequest(spec), expect=OkReply, timeout_s=120)

    trio.run(trial)
    changed = log_time(
        cluster.daemon(changer).wait_for(
            lambda e: (
                e.get("event") == "span_hosted"
                and e.get("start") == int(spec.split(":")[1].split("-")[0])
                and e.get("model") == DEFAULT_EMBED_MODEL
            ),
            10,
        )
    )
    per = {cluster.names[i]: rounded((seen[i] - changed) * 1e3, 2) for i in watchers}
    return {
        "changed": cluster.names[changer],
        "spec": spec,
        "seen_after_ms": per,
        "all_seen_ms": max(per.values()),
    }


def trial_seen_ms(trial: dict[str, object]) -> list[float]:
    per = trial["seen_after_ms"]
    assert isinstance(per, dict)  # built by real_trial
    return [float(v) for v in per.values()]


def api_floor(cluster: LocalCluster, rounds: int) -> tuple[float, float]:
    """Median local API round trip (peers, no wait) and median ping RTT, in ms."""

    async def rtts() -> tuple[list[float], list[float]]:
        api, ping = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            reply, _ = await timed_peers(cluster.daemon(0).socket, PeersRequest())
            api.append((time.perf_counter() - t0) * 1e3)
            ping += [p.rtt_ms for p in reply.peers if p.rtt_ms >= 0 and not p.is_self]
        return api, ping

    api, ping = trio.run(rtts)
    return median(api), median(ping)


def run_real(models_dir: Path, root: Path, *, trials: int) -> dict[str, object]:
    cuts = [(0, 4), (4, 8), (0, 8), (2, 6), (0, 2), (6, 8)][:trials]
    with local_cluster(root, 3, models_dir=models_dir) as cluster:
        api_ms, ping_ms = api_floor(cluster, 5)
        results = []
        for k, (a, b) in enumerate(cuts):
            results.append(
                real_trial(cluster, (2 - k) % 3, f"{DEFAULT_EMBED_MODEL}:{a}-{b}", k + 1)
            )
    all_seen = [max(seen) for seen in (trial_seen_ms(r) for r in results)]
    return {
        "nodes": 3,
        "trials": results,
        "all_seen_ms_median": rounded(median(all_seen), 2),
        "all_seen_ms_max": rounded(max(all_seen), 2),
        "api_round_trip_ms": rounded(api_ms, 3),
        "ping_rtt_ms": rounded(ping_ms, 3),
        "ratio_to_api_round_trip": rounded(median(all_seen) / api_ms, 2),
        "gossip_interval_s": MeshNodeConfig().gossip_interval_s,
    }


# ---- simulated nodes -------------------------------------------------------------------------


def sim_wall() -> float:
    return WALL_EPOCH + trio.current_time()


def sim_mesh(n: int, rng: random.Random) -> tuple[list[NodeKey], MeshIdentity, MeshState]:
    """Keys, the mesh identity, and a state holding every member's certificate."""
    keys = [NodeKey.from_seed(rng.randbytes(32)) for _ in range(n)]
    identity = MeshIdentity(
        rng.randbytes(16), keys[0].node_id, MeshSecret.from_bytes(rng.randbytes(32))
    )
    state = empty_state(identity)
    clock, now = HybridClock(max_drift_s=5.0), sim_wall()
    for i, key in enumerate(keys[1:], start=1):
        cert = MemberCert(
            identity.mesh_id,
            key.node_id,
            f"n{i}",
            ("member",),
            wall_ms_of(now),
            wall_ms_of(now) + 10**9,
            keys[0].node_id,
        )
        state.local_write(keys[0], Slot(SlotKind.MEMBER, key.node_id), cert, clock, now)
    return keys, identity, state


def empty_state(identity: MeshIdentity) -> MeshState:
    return MeshState(
        mesh_id=identity.mesh_id,
        founder=identity.founder,
        max_drift_ms=round(SIM_CFG.max_clock_drift_s * 1000),
        max_lease_ms=round(SIM_CFG.max_lease_s * 1000),
    )


async def run_node(
    network: MemoryNetwork,
    key: NodeKey,
    identity: MeshIdentity,
    state: MeshState,
    seed: int,
    bootstrap: Sequence[tuple[bytes, list[str]]],
    *,
    task_status: trio.TaskStatus[tuple[MeshNode, list[str]]],
) -> None:
    async with open_memory_transport(network, key.node_id, TRANSPORT_CFG) as transport:
        node = MeshNode(
            key=key,
            transport=transport,
            identity=identity,
            state=state,
            store=None,
            cfg=SIM_CFG,
            wall=sim_wall,
            rng=random.Random(seed),
            perf=trio.current_time,
        )
        for peer, addrs in bootstrap:
            node.add_peer_addrs(peer, addrs)
        async with trio.open_nursery() as inner:
            await inner.start(node.run)
            task_status.started((node, transport.listen_addrs()))


async def wait_until(nodes: Sequence[MeshNode], predicate: Callable[[], bool]) -> None:
    """Return once `predicate()` holds, re-checking after each change on any node."""
    while not predicate():
        async with trio.open_nursery() as nursery:

            async def one(node: MeshNode) -> None:
                await node.wait_changed()
                nursery.cancel_scope.cancel()

            for node in nodes:
                nursery.start_soon(one, node)


def converged(nodes: Sequence[MeshNode]) -> bool:
    first = nodes[0].fingerprint()
    return all(n.fingerprint() == first for n in nodes[1:])


async def simulate(
    n: int, trials: int, seed: int, faults: tuple[float, float]
) -> dict[str, object]:
    rng = random.Random(seed)
    network = MemoryNetwork(rng=random.Random(seed + 1))
    keys, identity, seeded = sim_mesh(n, rng)
    delays = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            delays.append(rng.uniform(0.002, 0.05))
            network.set_link_faults(
                a.node_id,
                b.node_id,
                LinkFaults(
                    delay_s=delays[-1], drop_probability=faults[0], duplicate_probability=faults[1]
                ),
            )
    out: dict[str, object] = {
        "nodes": n,
        "mean_link_delay_ms": rounded(1e3 * sum(delays) / len(delays), 2),
    }
    async with trio.open_nursery() as nursery:
        nodes: list[MeshNode] = []
        addrs: list[list[str]] = []
        for i, key in enumerate(keys):
            picks = [0, *rng.sample(range(1, i), min(2, i - 1))] if i else []
            boot = [(keys[j].node_id, addrs[j]) for j in picks]
            state = empty_state(identity).merge(seeded)
            started: tuple[MeshNode, list[str]] = await nursery.start(
                partial(run_node, network, key, identity, state, seed * 1000 + i, boot)
            )
            nodes.append(started[0])
            addrs.append(started[1])
        t0 = trio.current_time()
        with trio.fail_after(SIM_DEADLINE_S):
            await wait_until(
                nodes, lambda: all(len(x.live_adverts()) == n for x in nodes) and converged(nodes)
            )
        out["initial_convergence_virtual_s"] = rounded(trio.current_time() - t0, 3)
        out["mean_connected_peers"] = rounded(sum(len(x.connected()) for x in nodes) / n, 1)
        changes: list[dict[str, float]] = []
        for k in range(trials):
            changes.append(await one_change(nodes, nodes[rng.randrange(1, n)], k))
        out["heal"] = await partition_and_heal(network, nodes, trials)
        nursery.cancel_scope.cancel()
    out["changes"] = changes
    for name in ("seen_virtual_s", "converged_virtual_s"):
        vals = [c[name] for c in changes]
        out[f"{name}_median"] = rounded(median(vals), 3)
        out[f"{name}_max"] = rounded(max(vals), 3)
    mean_delay_s = sum(delays) / len(delays)
    out["converged_over_link_delay"] = rounded(
        median([c["converged_virtual_s"] for c in changes]) / mean_delay_s, 1
    )
    return out


async def one_change(nodes: list[MeshNode], changer: MeshNode, k: int) -> dict[str, float]:
    """`changer` advertises a new span; virtual seconds until all see it / all agree."""
    span = HostedSpan(f"m{k}", 0, 1, "float32")
    c0 = time.process_time()
    t0 = trio.current_time()
    changer.set_local_advert((span,), 1 << 30, 4096, ("raw",))
    who = changer.node_id
    with trio.fail_after(SIM_DEADLINE_S):
        await wait_until(
            nodes,
            lambda: all(
                (a := x.live_adverts().get(who)) is not None and a.spans == (span,) for x in nodes
            ),
        )
        seen = trio.current_time() - t0
        await wait_until(nodes, lambda: converged(nodes))
    return {
        "seen_virtual_s": rounded(seen, 3),
        "converged_virtual_s": rounded(trio.current_time() - t0, 3),
        "cpu_s": rounded(time.process_time() - c0, 3),
    }


async def partition_and_heal(
    network: MemoryNetwork, nodes: list[MeshNode], k: int
) -> dict[str, object]:
    """Split the mesh in halves, change an advert on each side, hold, heal: virtual seconds
    until every fingerprint is equal again (anti-entropy has to carry what gossip could not)."""
    half = len(nodes) // 2
    a, b = nodes[:half], nodes[half:]
    network.partition([[x.node_id for x in a], [x.node_id for x in b]])
    a[-1].set_local_advert((HostedSpan(f"side-a{k}", 0, 1, "float32"),), 1 << 30, 4096, ("raw",))
    b[-1].set_local_advert((HostedSpan(f"side-b{k}", 0, 1, "float32"),), 1 << 30, 4096, ("raw",))
    with trio.fail_after(SIM_DEADLINE_S):
        await wait_until(a, lambda: converged(a))
        await wait_until(b, lambda: converged(b))
    await trio.sleep(PARTITION_HOLD_S)  # a scenario step (virtual time), not a wait for a condition
    split = not converged(nodes)
    network.heal()
    c0, t0 = time.process_time(), trio.current_time()
    with trio.fail_after(SIM_DEADLINE_S):
        await wait_until(nodes, lambda: converged(nodes))
    return {
        "hold_virtual_s": PARTITION_HOLD_S,
        "diverged_while_split": split,
        "heal_virtual_s": rounded(trio.current_time() - t0, 3),
        "cpu_s": rounded(time.process_time() - c0, 3),
    }


def run_sim(n: int, trials: int, seed: int, faults: tuple[float, float]) -> dict[str, object]:
    c0, w0 = time.process_time(), time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    doc = trio.run(simulate, n, trials, seed, faults, clock=clock)
    doc["drop_probability"], doc["duplicate_probability"] = faults
    doc["cpu_s"] = rounded(time.process_time() - c0, 2)
    doc["wall_s"] = rounded(time.perf_counter() - w0, 2)
    doc["gossip_interval_s"] = SIM_CFG.gossip_interval_s
    doc["anti_entropy_interval_s"] = SIM_CFG.anti_entropy_interval_s
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m bench.converge", description=__doc__.splitlines()[0]
    )
    common_args(p)
    p.add_argument("--sim-nodes", type=int, default=50)
    p.add_argument("--trials", type=int, default=3, help="changes measured (real and simulated)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--drop", type=float, default=0.05, help="pubsub hop drop probability (sim)")
    p.add_argument(
        "--duplicate", type=float, default=0.02, help="pubsub hop duplicate probability (sim)"
    )
    p.add_argument("--no-real", action="store_true", help="only the simulation")
    args = p.parse_args(argv)
    n, trials = args.sim_nodes, args.trials
    if args.smoke:
        n, trials = 6, 1
    if n < 2 or not 1 <= trials <= 6:
        p.error(f"--sim-nodes >= 2 and --trials 1..6 expected, got {n}, {trials}")
    quiet_logs()
    doc: dict[str, object] = {"bench": "converge"}
    doc["sim"] = run_sim(n, trials, args.seed, (args.drop, args.duplicate))
    if not args.no_real:
        with work_dir(args.workdir) as root:
            doc["real"] = run_real(args.models_dir or default_models_dir(), root, trials=trials)
    doc["cpus"] = os.cpu_count()
    doc["load_avg_1m"] = rounded(os.getloadavg()[0], 2)
    doc["smoke"] = bool(args.smoke)
    emit_json(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
