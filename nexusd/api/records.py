"""Records of the local job API (the Unix socket between the CLI and its daemon).

Rule 1: every request and every reply is a typed `mesh.wire` record; a connection carries
one request and then replies until a final one (`is_final`), so long jobs can stream.
Rule 2: refusals are `ErrorReply(code, message)` with a stable code, never a closed socket.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from mesh.wire import record

# ---- generic -----------------------------------------------------------------------------


@record("api.error")
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal. `code` is one of the ERROR_CODES; `message` says what, expected and got."""

    code: str
    message: str


MAX_REPLY_BYTES = 256 * 1024 * 1024  # one reply frame, both sides (requests: api.max_request_bytes)
SEED_LIMIT = 2**63  # sampling seeds are 0 .. 2**63-1 (`atoms.generation.GenerationParams`)

ERROR_CODES = (
    "malformed",  # the request did not decode
    "bad_request",  # decoded, but a parameter is out of range
    "not_found",  # unknown model, job, node
    "conflict",  # same job id with other parameters; not allowed in this state
    "unavailable",  # no route, no host, mesh not joined
    "refused",  # the mesh refused (invite expired, revoked, ...)
    "failed",  # the job ran and failed
    "too_large",  # the reply would exceed MAX_REPLY_BYTES (ask for less per job)
    "internal",  # our bug; details in the daemon log
)


@record("api.ok")
@dataclass(frozen=True, slots=True)
class OkReply:
    """A request that needs no data back succeeded."""

    message: str = ""


# ---- node --------------------------------------------------------------------------------


@record("api.status")
@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Ask the daemon for its status."""


@record("api.status_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    """What `nexusd status` shows."""

    node_id: str
    name: str
    version: str
    pid: int
    uptime_s: float
    data_dir: str
    socket_path: str
    mesh_id: str  # empty when the node belongs to no mesh yet
    listen_addrs: tuple[str, ...]
    peers_connected: int
    members: int
    hosted: tuple[str, ...]


@record("api.shutdown")
@dataclass(frozen=True, slots=True)
class ShutdownRequest:
    """Ask the daemon to stop gracefully (as SIGTERM would)."""


# ---- jobs -------------------------------------------------------------------------------

MAX_CODEC_NAME = 16


@record("api.hop")
@dataclass(frozen=True, slots=True, kw_only=True)
class HopReport:
    """One hop of a job's route with its summed costs over all steps (seconds, bytes)."""

    host: str  # hex node id
    name: str
    start: int
    end: int
    steps: int
    compute_s: float
    queue_s: float
    transfer_s: float
    bytes_out: int
    bytes_in: int
    # The wire codec of the hop ("" = local, or a reply from before codecs were reported)
    # and the bytes it saved against the exact `raw` codec, both ways, over all steps.
    codec: str = ""
    bytes_saved: int = 0
    # The largest relative error (max|x - decoded| / max|x|) of the activations the origin
    # sent this hop in a lossy codec (0: exact); the host's replies are not measured.
    wire_error: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wire_error) and self.wire_error >= 0):
            raise ValueError(f"wire_error: expected a finite value >= 0, got {self.wire_error}")
        if self.codec and not (len(self.codec) <= MAX_CODEC_NAME and self.codec.isalnum()):
            raise ValueError(f"codec: expected a short codec name, got {self.codec!r:.40}")
        if self.bytes_saved < -(self.bytes_out + self.bytes_in):
            raise ValueError(
                f"bytes_saved: {self.bytes_saved} is more than the {self.bytes_out + self.bytes_in}"
                " bytes sent"
            )


@record("api.generate")
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateRequest:
    """Generate text. `job_id` empty: the daemon picks one."""

    prompt: str
    model: str = "nexus-1.1"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    job_id: str = ""
    codec: str = "raw"

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed: expected an integer in 0..2**63-1, got {self.seed}")


@record("api.token")
@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A generated token and its text piece, streamed as produced."""

    job_id: str
    token_id: int
    text: str


@record("api.route_hop")
@dataclass(frozen=True, slots=True)
class RouteHop:
    host: str  # hex node id
    name: str
    start: int
    end: int


@record("api.route")
@dataclass(frozen=True, slots=True)
class RouteEvent:
    """The route a job's session uses: sent when it opens and after every failover."""

    job_id: str
    hops: tuple[RouteHop, ...]
    reason: str  # "opened" or the failure that caused the reroute


