"""Errors of the application layer.

`mesh` and `atoms` keep their own roots (`MeshError`, `AtomError`): the layering rule
(neither imports `nexusd`) leaves no common module for a single root, so the daemon's
boundaries catch `NEXUS_ERRORS`, the tuple of all three.
"""

from __future__ import annotations

from atoms.errors import AtomError
from mesh.errors import MeshError


class NexusError(Exception):
    """Root of errors raised by `nexusd`."""


class ConfigError(NexusError):
    """A bad configuration value, file, variable or flag; the message names the key path."""


class SetupError(NexusError):
    """The node is not set up as the command needs (no key, no mesh, bad permissions)."""


class AlreadyRunning(NexusError):
    """Another daemon holds this data directory."""


class DaemonUnavailable(NexusError):
    """No daemon answers on the local socket."""


class ApiError(NexusError):
    """A request the daemon refused; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


NEXUS_ERRORS: tuple[type[Exception], ...] = (NexusError, MeshError, AtomError)
