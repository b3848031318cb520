"""nexusd: the NEXUS node daemon (application layer composing `mesh` and `atoms`)."""

from __future__ import annotations

__version__ = "0.1.0"
