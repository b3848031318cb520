"""Payload records of the replicated state: certificates, revocations, adverts, load, manifests.

Rule 1: every record validates itself on construction (`__post_init__`), so a decoded
payload that exists is well-formed; `mesh.state` adds the write rules and signatures.
Rule 2: these are wire records: their kinds and field orders are part of the protocol.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

from mesh.wire import record

ADMIN_ROLE = "admin"
NODE_ID_BYTES = 32
MAX_MODEL_ID_BYTES = 128
MAX_MESH_ID_BYTES = 64
MAX_CONFIG_JSON_CHARS = 16384
_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


def _need(ok: bool, what: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{what}: expected {expected}, got {got!r:.60}")


def _need_len(what: str, value: bytes | str | tuple[object, ...], lo: int, hi: int) -> None:
    if not lo <= len(value) <= hi:
        unit = "items" if isinstance(value, tuple) else type(value).__name__
        raise ValueError(f"{what}: expected {lo}..{hi} {unit} long, got {len(value)}")


def _need_id(what: str, value: bytes) -> None:
    _need_len(what, value, NODE_ID_BYTES, NODE_ID_BYTES)


def _need_name(what: str, *values: str) -> None:
    for value in values:
        _need(bool(_NAME_RE.fullmatch(value)), what, "a short lowercase identifier", value)


@record("member_cert")
@dataclass(frozen=True, slots=True)
class MemberCert:
    """Membership of `node_id` in `mesh_id`, issued (and signed, as the entry) by `issuer`."""

    mesh_id: bytes
    node_id: bytes
    name: str
    roles: tuple[str, ...]
    issued_ms: int
    expires_ms: int
    issuer: bytes

    def __post_init__(self) -> None:
        _need_len("cert mesh_id", self.mesh_id, 1, MAX_MESH_ID_BYTES)
        _need_id("cert node_id", self.node_id)
        _need_id("cert issuer", self.issuer)
        _need_len("cert name", self.name, 1, 64)
        _need_len("cert roles", self.roles, 0, 8)
        _need_name("cert role", *self.roles)
        _need(len(set(self.roles)) == len(self.roles), "cert roles", "no duplicates", self.roles)
        _need(
            0 <= self.issued_ms < self.expires_ms,
            "cert validity",
            "0 <= issued_ms < expires_ms",
            (self.issued_ms, self.expires_ms),
        )

    @property
    def is_admin(self) -> bool:
        """True if the certificate carries the admin role."""
        return ADMIN_ROLE in self.roles

    def valid_at(self, ms: int) -> bool:
        """True if `issued_ms <= ms < expires_ms`."""
        return self.issued_ms <= ms < self.expires_ms


@record("member_removal")
@dataclass(frozen=True, slots=True)
class MemberRemoval:
    """Removal of the certificate adds of `node_id` that the remover observed (their dots)."""

    node_id: bytes
    dots: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        _need_id("removal node_id", self.node_id)
        _need_len("removal dots", self.dots, 1, 1024)
        for author, hlc in self.dots:
            _need_id("removal dot author", author)
            _need(0 <= hlc < 1 << 63, "removal dot hlc", "a packed HLC", hlc)


@record("revocation")
@dataclass(frozen=True, slots=True)
class Revocation:
    """Permanent exclusion of `node_id` from `mesh_id`."""

    mesh_id: bytes
    node_id: bytes
    reason: str
    issued_ms: int

    def __post_init__(self) -> None:
        _need_len("revocation mesh_id", self.mesh_id, 1, MAX_MESH_ID_BYTES)
        _need_id("revocation node_id", self.node_id)
        _need_len("revocation reason", self.reason, 0, 256)
        _need(self.issued_ms >= 0, "revocation issued_ms", ">= 0", self.issued_ms)


@record("hosted_span")
@dataclass(frozen=True, slots=True)
class HostedSpan:
    """Atoms `start..end-1` of `model_id`, hosted in `dtype`, from the model manifest of
    digest `manifest` (32 bytes; empty when the host does not say)."""

    model_id: str
    start: int
    end: int
    dtype: str
    manifest: bytes = b""

    def __post_init__(self) -> None:
        _need_len("span model_id", self.model_id.encode(), 1, MAX_MODEL_ID_BYTES)
        _need(0 <= self.start < self.end, "span range", "0 <= start < end", (self.start, self.end))
        _need_name("span dtype", self.dtype)
        _need(len(self.manifest) in (0, 32), "span manifest", "0 or 32 bytes", len(self.manifest))


MAX_COMPUTE_S_PER_ATOM = 3600.0  # a profile slower than an hour per atom is nonsense
MAX_KV_BYTES_PER_TOKEN = 1 << 40


@record("span_profile")
@dataclass(frozen=True, slots=True)
class SpanProfile:
    """What a host measured of one hosted span: compute seconds per atom of a one-token
    step (smoothed), KV-cache bytes one token costs across the span, and whether the
    daemon placed it itself (`--auto`: it may move it when the swarm needs it elsewhere).
    `capacity_s_per_atom` is the figure measured when the span loaded, on an idle device
    (0: not said): placement goes by it, as Petals' does by its startup throughput, so a
    busy moment does not move hosts; routing goes by the smoothed live figure.
    """

    model_id: str
    start: int
    end: int
    compute_s_per_atom: float
    kv_bytes_per_token: int
    auto: bool = False
    capacity_s_per_atom: float = 0.0

    def __post_init__(self) -> None:
        _need_len("profile model_id", self.model_id.encode(), 1, MAX_MODEL_ID_BYTES)
        rng = (self.start, self.end)
        _need(0 <= self.start < self.end, "profile range", "0 <= start < end", rng)
        c = self.compute_s_per_atom
        ok = math.isfinite(c) and 0 < c <= MAX_COMPUTE_S_PER_ATOM
        _need(ok, "profile compute_s_per_atom", f"0 < s <= {MAX_COMPUTE_S_PER_ATOM}", c)
        cap = self.capacity_s_per_atom
        ok = cap == 0 or (math.isfinite(cap) and 0 < cap <= MAX_COMPUTE_S_PER_ATOM)
        _need(ok, "profile capacity_s_per_atom", f"0, or 0 < s <= {MAX_COMPUTE_S_PER_ATOM}", cap)
        kv = self.kv_bytes_per_token
        _need(0 <= kv <= MAX_KV_BYTES_PER_TOKEN, "profile kv_bytes_per_token", "0..2^40", kv)


class NodeState(enum.Enum):
    """Lifecycle of a node as advertised."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"


