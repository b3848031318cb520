"""Records of the local job API (the Unix socket between the CLI and its daemon).

Rule 1: every request and every reply is a typed `mesh.wire` record; a connection carries
one request and then replies until a final one (`is_final`), so long jobs can stream.
Rule 2: refusals are `ErrorReply(code, message)` with a stable code, never a closed socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.wire import record

# ---- generic -----------------------------------------------------------------------------


@record("api.error")
@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refusal. `code` is one of the ERROR_CODES; `message` says what, expected and got."""

    code: str
    message: str


ERROR_CODES = (
    "malformed",  # the request did not decode
    "bad_request",  # decoded, but a parameter is out of range
    "not_found",  # unknown model, job, node
    "conflict",  # same job id with other parameters; not allowed in this state
    "unavailable",  # no route, no host, mesh not joined
    "refused",  # the mesh refused (invite expired, revoked, ...)
    "failed",  # the job ran and failed
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
@dataclass(frozen=True, slots=True)
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


REPLY_TYPES: tuple[type, ...] = (ErrorReply, OkReply, StatusReply)
EVENT_TYPES: tuple[type, ...] = ()
