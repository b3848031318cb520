"""mesh.transport: how frames move between nodes.

Rule: every transport offers the `Stream` / `Transport` protocols of `base`; the py-libp2p
adapter (`mesh.transport.libp2p`, the only module importing libp2p) and the direct channel
(`mesh.transport.direct`) are imported from their modules, the in-memory one from here.
"""

from __future__ import annotations

from .base import Stream as Stream
from .base import StreamHandler as StreamHandler
from .base import Subscribers as Subscribers
from .base import Transport as Transport
from .base import TransportConfig as TransportConfig
from .memory import LinkFaults as LinkFaults
from .memory import MemoryNetwork as MemoryNetwork
from .memory import MemoryTransport as MemoryTransport
from .memory import open_memory_transport as open_memory_transport
