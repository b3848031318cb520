"""Errors of the application layer.

`mesh` and `atoms` keep their own roots (`MeshError`, `AtomError`): the layering rule
(neither imports `nexusd`) leaves no common module for a single root, so the daemon's
boundaries catch `NEXUS_ERRORS`, the tuple of all three.
"""

from __future__ import annotations

from typing import TypeVar

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
E = TypeVar("E", bound=BaseException)


def first_in_group(
    group: BaseExceptionGroup[BaseException], kinds: type[E] | tuple[type[E], ...]
) -> E | None:
    """The first exception of `kinds` inside a nursery's exception group, depth first
    (nested groups included); None when there is none. The one home of this unwrapping:
    a trio nursery wraps its children's errors, and the caller wants the one that says
    what went wrong (a hop's failure, a job's error)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = first_in_group(exc, kinds)
            if inner is not None:
                return inner
        elif isinstance(exc, kinds):
            return exc
    return None