@record("api.progress")
@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Progress of a long job: `done` of `total` units."""

    job_id: str
    done: int
    total: int
    message: str = ""


@record("api.generate_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateReply:
    job_id: str
    model: str
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    prompt_tokens: int
    elapsed_s: float
    tokens_per_s: float
    route: tuple[HopReport, ...]
    failovers: tuple[str, ...]


@record("api.embed")
@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedRequest:
    """Embed texts (normalised sentence embeddings), micro-batched along the route."""

    texts: tuple[str, ...]
    model: str = "minilm"
    micro_batch: int = 32  # best pipelined throughput in bench/embed (16: -1.5 %, 64: worse)
    job_id: str = ""
    codec: str = "raw"


@record("api.embed_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedReply:
    job_id: str
    model: str
    count: int
    dims: int
    vectors: bytes  # count x dims float32, little-endian, row-major
    elapsed_s: float
    texts_per_s: float
    route: tuple[HopReport, ...]
    failovers: tuple[str, ...]


def vectors_of(reply: EmbedReply) -> list[list[float]]:
    """The reply's packed float32 vectors as one list of floats per text."""
    flat = struct.unpack(f"<{reply.count * reply.dims}f", reply.vectors)
    return [list(flat[i * reply.dims : (i + 1) * reply.dims]) for i in range(reply.count)]


