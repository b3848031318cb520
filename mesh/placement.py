"""Which atoms a host should serve: Petals' block selection and a rebalancing rule.

A model of `n_atoms` atoms is served by hosts, each on a contiguous span. A host that
needs `compute_s_per_atom` seconds per atom for one token runs its whole span in
`compute_s_per_atom * len(span)` seconds, so it adds `1 / that` tokens/s to every atom of
its span; an atom's throughput is the sum over its hosts, and the swarm's throughput is
the least over the atoms (the bottleneck; 0 while an atom has no host).

Rule 1: pure and synchronous: no clock, no I/O, no randomness; inputs are sorted, so
every node that sees the same adverts reaches the same decision.
Rule 2: a span is chosen as Petals does (`choose_span`): the longest window that fits the
host's memory from each start, scored by the atoms' throughputs after adding the host,
sorted ascending and compared lexicographically (cover gaps first, then lift the
bottleneck); the earliest start wins a tie. One refinement: fewer separate gaps comes
first, so a host never strands a few atoms at an edge that a later host could not
reach together with the rest (three hosts that each fit a third of the model plus one
atom, placing in turn, always cover it).
Rule 3: rebalancing has hysteresis and takes turns (`rebalance`): a host that placed
itself (`auto`) moves only when moving covers atoms nobody serves or raises the swarm's
throughput by more than `threshold`; of all hosts that would move, only the one with the
smallest node id does, and nobody moves while some host is mid-move (serving two spans
of the model: the new one first, then it drops the old one), so the swarm never loses a
span to a move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placed:
    """One host's span of the model, with its measured compute speed.

    Args:
        host: node id.
        start, end: atoms [start, end).
        compute_s_per_atom: measured seconds per atom of a one-token step (> 0).
        auto: placed by the host itself, so it may move; manual spans never move.
    """

    host: bytes
    start: int
    end: int
    compute_s_per_atom: float
    auto: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"placed span: expected 0 <= start < end, got {self.start, self.end}")
        if not self.compute_s_per_atom > 0:
            raise ValueError(f"placed span: compute_s_per_atom > 0, got {self.compute_s_per_atom}")

    @property
    def tokens_per_s(self) -> float:
        """What this host adds to each atom of its span."""
        return 1.0 / (self.compute_s_per_atom * (self.end - self.start))


@dataclass(frozen=True, slots=True)
class Bottleneck:
    """The first maximal run of atoms [start, end) at the swarm's least throughput."""

    start: int
    end: int
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class Move:
    """`host` should serve [start, end) instead of `old`: swarm throughput before/after,
    atoms covered before/after."""

    host: bytes
    old: tuple[tuple[int, int], ...]
    start: int
    end: int
    before: float
    after: float
    covered_before: int
    covered_after: int


def atom_throughput(n_atoms: int, placed: Sequence[Placed]) -> list[float]:
    """Tokens/s each atom can serve (0 for an atom nobody hosts); spans past the model's
    end are clipped."""
    out = [0.0] * n_atoms
    for p in placed:
        tps = p.tokens_per_s
        for i in range(p.start, min(p.end, n_atoms)):
            out[i] += tps
    return out


def bottleneck(n_atoms: int, placed: Sequence[Placed]) -> Bottleneck:
    """The span of least throughput (the first, when several tie)."""
    tp = atom_throughput(n_atoms, placed)
    least = min(tp)
    start = tp.index(least)
    end = start
    while end < n_atoms and tp[end] == least:
        end += 1
    return Bottleneck(start, end, least)


def choose_span(
    n_atoms: int,
    atom_bytes: Sequence[int],
    placed: Sequence[Placed],
    compute_s_per_atom: float,
    memory_bytes: int,
) -> tuple[int, int] | None:
    """The span a host of this speed and memory should serve, given the others (Rule 2);
    None when not even one atom fits its memory."""
    _check(n_atoms, atom_bytes)
    base = atom_throughput(n_atoms, placed)
    best: tuple[tuple[float, ...], int, int] | None = None
    for start in range(n_atoms):
        end, used = start, 0
        while end < n_atoms and used + atom_bytes[end] <= memory_bytes:
            used += atom_bytes[end]
            end += 1
        if end == start:
            continue
        add = 1.0 / (compute_s_per_atom * (end - start))
        after = base[:start] + [t + add for t in base[start:end]] + base[end:]
        score = (-_gaps(after), *sorted(after))
        if best is None or score > best[0]:
            best = (score, start, end)
    return None if best is None else (best[1], best[2])


def rebalance(
    n_atoms: int,
    atom_bytes: Sequence[int],
    placed: Sequence[Placed],
    memory: dict[bytes, int],
    threshold: float,
) -> Move | None:
    """The one move the swarm should make now, or None (Rule 3).

    Args:
        placed: every host's spans of this model.
        memory: each auto host's memory budget for weights (a host missing here, or at 0,
            is taken to fit no more than what it serves now).
        threshold: the least relative gain of swarm throughput worth a move (0.2: 20 %).
    """
    _check(n_atoms, atom_bytes)
    placed = sorted(placed, key=lambda p: (p.host, p.start, p.end))
    by_host: dict[bytes, list[Placed]] = {}
    for p in placed:
        by_host.setdefault(p.host, []).append(p)
    autos = {h: [p for p in ps if p.auto] for h, ps in by_host.items()}
    if any(len(ps) > 1 for ps in autos.values()):
        return None  # a move is under way: wait until it completes
    tp = atom_throughput(n_atoms, placed)
    before, covered = min(tp), sum(1 for t in tp if t > 0)
    for host, (mine,) in sorted((h, ps) for h, ps in autos.items() if ps):
        others = [p for p in placed if p is not mine]  # its manual spans stay
        budget = memory.get(host, 0) or sum(atom_bytes[mine.start : mine.end])
        span = choose_span(n_atoms, atom_bytes, others, mine.compute_s_per_atom, budget)
        if span is None or span == (mine.start, mine.end):
            continue
        moved = [*others, Placed(host, span[0], span[1], mine.compute_s_per_atom, True)]
        tp2 = atom_throughput(n_atoms, moved)
        after, covered2 = min(tp2), sum(1 for t in tp2 if t > 0)
        gains = covered2 > covered or (
            covered2 == covered == n_atoms and after > before * (1.0 + threshold)
        )
        if gains:
            old = ((mine.start, mine.end),)
            return Move(host, old, span[0], span[1], before, after, covered, covered2)
    return None


def _gaps(tp: Sequence[float]) -> int:
    """How many separate runs of atoms nobody serves."""
    return sum(1 for i, t in enumerate(tp) if t == 0 and (i == 0 or tp[i - 1] > 0))


def _check(n_atoms: int, atom_bytes: Sequence[int]) -> None:
    if n_atoms < 1 or len(atom_bytes) != n_atoms or any(b < 0 for b in atom_bytes):
        raise ValueError(
            f"placement: expected n_atoms >= 1 and one size >= 0 per atom, "
            f"got {n_atoms} atoms and {len(atom_bytes)} sizes"
        )