@record("advert")
@dataclass(frozen=True, slots=True)
class Advert:
    """What a node offers: hosted spans, free room, codecs, addresses, state and lease."""

    spans: tuple[HostedSpan, ...]
    free_memory_bytes: int
    free_kv_tokens: int
    codecs: tuple[str, ...]
    addrs: tuple[str, ...]
    state: NodeState
    lease_expires_ms: int
    direct_addr: str = ""  # "HOST:PORT" of the node's direct data channel, "" for none
    profiles: tuple[SpanProfile, ...] = ()  # measured figures of the hosted spans
    memory_bytes: int = 0  # weight memory the node gives hosting (0: not said)

    def __post_init__(self) -> None:
        _need_len("advert spans", self.spans, 0, 256)
        _need_len("advert profiles", self.profiles, 0, 256)
        _need(self.memory_bytes >= 0, "advert memory_bytes", ">= 0", self.memory_bytes)
        _need_len("advert direct_addr", self.direct_addr, 0, 64)
        free = (self.free_memory_bytes, self.free_kv_tokens)
        _need(min(free) >= 0, "advert free_memory_bytes, free_kv_tokens", ">= 0", free)
        _need_len("advert codecs", self.codecs, 0, 16)
        _need_name("advert codec", *self.codecs)
        _need_len("advert addrs", self.addrs, 0, 16)
        for addr in self.addrs:
            _need_len("advert addr", addr, 1, 256)
        _need(isinstance(self.state, NodeState), "advert state", "a NodeState", self.state)
        _need(self.lease_expires_ms >= 0, "advert lease_expires_ms", ">= 0", self.lease_expires_ms)


