"""Typed configuration: defaults < file < `NEXUSD_*` environment < command-line flags.

Rule 1: every knob is a typed field of a frozen section dataclass, with its unit in its name.
Rule 2: an unknown key or a wrong type is a `ConfigError` naming the full key path; nothing
is ever silently ignored.
Rule 3: configuration is read once, here, and passed down as these objects; `mesh/` and
`atoms/` never read files or the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.node_config import MeshNodeConfig

from .errors import ConfigError

MiB = 1024 * 1024
ENV_PREFIX = "NEXUSD_"
_MESH_NODE = MeshNodeConfig()  # the defaults of the mesh node's knobs
MAX_PROBE_BYTES = 4 * MiB  # a bandwidth probe frame, on both sides
WIRE_CODECS = ("raw", "fp16", "bf16", "int8")  # atoms.codecs.CODECS


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """[node]: this device."""

    name: str = ""  # empty: the host name
    data_dir: str = ""  # empty: $STATE_DIRECTORY, else $XDG_DATA_HOME/nexusd
    runtime_dir: str = ""  # empty: $RUNTIME_DIRECTORY, else <data_dir>/run
    shutdown_grace_s: float = 5.0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        _positive("node.shutdown_grace_s", self.shutdown_grace_s)
        _positive("node.torch_threads", self.torch_threads)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """[mesh]: networking, gossip, security windows.

    The keys that are knobs of the mesh node (`MESH_NODE_KEYS`) take their defaults from
    `mesh.node_config.MeshNodeConfig` and reach it through `node_config()`; the others
    configure the transports and probes the daemon runs itself.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 7420  # 0: any free port
    advertise_host: str = ""  # with listen_host 0.0.0.0: the address peers dial
    direct_enabled: bool = True
    direct_port: int = 0  # 0: any free port
    bootstrap: tuple[str, ...] = ()
    max_frame_bytes: int = 64 * MiB
    read_timeout_s: float = _MESH_NODE.read_timeout_s
    write_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    gossip_heartbeat_s: float = 1.0
    advert_refresh_s: float = _MESH_NODE.advert_refresh_s
    advert_lease_s: float = _MESH_NODE.advert_lease_s
    anti_entropy_interval_s: float = _MESH_NODE.anti_entropy_interval_s
    ping_interval_s: float = _MESH_NODE.ping_interval_s
    bandwidth_probe_interval_s: float = 30.0
    bandwidth_probe_bytes: int = 262144
    max_clock_drift_s: float = _MESH_NODE.max_clock_drift_s
    envelope_window_s: float = _MESH_NODE.envelope_window_s
    replay_cache_entries: int = _MESH_NODE.replay_cache_entries
    ban_score_threshold: float = _MESH_NODE.ban_score_threshold
    ban_base_s: float = _MESH_NODE.ban_base_s
    ban_max_s: float = _MESH_NODE.ban_max_s
    join_attempts_per_minute: int = _MESH_NODE.join_attempts_per_minute
    join_window_s: float = _MESH_NODE.join_window_s

    def __post_init__(self) -> None:
        for name in ("listen_port", "direct_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"mesh.{name}: expected 0..65535, got {getattr(self, name)}")
        for name in (
            "max_frame_bytes",
            "read_timeout_s",
            "write_timeout_s",
            "connect_timeout_s",
            "gossip_heartbeat_s",
            "advert_refresh_s",
            "advert_lease_s",
            "anti_entropy_interval_s",
            "ping_interval_s",
            "bandwidth_probe_interval_s",
            "bandwidth_probe_bytes",
            "max_clock_drift_s",
            "envelope_window_s",
            "replay_cache_entries",
            "ban_score_threshold",
            "ban_base_s",
            "ban_max_s",
            "join_attempts_per_minute",
            "join_window_s",
        ):
            _positive(f"mesh.{name}", getattr(self, name))
        if self.advertise_host:
            try:
                ipaddress.IPv4Address(self.advertise_host)
            except ValueError:
                raise ConfigError(
                    f"mesh.advertise_host: expected an IPv4 address or empty, "
                    f"got {self.advertise_host!r}"
                ) from None
            if ipaddress.IPv4Address(self.advertise_host).is_unspecified:
                raise ConfigError(
                    "mesh.advertise_host: 0.0.0.0 cannot be dialled; give the "
                    "address peers reach this node at, or leave it empty"
                )
        if self.bandwidth_probe_bytes > MAX_PROBE_BYTES:
            raise ConfigError(
                f"mesh.bandwidth_probe_bytes: expected at most {MAX_PROBE_BYTES} "
                f"(what peers accept), got {self.bandwidth_probe_bytes}"
            )
        if self.advert_lease_s < 2 * self.advert_refresh_s:
            raise ConfigError(
                "mesh.advert_lease_s: expected at least 2 x mesh.advert_refresh_s "
                f"({2 * self.advert_refresh_s}), got {self.advert_lease_s}"
            )

    def node_config(self) -> MeshNodeConfig:
        """The mesh node's knobs: our keys of the same name; its own defaults for the rest."""
        knobs = {name: getattr(self, name) for name in MESH_NODE_KEYS}
        return MeshNodeConfig(**knobs, max_lease_s=max(600.0, self.advert_lease_s))


# the [mesh] keys that are `MeshNodeConfig` knobs, copied by name
MESH_NODE_KEYS = tuple(
    f.name for f in dataclasses.fields(MeshConfig) if f.name in MeshNodeConfig.__dataclass_fields__
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AtomsConfig:
    """[atoms]: models this node hosts and the memory it gives them."""

    models_dir: str = ""  # empty: <data_dir>/models
    host: tuple[str, ...] = ()  # "MODEL", "MODEL:START-END" ("nexus-1.1:0-4") or "MODEL:auto"
    dtype: str = "float32"
    kv_cache_budget_bytes: int = 512 * MiB
    kv_page_tokens: int = 8  # tokens per page of the KV pool (atoms/kv_pool.py)
    session_idle_s: float = 300.0
    max_sessions: int = 64
    max_step_tokens: int = 65536
    # `nexusd host --max-memory`: weight bytes a hosted model may take (0: no budget, the
    # model as saved) and the lowest output cosine against fp32 a compression level may have
    host_max_memory_bytes: int = 0
    host_accuracy_floor: float = 0.99
    memory_budget_bytes: int = 0  # weights "MODEL:auto" may place here; 0: half the RAM
    placement_interval_s: float = 30.0  # how often "MODEL:auto" re-checks its span
    rebalance_threshold: float = 0.2  # move only for this much more swarm throughput

    def __post_init__(self) -> None:
        if self.memory_budget_bytes < 0 or self.rebalance_threshold < 0:
            raise ConfigError(
                "atoms.memory_budget_bytes and atoms.rebalance_threshold: expected >= 0, "
                f"got {self.memory_budget_bytes} and {self.rebalance_threshold}"
            )
        _positive("atoms.placement_interval_s", self.placement_interval_s)
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"atoms.dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")
        _positive("atoms.kv_cache_budget_bytes", self.kv_cache_budget_bytes)
        if self.host_max_memory_bytes < 0 or not -1.0 <= self.host_accuracy_floor <= 1.0:
            raise ConfigError(
                "atoms.host_max_memory_bytes / host_accuracy_floor: expected >= 0 / [-1, 1], "
                f"got {self.host_max_memory_bytes} / {self.host_accuracy_floor}"
            )
        _positive("atoms.kv_page_tokens", self.kv_page_tokens)
        _positive("atoms.session_idle_s", self.session_idle_s)
        _positive("atoms.max_sessions", self.max_sessions)
        _positive("atoms.max_step_tokens", self.max_step_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecConfig:
    """[exec]: how this node, as the origin of a job, checks the hosts it routes through
    (spot-check verification, `nexusd.exec.verify`)."""

    verify_rate: float = 0.02  # fraction of a host's later steps recomputed elsewhere
    verify_first_steps: int = 1  # a host's first N steps in a session are always checked
    verify_tol_fp32: float = 1e-4  # max |diff| / max |reference|, float32 outputs, raw codec
    verify_tol_bf16: float = 5e-2  # the same when either output is bfloat16/float16
    # a generation's checks run beside its stream, its tokens held back until checked; a
    # lie found reruns the job without the liar (exec/session.py Rule 7); false: a checked
    # step waits for its check
    verify_beside: bool = True
    # jobs with `--codec auto` (exec/adaptive.py): a hop whose link to this node is measured
    # below slow_link_bytes_per_s gets the codec within slow_link_codec (the error the job
    # accepts: the lossiest codec allowed) that the link's RTT, bandwidth and the codecs'
    # CPU costs make fastest, if it saves >= 10 % of the raw step; others raw
    slow_link_bytes_per_s: float = 6.25e6  # 50 Mbit/s
    slow_link_codec: str = "int8"  # raw (never lossy) | fp16 | bf16 | int8
    # as a host: a decode step waits at most this for the sessions due to step (batching.py)
    batch_window_ms: float = 20.0
    # as a host: a lone decode step whose span's recent steps took at most this runs on the
    # event loop's thread (no worker-thread hand-offs; exec/batching.py Rule 5); 0: never
    inline_step_max_ms: float = 20.0
    # as the origin: "relay" (every activation through the origin) or "forward" (hosts send
    # activations straight to the next host, copies to the origin; exec/wire.py Rule 5;
    # measured 1.01-1.12x relay's tokens/s over 3 daemons, bench.generate --mode both)
    forward_mode: str = "forward"
    # as the origin of a greedy generation: the LM head's host sends the next token (its
    # argmax, 8 bytes) instead of the logits (122 KB for Nexus 1.1); exec/wire.py Rule 6
    host_argmax: bool = True

    def __post_init__(self) -> None:
        if self.forward_mode not in ("relay", "forward"):
            raise ConfigError(
                f"exec.forward_mode: expected 'relay' or 'forward', got {self.forward_mode!r}"
            )
        if not 0.0 <= self.batch_window_ms <= 1000.0:
            raise ConfigError(f"exec.batch_window_ms: expected 0..1000, got {self.batch_window_ms}")
        if not 0.0 <= self.inline_step_max_ms <= 1000.0:
            raise ConfigError(
                f"exec.inline_step_max_ms: expected 0..1000, got {self.inline_step_max_ms}"
            )
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ConfigError(f"exec.verify_rate: expected 0..1, got {self.verify_rate}")
        if self.slow_link_bytes_per_s < 0 or self.slow_link_codec not in WIRE_CODECS:
            raise ConfigError(
                "exec.slow_link_bytes_per_s / slow_link_codec: expected >= 0 / raw, fp16, bf16 "
                f"or int8, got {self.slow_link_bytes_per_s} / {self.slow_link_codec!r}"
            )
        if self.verify_first_steps < 0:
            raise ConfigError(
                f"exec.verify_first_steps: expected >= 0, got {self.verify_first_steps}"
            )
        for name in ("verify_tol_fp32", "verify_tol_bf16"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(
                    f"exec.{name}: expected a number in (0, 1), got {getattr(self, name)}"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """[train]: defaults of `nexusd train` (each has a flag) and the host's training limits."""

    steps: int = 200
    micro_batch: int = 8
    accumulation: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    clip: float = 1.0  # global gradient norm; 0: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast over fp32 master weights)
    schedule: str = "1f1b"  # 1f1b | gpipe
    # wire codec of activations and gradients between stages: raw (exact, equal to one
    # process) | fp16 | bf16 | int8 | auto (per hop, from the link: [exec] slow_link_*)
    codec: str = "raw"
    eval_interval: int = 50  # optimiser steps between validations; 0: only at the end
    eval_examples: int = 200
    checkpoint_interval: int = 50  # optimiser steps between checkpoints; 0: only at the end
    seed: int = 0
    replicas: int = 1  # data-parallel copies of the trainable spans (distinct hosts)
    average_every: int = 1  # 1: gradients summed every step; H > 1: DiLoCo rounds
    outer_lr: float = 0.7  # DiLoCo outer SGD (Nesterov)
    outer_momentum: float = 0.9
    # train distill: the teacher (run at the origin), the softening temperature T of the
    # soft targets, and alpha, the soft (KL) term's weight against the hard labels' 1 - alpha
    teacher: str = "nexus-1.1"
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    # an embedding student's token term: its last hidden states against the teacher's
    distill_token_weight: float = 1.0
    op_timeout_s: float = 300.0  # deadline of one training exchange with a host
    route_wait_s: float = 60.0  # a run waits this long for hosts to appear before failing
    graph_budget_bytes: int = 1024 * MiB  # autograd memory a host keeps per session
    max_sessions: int = 4  # training sessions a host serves at once
    # spot-checks of the hosts (`nexusd.exec.train_verify`; tolerances from [exec])
    verify_rate: float = 0.02  # fraction of a stage host's later micro-batches recomputed
    verify_first_micro_batches: int = 1  # a stage host's first N in a job always are

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ConfigError(f"train.verify_rate: expected 0..1, got {self.verify_rate}")
        if self.codec not in (*WIRE_CODECS, "auto"):
            raise ConfigError(
                f"train.codec: expected one of raw, fp16, bf16, int8, auto, got {self.codec!r}"
            )
        for name in (
            "steps",
            "micro_batch",
            "accumulation",
            "seq_len",
            "eval_examples",
            "op_timeout_s",
            "route_wait_s",
            "graph_budget_bytes",
            "max_sessions",
            "lr",
            "replicas",
            "average_every",
            "outer_lr",
        ):
            _positive(f"train.{name}", getattr(self, name))
        if not 0.0 <= self.distill_token_weight <= 100.0:
            raise ConfigError(
                f"train.distill_token_weight: expected 0..100, got {self.distill_token_weight}"
            )
        if not 0.0 < self.distill_temperature <= 100.0 or not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(
                "train.distill_temperature / distill_alpha: expected (0, 100] / [0, 1], got "
                f"{self.distill_temperature} / {self.distill_alpha}"
            )
        for name in (
            "verify_first_micro_batches",
            "warmup_steps",
            "eval_interval",
            "checkpoint_interval",
            "seed",
            "clip",
            "weight_decay",
            "dropout",
            "min_lr_ratio",
            "outer_momentum",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        for name, allowed in (
            ("decay", ("cosine", "linear", "constant")),
            ("precision", ("fp32", "bf16")),
            ("schedule", ("1f1b", "gpipe")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"train.{name}: expected one of {allowed}, got {getattr(self, name)!r}"
                )


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """[api]: the local Unix socket the CLI talks to."""

    socket_path: str = ""  # empty: <runtime_dir>/nexusd.sock
    max_request_bytes: int = 16 * MiB
    request_timeout_s: float = 30.0
    max_clients: int = 64
    # The OpenAI-compatible HTTP API and dashboard (nexusd.http); 0: off.
    http_port: int = 0
    http_host: str = "127.0.0.1"  # not loopback: a bearer token (DATA_DIR/http_token) is required
    http_max_body_bytes: int = 4 * MiB
    http_max_inflight: int = 16  # HTTP jobs at once; more get 429
    http_keep_alive_s: float = 5.0  # idle keep-alive, and the deadline for a request's headers
    http_body_timeout_s: float = 30.0  # deadline for a request's body once its headers are in

    def __post_init__(self) -> None:
        _positive("api.max_request_bytes", self.max_request_bytes)
        _positive("api.request_timeout_s", self.request_timeout_s)
        _positive("api.max_clients", self.max_clients)
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"api.http_port: expected 0..65535, got {self.http_port}")
        _positive("api.http_max_body_bytes", self.http_max_body_bytes)
        _positive("api.http_max_inflight", self.http_max_inflight)
        _positive("api.http_keep_alive_s", self.http_keep_alive_s)
        _positive("api.http_body_timeout_s", self.http_body_timeout_s)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: structured logs."""

    level: str = "info"
    format: str = "auto"  # auto: console on a TTY, JSON otherwise

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level: expected debug/info/warning/error, got {self.level!r}")
        if self.format not in ("auto", "console", "json"):
            raise ConfigError(f"log.format: expected auto/console/json, got {self.format!r}")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: Prometheus text exposition on a local port."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: metrics endpoint off

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"metrics.listen_port: expected 0..65535, got {self.listen_port}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration of one daemon."""

    node: NodeConfig = field(default_factory=NodeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    atoms: AtomsConfig = field(default_factory=AtomsConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


Overrides = Mapping[str, object]  # "section.key" -> value (already typed, e.g. from flags)


def load_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Config:
    """Build a `Config` from defaults, then `path`, then `NEXUSD_*` env, then `overrides`.

    Args:
        path: a TOML file, or None for none. A missing file named explicitly is an error.
        env: the environment to read `NEXUSD_SECTION__KEY` variables from (default: none).
        overrides: "section.key" -> value, e.g. from command-line flags; None values are skipped.

    Raises:
        ConfigError: naming the key path of an unknown key, a wrong type or a bad value.
    """
    layers: list[dict[str, dict[str, object]]] = []
    if path is not None:
        layers.append(_read_toml(path))
    if env is not None:
        layers.append(_env_layer(env))
    if overrides:
        layers.append(_dotted_layer({k: v for k, v in overrides.items() if v is not None}, "flag"))
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return _build(Config, merged)


def _read_toml(path: Path) -> dict[str, dict[str, object]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    out: dict[str, dict[str, object]] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a [section] table, got {type(values).__name__}")
        out[section] = dict(values)
    return out


def _env_layer(env: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """`NEXUSD_MESH__LISTEN_PORT=7421` -> {"mesh": {"listen_port": "7421"}} (typed later)."""
    dotted: dict[str, object] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest:
            continue  # NEXUSD_CONFIG and similar belong to the CLI, not to sections
        section, key = rest.lower().split("__", 1)
        dotted[f"{section}.{key}"] = _EnvString(raw, name)
    return _dotted_layer(dotted, "env")


class _EnvString(str):
    """A string from the environment, parsed according to the field type it lands in."""

    source: str

    def __new__(cls, value: str, source: str) -> _EnvString:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


def _dotted_layer(values: Mapping[str, object], origin: str) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for dotted, value in values.items():
        section, sep, key = dotted.partition(".")
        if not sep or not key:
            raise ConfigError(f"{origin} override {dotted!r}: expected 'section.key'")
        out.setdefault(section, {})[key] = value
    return out


_T = typing.TypeVar("_T")


def _build(cls: type[_T], data: Mapping[str, object], prefix: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {prefix}{key}")
    kwargs: dict[str, object] = {}
    for name in known:
        if name not in data:
            continue
        hint = hints[name]
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            section = data[name]
            if not isinstance(section, Mapping):
                raise ConfigError(f"{path}: expected a table, got {type(section).__name__}")
            kwargs[name] = _build(hint, section, f"{path}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(path, hint, data[name])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(path: str, hint: object, value: object) -> object:
    if isinstance(value, _EnvString):
        value = _parse_env(path, hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return str(value)
    elif typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value))
    else:  # pragma: no cover - a field type this loader does not know is our bug
        raise TypeError(f"config field {path} has unsupported type {hint!r}")
    expected = (
        typing.get_args(hint)[0].__name__ + " list"
        if typing.get_origin(hint)
        else getattr(hint, "__name__", str(hint))
    )
    raise ConfigError(f"{path}: expected {expected}, got {type(value).__name__} {value!r}")


def _parse_env(path: str, hint: object, raw: _EnvString) -> object:
    if hint is str:
        return str(raw)
    try:
        parsed = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if typing.get_origin(hint) is tuple:  # a bare comma list: a,b,c
            return [s.strip() for s in str(raw).split(",") if s.strip()]
        raise ConfigError(f"{path} (from {raw.source}): cannot parse {str(raw)!r}") from None
    return parsed


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: expected a positive number, got {value}")


def config_to_toml(cfg: Config) -> str:
    """Render a config as TOML (what `nexusd init` writes; every key, current values)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def env_overrides_present(env: Mapping[str, str]) -> list[str]:
    """Names of `NEXUSD_*` variables in `env` (for `nexusd doctor`)."""
    return sorted(k for k in env if k.startswith(ENV_PREFIX))
