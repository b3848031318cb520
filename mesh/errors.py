"""Errors of the mesh package.

Rule 1: nothing outside `mesh/` ever sees a libp2p, msgpack or PyNaCl exception; each home
module converts them to one of these at its boundary.
Rule 2: keep trio's distinction between the remote side misbehaving (`PeerProtocolError`,
which raises the peer's ban score), an outside failure (`TransportBroken`) and our own
close (`ClosedError`).
"""

from __future__ import annotations

import enum


class MeshError(Exception):
    """Root of every error raised by `mesh`."""


class PeerProtocolError(MeshError):
    """The remote side sent something it must not send. Counts against its score."""


class MalformedMessage(PeerProtocolError):
    """Bytes that do not decode to the expected typed record."""


class OversizeMessage(MalformedMessage):
    """A frame or payload over the configured size cap."""


class InvalidSignature(PeerProtocolError):
    """A signature that does not verify for the claimed sender and domain."""


class WrongDomain(InvalidSignature):
    """A validly signed message for another purpose (domain separation)."""


class StaleMessage(PeerProtocolError):
    """A timestamp older than the accepted window."""


class FutureMessage(PeerProtocolError):
    """A timestamp further ahead than the accepted clock drift."""


class ReplayedMessage(PeerProtocolError):
    """A nonce already seen inside the window."""


class UnknownSender(PeerProtocolError):
    """A sender that is not (or no longer) a member."""


class TransportBroken(MeshError):
    """An outside failure: connection reset, peer gone, deadline passed."""


class StreamRefused(MeshError):
    """We turned an inbound stream away unread (a limit, a ban); the transport resets it.
    The refuser logs and counts it; `serve_stream` only resets."""


class ClosedError(MeshError):
    """We closed this resource ourselves; using it afterwards is a bug of the caller."""


class DecryptionFailed(PeerProtocolError):
    """Ciphertext that does not authenticate under our key (forged, corrupted or not for us)."""


class KeyFileError(MeshError):
    """A node key file that cannot be used: wrong format, wrong size or unsafe permissions."""


class InsecureKeyFile(KeyFileError):
    """A node key file readable or writable by group or others."""


class KeyFileExists(KeyFileError):
    """Refusing to overwrite an existing node key file (pass force=True to replace it)."""


class NoRoute(MeshError):
    """No live, non-excluded host covers some atom a job needs (`mesh.routing`).

    Args:
        message: what was asked, which atom is missing and how many hosts were considered.
        atom: the first atom index that no usable host covers.
    """

    def __init__(self, message: str, *, atom: int) -> None:
        super().__init__(message)
        self.atom = atom


class ForbiddenWrite(PeerProtocolError):
    """A replicated-state entry its author may not write (`mesh.state` write rules)."""


class ForeignSlot(ForbiddenWrite):
    """An advert or load entry written by a node other than the one it describes."""


class NotAdmin(ForbiddenWrite):
    """A certificate, removal, revocation or model manifest by a non-admin author."""


class NotMember(ForbiddenWrite):
    """An advert or load entry by a node holding no certificate valid at the entry's time."""


class WrongMesh(PeerProtocolError):
    """A certificate or revocation that names another mesh."""


class InconsistentEntry(MalformedMessage):
    """A state entry whose payload disagrees with its slot or author."""


class JoinRefusal(enum.Enum):
    """Why an admin refused a join request (sent by value in `mesh.membership.JoinReject`)."""

    EXPIRED = "expired"
    USED_UP = "used_up"
    FORGED = "forged"  # bad joiner signature, bad invite proof, or sender != joiner
    WRONG_MESH = "wrong_mesh"
    REVOKED = "revoked"
    NOT_A_MEMBER = "not_a_member"  # unknown/cancelled invite, or its issuer is no admin
    RATE_LIMITED = "rate_limited"
    STALE = "stale"  # timestamp outside the window (either direction)
    MALFORMED = "malformed"  # bytes that are not a signed join request


class JoinRefused(MeshError):
    """The admin refused our join request (`mesh.membership`), or our invite is unusable.

    Args:
        reason: the `JoinRefusal` the admin gave.
        detail: its explanation, for the operator.
    """

    def __init__(self, reason: JoinRefusal, detail: str) -> None:
        super().__init__(f"join refused ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


class StateStoreError(MeshError):
    """The state database cannot be opened or has a schema this code does not know."""


class NotJoined(MeshError):
    """This node has no mesh identity yet (join a mesh or create one first)."""


class AlreadyJoined(MeshError):
    """This node already belongs to a mesh; a node joins at most one."""


class AdminRequired(MeshError):
    """A local operation only an admin of the mesh may perform (invite, revoke, publish)."""


class UnexpectedPeer(PeerProtocolError):
    """An authenticated peer that is not the node we meant to reach (`mesh.transport.direct`)."""
