"""mesh: networking without torch — wire records, identity, clocks, replicated state, routing.

Rule 1: this package imports neither torch nor nexusd (tests/unit/test_layering.py checks).
Rule 2: the light core (errors, wire, hlc, identity) is re-exported here; the parts with
heavy dependencies are imported from their own modules so a CLI call stays fast:
`mesh.routing` (networkx), `mesh.node` / `mesh.sync` (the trio shell),
`mesh.transport.libp2p` (py-libp2p), `mesh.state` / `mesh.store` / `mesh.membership`.
"""

from __future__ import annotations

from .errors import ClosedError as ClosedError
from .errors import InvalidSignature as InvalidSignature
from .errors import MalformedMessage as MalformedMessage
from .errors import MeshError as MeshError
from .errors import OversizeMessage as OversizeMessage
from .errors import PeerProtocolError as PeerProtocolError
from .errors import StreamRefused as StreamRefused
from .errors import TransportBroken as TransportBroken
from .framing import FrameDecoder as FrameDecoder
from .framing import frame as frame
from .hlc import HybridClock as HybridClock
from .hlc import Timestamp as Timestamp
from .identity import EnvelopeVerifier as EnvelopeVerifier
from .identity import MeshSecret as MeshSecret
from .identity import NodeId as NodeId
from .identity import NodeKey as NodeKey
from .identity import seal as seal
from .identity import seal_large as seal_large
from .identity import short_id as short_id
from .identity import verify_signature as verify_signature
from .wire import Limits as Limits
from .wire import TensorBlob as TensorBlob
from .wire import decode as decode
from .wire import decode_any as decode_any
from .wire import encode as encode
from .wire import record as record
