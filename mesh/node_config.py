"""The mesh node's records: its configuration and its status summary.

Rule 1: `MeshNodeConfig` holds every knob of the mesh node, validated on construction; the
daemon maps its `[mesh]` config section onto it (names and defaults match).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MeshNodeConfig:
    """Mesh knobs (the daemon maps `[mesh]` config onto these; defaults match it).

    Attributes:
        advert_refresh_s: re-sign and gossip our advert (and load) this often.
        advert_lease_s: lease written into each advert (>= 2 x refresh).
        anti_entropy_interval_s: mean period of digest exchanges with a random member.
        ping_interval_s: period of pings on each connected member.
        read_timeout_s: deadline for a ping reply and for each frame of our protocols.
        max_clock_drift_s: how far ahead a peer's clock may be.
        envelope_window_s: how old a gossip message may be (and nonce memory).
        replay_cache_entries: nonces remembered.
        ban_score_threshold, ban_base_s, ban_max_s, score_decay_per_s: `PeerScores`.
        join_attempts_per_minute: per-remote join rate (the global rate is 10 x this).
        max_peers: members we dial at most (inbound connections are not refused).
        gossip_interval_s: at most one gossip message per this period (coalescing).
        gossip_max_bytes: plaintext bytes per gossip message (well below 1 MiB).
        sync_chunk_bytes: largest anti-entropy chunk (below the transport frame cap).
        redial_base_s, redial_max_s: dial backoff after a failed connect.
        failure_base_s, failure_max_s: routing backoff after a reported failure.
        cert_ttl_s: lifetime of the member certificates we issue.
        max_lease_s: longest lease a state accepts (and load report age before pruning).
        rtt_alpha: EWMA weight of a new ping sample.
        join_window_s: how long a non-member's connection may stay without starting a join
            exchange (it is cut at most 1 s after its join exchange ends).
        max_streams_per_peer: inbound streams one peer may have open at once per protocol.
        max_stranger_streams: inbound (join) streams all non-members may have open at once.
    """

    advert_refresh_s: float = 10.0
    advert_lease_s: float = 30.0
    anti_entropy_interval_s: float = 15.0
    ping_interval_s: float = 5.0
    read_timeout_s: float = 10.0
    max_clock_drift_s: float = 5.0
    envelope_window_s: float = 120.0
    replay_cache_entries: int = 100_000
    ban_score_threshold: float = 50.0
    ban_base_s: float = 15.0
    ban_max_s: float = 3600.0
    score_decay_per_s: float = 0.5
    join_attempts_per_minute: int = 10
    max_peers: int = 32
    gossip_interval_s: float = 0.2
    gossip_max_bytes: int = 256 * 1024
    sync_chunk_bytes: int = 1024 * 1024
    redial_base_s: float = 1.0
    redial_max_s: float = 60.0
    failure_base_s: float = 15.0
    failure_max_s: float = 900.0
    cert_ttl_s: float = 10 * 365 * 86400.0
    max_lease_s: float = 600.0
    rtt_alpha: float = 0.2
    join_window_s: float = 5.0
    max_streams_per_peer: int = 32
    max_stranger_streams: int = 16

    def __post_init__(self) -> None:
        for name in MeshNodeConfig.__slots__:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"MeshNodeConfig.{name}: expected a finite number > 0, got {value!r}"
                )
        if self.advert_lease_s < 2 * self.advert_refresh_s:
            least = 2 * self.advert_refresh_s
            raise ValueError(
                f"advert_lease_s: expected >= 2 x advert_refresh_s ({least}), "
                f"got {self.advert_lease_s}"
            )
        if self.advert_lease_s > self.max_lease_s:
            raise ValueError(
                f"advert_lease_s: expected <= max_lease_s ({self.max_lease_s}), "
                f"got {self.advert_lease_s}"
            )
        if not 1024 <= self.gossip_max_bytes <= 512 * 1024:
            raise ValueError(
                f"gossip_max_bytes: expected 1 KiB..512 KiB (gossipsub drops over "
                f"1 MiB), got {self.gossip_max_bytes}"
            )


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A summary of the node for `nexusd status`."""

    node_id: bytes
    mesh_id: bytes | None
    is_admin: bool
    revoked: bool
    members: int
    live_adverts: int
    connected: int
    sessions: int
    banned: int
    pending_gossip: int
    rejections: int