@record("api.classify")
@dataclass(frozen=True, slots=True, kw_only=True)
class ClassifyRequest:
    """Zero-shot classification of texts among labels, by embedding similarity."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    model: str = "minilm"
    template: str = "This text is about {}."
    job_id: str = ""


@record("api.classify_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ClassifyReply:
    job_id: str
    model: str
    labels: tuple[str, ...]
    predicted: tuple[str, ...]
    scores: tuple[tuple[float, ...], ...]  # per text, softmax over labels
    elapsed_s: float
    route: tuple[HopReport, ...]


@record("api.jobs")
@dataclass(frozen=True, slots=True)
class JobsRequest:
    limit: int = 50


@record("api.job_row")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    job_id: str
    kind: str
    state: str
    created_ms: int
    updated_ms: int
    attempts: int
    error: str


@record("api.jobs_reply")
@dataclass(frozen=True, slots=True)
class JobsReply:
    jobs: tuple[JobRow, ...]


@record("api.cancel")
@dataclass(frozen=True, slots=True)
class CancelRequest:
    job_id: str


@record("api.result")
@dataclass(frozen=True, slots=True)
class ResultRequest:
    """The stored result of a finished job (or its failure)."""

    job_id: str


@record("api.host")
@dataclass(frozen=True, slots=True)
class HostRequest:
    """Load and serve atoms: "MODEL" (all) or "MODEL:START-END" (END exclusive)."""

    spec: str
    dtype: str = ""  # "" = the node's atoms.dtype


@record("api.models")
@dataclass(frozen=True, slots=True)
class ModelsRequest:
    """List the mesh's models (published manifests) beside this node's own."""


@record("api.model_row")
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRow:
    """One model: where it is (`local`: a folder here, `mesh`: published), its version
    and manifest digest in the mesh (0 and "" when unpublished), and whether this node
    holds all its weights."""

    model_id: str
    family: str
    atoms: int
    version: int
    digest: str
    local: bool
    published: bool
    weights_here: bool
    parent: str = ""


@record("api.models_reply")
@dataclass(frozen=True, slots=True)
class ModelsReply:
    models: tuple[ModelRow, ...]


@record("api.publish_model")
@dataclass(frozen=True, slots=True)
class PublishModelRequest:
    """Publish a local model's manifest in the mesh state (admins; `import-model`,
    `compress` send it when a daemon runs)."""

    model_id: str


# ---- mesh -------------------------------------------------------------------------------


@record("api.invite")
@dataclass(frozen=True, slots=True)
class InviteRequest:
    ttl_s: float = 3600.0
    uses: int = 1
    name: str = ""


@record("api.invite_reply")
@dataclass(frozen=True, slots=True)
class InviteReply:
    token: str
    expires_in_s: float
    uses: int
    bootstrap: tuple[str, ...]


@record("api.join")
@dataclass(frozen=True, slots=True)
class JoinMeshRequest:
    token: str
    name: str = ""


@record("api.joined")
@dataclass(frozen=True, slots=True)
class JoinedReply:
    mesh_id: str
    founder: str
    members: int


@record("api.revoke")
@dataclass(frozen=True, slots=True)
class RevokeRequest:
    node: str  # hex node id or a unique prefix of it (>= 8 chars)
    reason: str = ""


@record("api.peers")
@dataclass(frozen=True, slots=True)
class PeersRequest:
    """List members; with `wait_hosts` > 0, first wait (at most `timeout_s`) until that many
    live adverts host atoms of `model` (or of any model)."""

    wait_hosts: int = 0
    model: str = ""
    timeout_s: float = 30.0


@record("api.peer")
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRow:
    node_id: str
    name: str
    roles: tuple[str, ...]
    is_self: bool
    connected: bool
    state: str  # advert state, or "no-advert"
    rtt_ms: float  # -1: not measured
    hosted: tuple[str, ...]
    lease_left_s: float
    queue_depth: int
    banned: bool
    utilisation: float = 0.0
    bandwidth_mb_per_s: float = -1.0  # -1: not probed yet
    kv_pages_used: int = -1  # the node's KV pool (its load report); -1: not known
    kv_pages_total: int = -1


@record("api.wait")
@dataclass(frozen=True, slots=True)
class WaitRequest:
    """Block until a mesh condition holds (or `timeout_s` passes); replies with `peers`.

    conditions: "busy" (node's advertised utilisation >= threshold), "idle" (< threshold),
    "no_advert" (node has no live advert), "advert" (node has one), "member" (node is a
    member), "not_member" (revoked or never admitted), "connected" / "disconnected",
    "probed" (bandwidth measured since this request: a fresh probe).
    """

    condition: str
    node: str  # hex node id or unique prefix
    threshold: float = 0.5
    timeout_s: float = 30.0


@record("api.bottleneck_row")
@dataclass(frozen=True, slots=True, kw_only=True)
class BottleneckRow:
    """A model's least-served span in the swarm (tokens/s 0: nobody serves it) and the
    command that would fix it."""

    model_id: str
    n_atoms: int
    start: int
    end: int
    tokens_per_s: float
    hosts: int
    fix: str


@record("api.peers_reply")
@dataclass(frozen=True, slots=True)
class PeersReply:
    mesh_id: str
    peers: tuple[PeerRow, ...]
    counters: tuple[tuple[str, int], ...]
    bottlenecks: tuple[BottleneckRow, ...] = ()  # per model the node knows


# ---- training ----------------------------------------------------------------------------

TRAIN_TASKS = ("lm", "classify", "distill")


@record("api.train")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainRequest:
    """Train a model over the mesh; the result is a new model `output` (a new version).

    `data` is a path the daemon reads (the CLI makes it absolute); empty for `lm` means
    the shipped English corpus. Defaults are the `[train]` config section's, filled in by
    the CLI, so a journaled job replays with exactly the settings it started with.
    """

    task: str
    model: str
    output: str
    data: str = ""
    validation: str = ""
    steps: int = 200
    micro_batch: int = 8
    accumulation: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    clip: float = 1.0
    precision: str = "fp32"
    schedule: str = "1f1b"
    eval_interval: int = 50
    eval_examples: int = 200
    checkpoint_interval: int = 50
    seed: int = 0
    replicas: int = 1
    average_every: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # distill: the teacher model (run at the origin) and the loss's temperature and alpha;
    # an embedding student's token term weight (`atoms.distill_embed`)
    teacher: str = ""
    temperature: float = 2.0
    alpha: float = 0.5
    token_weight: float = 1.0
    # wire codec of activations and gradients between stages ("raw": exact; "auto": per hop)
    codec: str = "raw"
    job_id: str = ""


@record("api.train_progress")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainProgressEvent:
    """One optimiser step done (or an evaluation): what the progress bar shows."""

    job_id: str
    step: int  # optimiser steps done
    steps: int
    loss: float  # mean training loss of the step (nats per target)
    lr: float
    tokens_per_s: float  # targets per second over the run so far
    eta_s: float
    val_loss: float = -1.0  # set on evaluation steps
    val_accuracy: float = -1.0  # classification
    resumed_from: int = -1  # set once when a run resumes from a checkpoint


@record("api.train_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainReply:
    job_id: str
    task: str
    model: str  # the new model id
    parent: str
    steps: int
    train_loss: float
    val_loss: float
    val_perplexity: float  # lm: exp(val_loss); classify: 0
    val_accuracy: float  # classify: share correct; lm: next-token accuracy
    tokens: int  # training targets seen
    elapsed_s: float
    tokens_per_s: float
    resumed_from: int  # -1 when the run started from scratch
    checkpoint: str  # the folder holding checkpoints and metrics.csv
    route: tuple[HopReport, ...]
    failovers: tuple[str, ...]
    bubble: tuple[tuple[str, float], ...]  # (host name, idle share of step wall time)
    teacher_val_perplexity: float = 0.0  # distill: the teacher's, on the same validation
    # distill of an embedding model: the student's cosine to the teacher on validation
    val_cosine_mean: float = 0.0
    val_cosine_min: float = 0.0


REPLY_TYPES: tuple[type, ...] = (
    ErrorReply,
    OkReply,
    StatusReply,
    GenerateReply,
    EmbedReply,
    ClassifyReply,
    JobsReply,
    InviteReply,
    JoinedReply,
    PeersReply,
    TrainReply,
    ModelsReply,
)
EVENT_TYPES: tuple[type, ...] = (TokenEvent, ProgressEvent, RouteEvent, TrainProgressEvent)
