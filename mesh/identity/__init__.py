"""Node identity, signed envelopes and mesh encryption, one concept per module:

- `keys`: the Ed25519 node key (its verify key is the node id), its file, signature checks.
- `envelope`: the signed `Envelope` every application message travels in, its verifier
  and replay cache.
- `secretbox`: the mesh-wide `MeshSecret` (SecretBox) and sealed boxes to one node.
- `session`: the session crypto of direct channels (`EphemeralKey`, `derive_session_keys`,
  `SessionCipher`; see `mesh.transport.direct`).
- `_nacl`: the one home of PyNaCl; nacl exceptions end there and become `InvalidSignature`,
  `DecryptionFailed` or `MalformedMessage` in the modules above.

Everything public is re-exported here, so callers import from `mesh.identity`.
"""

from __future__ import annotations

from .envelope import ENVELOPE_VERSION as ENVELOPE_VERSION
from .envelope import NONCE_BYTES as NONCE_BYTES
from .envelope import Envelope as Envelope
from .envelope import EnvelopeVerifier as EnvelopeVerifier
from .envelope import LargeBody as LargeBody
from .envelope import SignedEnvelope as SignedEnvelope
from .envelope import check_payload as check_payload
from .envelope import seal as seal
from .envelope import seal_large as seal_large
from .keys import DIGEST_BYTES as DIGEST_BYTES
from .keys import NODE_ID_BYTES as NODE_ID_BYTES
from .keys import SEED_BYTES as SEED_BYTES
from .keys import SIGNATURE_BYTES as SIGNATURE_BYTES
from .keys import NodeId as NodeId
from .keys import NodeKey as NodeKey
from .keys import digest as digest
from .keys import short_id as short_id
from .keys import verify_signature as verify_signature
from .secretbox import MeshSecret as MeshSecret
from .secretbox import open_sealed as open_sealed
from .secretbox import seal_to as seal_to
from .session import AEAD_TAG_BYTES as AEAD_TAG_BYTES
from .session import SESSION_KEY_BYTES as SESSION_KEY_BYTES
from .session import X25519_BYTES as X25519_BYTES
from .session import EphemeralKey as EphemeralKey
from .session import SessionCipher as SessionCipher
from .session import derive_session_keys as derive_session_keys