@record("load_report")
@dataclass(frozen=True, slots=True)
class LoadReport:
    """How busy a node is: queue, utilisation, (model_id, atom, tokens/s), (peer, rtt_ms),
    and its KV pool: pages in use of pages in all (0 of 0: no pool, or not said)."""

    queue_depth: int
    utilisation: float
    throughput: tuple[tuple[str, int, float], ...]
    rtts: tuple[tuple[bytes, float], ...]
    kv_pages_used: int = 0
    kv_pages_total: int = 0

    def __post_init__(self) -> None:
        _need(self.queue_depth >= 0, "load queue_depth", ">= 0", self.queue_depth)
        _need(0.0 <= self.utilisation <= 1.0, "load utilisation", "0..1", self.utilisation)
        _need_len("load throughput", self.throughput, 0, 1024)
        for model_id, atom, tps in self.throughput:
            _need_len("throughput model_id", model_id.encode(), 1, MAX_MODEL_ID_BYTES)
            _need(atom >= 0, "throughput atom_index", ">= 0", atom)
            _need(math.isfinite(tps) and tps >= 0, "tokens_per_s", "finite, >= 0", tps)
        _need_len("load rtts", self.rtts, 0, 256)
        pages = (self.kv_pages_used, self.kv_pages_total)
        _need(0 <= pages[0] <= pages[1] <= 1 << 40, "load kv pages", "0 <= used <= total", pages)
        for peer, rtt_ms in self.rtts:
            _need_id("rtt peer", peer)
            _need(math.isfinite(rtt_ms) and rtt_ms >= 0, "rtt_ms", "finite, >= 0", rtt_ms)


@record("atom_entry")
@dataclass(frozen=True, slots=True)
class PublishedAtom:
    """One atom of a published model: position, kind, BLAKE2b-256 of its weights, size."""

    index: int
    kind: str
    digest: bytes
    nbytes: int

    def __post_init__(self) -> None:
        _need(self.index >= 0, "atom index", ">= 0", self.index)
        _need_name("atom kind", self.kind)
        _need_len("atom digest", self.digest, 32, 32)
        _need(self.nbytes >= 0, "atom nbytes", ">= 0", self.nbytes)


@record("model_manifest")
@dataclass(frozen=True, slots=True)
class PublishedModel:
    """A model as an admin publishes it in the mesh state (signed, as the entry, by its
    admin author): family (the architecture), its config as a JSON object, its atoms in
    order with their weight digests, and, since manifests are mesh state: its id, version
    (1, 2, ... per id), the digest of its complete manifest file, of its tokenizer file
    (empty: none) and the id of the model it was derived from ("" for none).

    The mesh's wire summary of a model; the model's own complete manifest (atom specs,
    tokenizer) is `atoms.partition.ModelManifest`, which the mesh never imports: peers
    fetch it (and the tokenizer) by `manifest_digest` as blobs. The wire kinds keep their
    historical names `model_manifest` and `atom_entry`.
    """

    family: str
    config_json: str
    atoms: tuple[PublishedAtom, ...]
    model_id: str = ""
    version: int = 0
    manifest_digest: bytes = b""
    tokenizer_digest: bytes = b""
    parent: str = ""

    def __post_init__(self) -> None:
        _need_name("manifest family", self.family)
        _need_len("manifest config_json", self.config_json, 2, MAX_CONFIG_JSON_CHARS)
        _need_len("manifest model_id", self.model_id.encode(), 0, MAX_MODEL_ID_BYTES)
        _need_len("manifest parent", self.parent.encode(), 0, MAX_MODEL_ID_BYTES)
        _need(0 <= self.version < 1 << 31, "manifest version", "0..2^31-1", self.version)
        for what, d in (
            ("manifest_digest", self.manifest_digest),
            ("tokenizer_digest", self.tokenizer_digest),
        ):
            _need(len(d) in (0, 32), f"manifest {what}", "0 or 32 bytes", len(d))
        try:
            config = json.loads(self.config_json)
        except ValueError:
            raise ValueError("manifest config_json: expected JSON, got unparsable text") from None
        kind = type(config).__name__
        _need(isinstance(config, dict), "manifest config_json", "a JSON object", kind)
        _need_len("manifest atoms", self.atoms, 0, 4096)
        indices = tuple(a.index for a in self.atoms)
        _need(indices == tuple(range(len(indices))), "manifest atom indices", "0..n-1", indices)
