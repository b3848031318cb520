"""The mesh node: the only async layer of `mesh/`, composing the sans-IO cores over a transport.

It drives admission, the join protocol (`mesh.join`), gossip and anti-entropy
(`mesh.sync`), pings (`mesh.liveness`), adverts/load/manifests (`mesh.state`), scores and
bans (`mesh.scoring`), persistence (`mesh.store`) and the dial policy.

Rule 1: one task per concern, all in the node's nursery (gossip in/out, adverts,
anti-entropy, dialling, maintenance, persistence, one ping session per connected member).
Rule 2: every entry from a peer goes through `MeshState.apply` in `_ingest`; accepted
entries are persisted, revocations cut the node off at once, and waiters are woken.
Rejections are counted by reason; misbehaviour (not replays or stale messages, which an
honest network produces) raises the sender's score, and a ban disconnects it and makes
admission refuse it until the ban ends.
Rule 3: time: `wall()` (seconds) for envelopes, entries, invites and scores/bans (the
admitter scores joiners in wall time too); trio's clock for scheduling and backoff;
`perf()` for ping RTTs. All injectable for simulation.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import NoReturn

import structlog
import trio

from mesh.errors import (
    AdminRequired,
    AlreadyJoined,
    ClosedError,
    JoinRefusal,
    JoinRefused,
    NotJoined,
    PeerProtocolError,
    StreamRefused,
    TransportBroken,
)
from mesh.hlc import HybridClock, wall_ms_of
from mesh.identity import EnvelopeVerifier, NodeKey, short_id
from mesh.join import JOIN_PROTOCOL, InviteDesk, MeshIdentity, join_handshake
from mesh.liveness import PING_PROTOCOL, PeerSessions, RttTable, StrangerWindow, serve_ping
from mesh.membership import Admitter, parse_invite
from mesh.node_config import MeshNodeConfig as MeshNodeConfig
from mesh.node_config import NodeStatus as NodeStatus
from mesh.scoring import Backoff, PeerScores, StreamSlots
from mesh.state import (
    Advert,
    HostedSpan,
    LoadReport,
    MemberCert,
    MeshState,
    NodeState,
    Payload,
    PublishedModel,
    Revocation,
    SignedEntry,
    Slot,
    SlotKind,
    SpanProfile,
)
from mesh.store import StateStore
from mesh.sync import SYNC_PROTOCOL, Replicator, classify_rejection
from mesh.transport.base import Stream, StreamHandler, Transport
from mesh.wire import encode

log = structlog.get_logger(__name__)

_RESERVED = frozenset({JOIN_PROTOCOL, SYNC_PROTOCOL, PING_PROTOCOL})


class MeshNode:
    """One node of a mesh over one transport (see the module docstring).

    Args:
        key: our node key.
        transport: an open transport (memory or libp2p) whose node id is `key.node_id`.
        identity: our mesh, or None before joining one (`join` sets it).
        state: the replicated state of `identity`'s mesh (None before joining).
        store: where accepted entries persist (restored into `state` by `run`), or None.
        cfg: the mesh knobs.
        wall: wall clock, seconds since the epoch.
        rng: the only randomness (peer choice, jitter).
        perf: monotonic clock for ping RTTs.
        invites_path: JSON file of our invite book (admins), or None to keep it in memory.
    """

    def __init__(
        self, *, key: NodeKey, transport: Transport, identity: MeshIdentity | None,
        state: MeshState | None, store: StateStore | None, cfg: MeshNodeConfig,
        wall: Callable[[], float] = time.time, rng: random.Random,
        perf: Callable[[], float] = time.perf_counter, invites_path: Path | None = None,
    ) -> None:  # fmt: skip
        if transport.node_id != key.node_id:
            raise ValueError("transport node id: expected the node key's id, got another")
        if identity is not None and (state is None or (state.mesh_id, state.founder)
                                     != (identity.mesh_id, identity.founder)):  # fmt: skip
            raise ValueError("state: expected the MeshState of the identity's mesh and founder")
        self.key, self.node_id, self.transport, self.cfg = key, key.node_id, transport, cfg
        self.identity, self._state, self._store = identity, state, store
        self._wall, self._rng, self._perf = wall, rng, perf
        self._clock = HybridClock(max_drift_s=cfg.max_clock_drift_s)
        self._verifier = EnvelopeVerifier(
            clock=self._clock, window_s=cfg.envelope_window_s,
            max_body_bytes=cfg.gossip_max_bytes + 64 * 1024,
            replay_capacity=cfg.replay_cache_entries,
        )  # fmt: skip
        self._scores = PeerScores(cfg.ban_score_threshold, cfg.ban_base_s, cfg.ban_max_s,
                                  cfg.score_decay_per_s)  # fmt: skip
        self._failures = Backoff(cfg.failure_base_s, cfg.failure_max_s)
        self._dial_backoff = Backoff(cfg.redial_base_s, cfg.redial_max_s)
        self._rtt = RttTable(cfg.rtt_alpha)
        self._repl: Replicator | None = None
        self._generation = 0  # bumped on every state change (`_signal(state=True)`)
        self._candidate_cache: tuple[tuple[int, int], list[bytes]] = ((-1, -1), [])
        self._desk = InviteDesk(
            key=key, listen_addrs=transport.listen_addrs, wall=wall, invites_path=invites_path,
            attempts_per_minute=cfg.join_attempts_per_minute, window_s=cfg.envelope_window_s,
            timeout_s=cfg.read_timeout_s, scores=self._scores,
        )  # fmt: skip
        self._addrs: dict[bytes, tuple[str, ...]] = {}
        self._sessions = PeerSessions(
            transport=transport, table=self._rtt, interval_s=cfg.ping_interval_s,
            timeout_s=cfg.read_timeout_s, perf=perf, on_start=self._sync_with,
            on_end=self._session_ended,
        )  # fmt: skip
        self._strangers = StrangerWindow(cfg.join_window_s, self._admits)
        self._slots = StreamSlots(cfg.max_streams_per_peer, cfg.max_stranger_streams)
        self._exclusion_hooks: list[Callable[[bytes], Awaitable[None]]] = []
        self._app_handlers: dict[str, StreamHandler] = {}
        self._rejections: Counter[str] = Counter()
        # what our advert and load say; lease, addrs and rtts are filled in at each refresh
        self._advert = Advert((), 0, 0, (), (), NodeState.ONLINE, 0)
        self._load: LoadReport | None = None
        self._unpersisted: list[SignedEntry] = []
        self._nursery: trio.Nursery | None = None
        self._services = False
        self._changed = trio.Event()
        self._advert_wake = trio.Event()
        self._dial_wake = trio.Event()
        self._persist_wake = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Serve the mesh until cancelled.

        Registers the protocol handlers and admission, restores the state from the store,
        starts the services (if we have an identity) and attempts the bootstrap dials,
        then reports started.

        Cancellation: unsaved accepted entries are written to the store on the way out.
        """
        self.transport.set_admission(self._admits)
        self.transport.set_connection_handler(self._strangers.connected)
        self.transport.set_stream_handler(JOIN_PROTOCOL, self._bounded(JOIN_PROTOCOL, self._on_join),
                                          open_to_all=True)  # fmt: skip
        self.transport.set_stream_handler(
            SYNC_PROTOCOL, self._bounded(SYNC_PROTOCOL, self._on_sync)
        )
        self.transport.set_stream_handler(
            PING_PROTOCOL, self._bounded(PING_PROTOCOL, self._on_ping)
        )
        for protocol, handler in self._app_handlers.items():
            self.transport.set_stream_handler(protocol, handler)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._strangers.run, self.transport.connected_peers,
                                   self._drop_stranger)  # fmt: skip
                if self._store is not None and self._state is not None:
                    store, state, now_ms = self._store, self._state, self._now_ms()
                    await trio.to_thread.run_sync(store.restore, state, now_ms)
                    self._signal(state=True)
                if self.identity is not None:
                    await self._start_services()
                log.info("mesh_node_started", node=short_id(self.node_id),
                         joined=self.identity is not None)  # fmt: skip
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery, self._services = None, False
            if self._store is not None and self._unpersisted:
                self._store.save(self._unpersisted)  # short, synchronous cleanup
                self._unpersisted = []
        raise AssertionError("unreachable: sleep_forever returned")

    async def _start_services(self) -> None:
        assert self._nursery is not None
        if self._services:
            return
        self._services = True
        nursery, repl = self._nursery, self._replicator()
        nursery.start_soon(repl.run_receiver, self.transport.subscribe(repl.topic))
        for loop in (repl.run_sender, self._advert_loop, self._maintenance_loop,
                     self._persist_loop):  # fmt: skip
            nursery.start_soon(loop)
        nursery.start_soon(partial(
            repl.run_anti_entropy, interval_s=self.cfg.anti_entropy_interval_s, rng=self._rng,
            pool=lambda: sorted(set(self._candidates()) | self._sessions.peers()),
            connect=self._connect,
        ))  # fmt: skip
        await self._dial_round()
        nursery.start_soon(self._dial_loop)

    def _mesh(self) -> tuple[MeshIdentity, MeshState]:
        if self.identity is None or self._state is None:
            raise NotJoined("this node has not joined a mesh (join one or create one first)")
        return self.identity, self._state

    def _replicator(self) -> Replicator:
        if self._repl is None:
            (identity, state), cfg = self._mesh(), self.cfg
            self._repl = Replicator(
                key=self.key, transport=self.transport, mesh_id=identity.mesh_id,
                secret=identity.secret, state=state, clock=self._clock,
                verifier=self._verifier, is_known=self._admits, ingest=self._ingest,
                reject=self._reject, wall=self._wall, interval_s=cfg.gossip_interval_s,
                max_bytes=cfg.gossip_max_bytes, chunk_bytes=cfg.sync_chunk_bytes,
                timeout_s=4 * cfg.read_timeout_s,
            )  # fmt: skip
        return self._repl

    # -- admission, ingest, rejections ----------------------------------------------------

    def _now_ms(self) -> int:
        return wall_ms_of(self._wall())

    def _admits(self, peer: bytes) -> bool:
        if self._state is None or self._scores.is_banned(peer, self._wall()):
            return False
        return self._state.is_member(peer, self._now_ms())

    def admits(self, peer: bytes) -> bool:
        """The admission test of every channel: a member (founder included) that is neither
        revoked nor serving a ban. Give it to channels outside the transport (direct)."""
        return self._admits(peer)

    def on_peer_excluded(self, hook: Callable[[bytes], Awaitable[None]]) -> None:
        """Await `hook(peer)` whenever a peer is banned or revoked (after the transport cut
        it off), so channels outside the transport close its streams too."""
        self._exclusion_hooks.append(hook)

    async def _ingest(self, entries: list[SignedEntry], peer: bytes) -> None:
        """Apply entries from `peer` (raises PeerProtocolError on the first invalid one)."""
        assert self._state is not None
        accepted = self._state.apply(entries, self._now_ms())
        if accepted:
            await self._accepted(accepted, local=False)

    async def _accepted(self, entries: list[SignedEntry], *, local: bool) -> None:
        self._signal(state=True)
        self._queue_persist(entries)
        connected = self.transport.connected_peers()
        for e in entries:
            subject = e.slot.key
            if e.slot.kind is SlotKind.REVOKE:
                if subject == self.node_id:
                    log.error("we_were_revoked", by=short_id(e.author))
                else:
                    await self._cut_off(subject, "revoked")
            elif e.slot.kind is SlotKind.MEMBER and not local and subject in connected:
                # rebuild gossipsub streams refused before it was a member (libp2p.py docs)
                await self._cut_off(subject, "membership_changed")
        self._dial_wake.set()

    async def _reject(self, peer: bytes, exc: PeerProtocolError, where: str) -> None:
        reason, penalty = classify_rejection(exc)
        self._rejections[reason] += 1
        log.warning("peer_message_rejected", peer=short_id(peer), where=where, reason=reason,
                    error=str(exc))  # fmt: skip
        if penalty is not None:
            await self._penalise(peer, penalty)
        self._signal()

    async def _penalise(self, peer: bytes, reason: str, weight: float | None = None) -> None:
        ban = self._scores.penalise(peer, reason, weight, now=self._wall())
        if ban is not None:
            self._rejections["ban"] += 1
            await self._cut_off(peer, "banned")

    async def _cut_off(self, peer: bytes, why: str) -> None:
        # Shielded: we may run inside the very session we are about to cancel.
        with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.read_timeout_s):
            try:
                await self.transport.disconnect(peer)
            except (TransportBroken, ClosedError) as exc:
                log.debug("disconnect_failed", peer=short_id(peer), error=str(exc))
            if why in ("banned", "revoked"):
                for hook in self._exclusion_hooks:
                    await hook(peer)
        self._sessions.cancel(peer)
        log.info("peer_cut_off", peer=short_id(peer), why=why)
        self._signal()

    def _signal(self, *, state: bool = False) -> None:
        if state:
            self._generation += 1
            if self._repl is not None:
                self._repl.changed()
        self._changed.set()
        self._changed = trio.Event()

    # -- local writes and persistence -----------------------------------------------

    async def _local_write(self, slot: Slot, payload: Payload) -> SignedEntry:
        entry = self._mesh()[1].local_write(self.key, slot, payload, self._clock, self._wall())
        self._replicator().queue([entry])
        await self._accepted([entry], local=True)
        return entry

    def _queue_persist(self, entries: list[SignedEntry]) -> None:
        if self._store is not None and entries:
            self._unpersisted.extend(entries)
            self._persist_wake.set()

    async def _persist_loop(self) -> None:
        while True:
            await self._persist_wake.wait()
            self._persist_wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write accepted entries not yet in the store (the daemon calls it on shutdown)."""
        if self._store is None or not self._unpersisted:
            return
        batch, self._unpersisted = self._unpersisted, []
        await trio.to_thread.run_sync(self._store.save, batch)

    # -- adverts, load, maintenance -------------------------------------------------------

    def _jitter(self, period: float) -> float:
        return period * (0.8 + 0.4 * self._rng.random())

    async def _advert_loop(self) -> None:
        while True:
            await self._write_advert()
            with trio.move_on_after(self._jitter(self.cfg.advert_refresh_s)):
                await self._advert_wake.wait()
            self._advert_wake = trio.Event()

    async def _write_advert(self) -> None:
        lease_ms = self._now_ms() + round(self.cfg.advert_lease_s * 1000)
        advert = dataclasses.replace(self._advert, addrs=tuple(self.transport.listen_addrs()[:16]),
                                     lease_expires_ms=lease_ms)  # fmt: skip
        await self._local_write(Slot(SlotKind.ADVERT, self.node_id), advert)
        if self._load is not None:
            rtts = tuple((p, rtt * 1000.0) for p, rtt in sorted(self._rtt.rtts().items())[:256])
            load = dataclasses.replace(self._load, rtts=rtts)
            await self._local_write(Slot(SlotKind.LOAD, self.node_id), load)

    async def _maintenance_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.advert_refresh_s)
            assert self._state is not None
            now = trio.current_time()
            self._scores.prune(self._wall())
            self._dial_backoff.prune(now)
            self._failures.prune(now)
            pruned = self._state.prune(self._now_ms())
            if pruned:
                log.debug("state_pruned", entries=pruned)
                self._signal(state=True)
                if self._store is not None:
                    await self.flush()
                    await trio.to_thread.run_sync(self._store.compact, self._state)

    # -- connectivity ---------------------------------------------------------------------

    def add_peer_addrs(self, node_id: bytes, addrs: list[str] | tuple[str, ...]) -> None:
        """Remember addresses for a node (bootstrap config); adverts override them."""
        if node_id != self.node_id:
            self._addrs[node_id] = tuple(addrs)
            self._generation += 1
            self._dial_wake.set()

    def _addrs_of(self, peer: bytes) -> tuple[str, ...]:
        advert = self._state.advert(peer) if self._state is not None else None
        if advert is not None and advert.addrs:
            return advert.addrs
        return self._addrs.get(peer, ())

    def _candidates(self) -> list[bytes]:
        """Members we could dial (known addresses, not banned, not us), sorted.

        Cached per state generation and refresh period: `MeshState.members` is not cheap
        and the dial and anti-entropy loops ask often.
        """
        if self._state is None:
            return []
        key = (self._generation, int(trio.current_time() // self.cfg.advert_refresh_s))
        if self._candidate_cache[0] != key:
            members = set(self._state.members(self._now_ms())) | {self._state.founder}
            found = sorted(m for m in members if m != self.node_id and self._addrs_of(m))
            self._candidate_cache = (key, found)
        return [m for m in self._candidate_cache[1] if not self._scores.is_banned(m, self._wall())]

    async def _connect(self, peer: bytes) -> None:
        if peer in self.transport.connected_peers():
            return
        addrs = self._addrs_of(peer)
        if not addrs:
            raise TransportBroken(f"connect to {short_id(peer)}: no known address")
        await self.transport.connect(peer, list(addrs))

    async def _dial_loop(self) -> None:
        while True:
            with trio.move_on_after(self._jitter(self.cfg.ping_interval_s)):
                await self._dial_wake.wait()
            self._dial_wake = trio.Event()
            await self._dial_round()

    async def _dial_round(self) -> None:
        """Start sessions for connected members; dial more members up to `max_peers`."""
        connected = self.transport.connected_peers()
        now = trio.current_time()
        for peer in connected:
            if self._admits(peer):
                self._strangers.forget(peer)
                self._ensure_session(peer)
            else:
                self._strangers.connected(peer)  # in case the transport's notice was missed
        linked = sum(1 for p in connected if p in self._sessions)
        todo = [p for p in self._candidates() if p not in connected
                and (self._dial_backoff.blocked_until(p) or 0.0) <= now]  # fmt: skip
        self._rng.shuffle(todo)
        async with trio.open_nursery() as nursery:
            for peer in todo[: max(0, self.cfg.max_peers - linked)]:
                nursery.start_soon(self._dial, peer)

    async def _dial(self, peer: bytes) -> None:
        try:
            await self._connect(peer)
        except (TransportBroken, ValueError) as exc:
            penalty = self._dial_backoff.failed(peer, trio.current_time())
            log.debug("dial_failed", peer=short_id(peer), retry_s=penalty, error=str(exc))
            return
        except ClosedError:
            return
        self._dial_backoff.succeeded(peer)
        self._ensure_session(peer)

    def _ensure_session(self, peer: bytes) -> None:
        if self._nursery is not None and self._services:
            self._sessions.start(peer, self._nursery)

    async def _session_ended(self, peer: bytes, error: PeerProtocolError | None) -> None:
        if error is not None:
            await self._reject(peer, error, "session")
        await self._cut_off(peer, "session_ended")
        self._dial_backoff.failed(peer, trio.current_time())
        self._dial_wake.set()

    # -- anti-entropy ---------------------------------------------------------------------

    async def _sync_with(self, peer: bytes) -> None:
        assert self._repl is not None
        await self._connect(peer)
        await self._repl.sync_with(peer)

    async def _on_sync(self, stream: Stream) -> None:
        if self._repl is not None and self._services:
            await self._repl.serve_sync(stream)

    async def _on_ping(self, stream: Stream) -> None:
        self._ensure_session(stream.remote_id)
        await serve_ping(stream, idle_timeout_s=self.cfg.ping_interval_s + self.cfg.read_timeout_s)

    # -- join -----------------------------------------------------------------------------

    def _is_admin(self) -> bool:
        return self._state is not None and self.node_id in self._state.admins(self._now_ms())

    def _get_admitter(self) -> Admitter | None:
        if self.identity is None or self._state is None or not self._is_admin():
            return None
        state, identity = self._state, self.identity
        return self._desk.open_admitter(
            mesh_id=identity.mesh_id, secret=identity.secret, founder=identity.founder,
            issue_cert=self._issue_cert, is_revoked=state.is_revoked,
            is_admin=lambda n: n in state.admins(self._now_ms()),
        )  # fmt: skip

    def _issue_cert(self, node_id: bytes, name: str, roles: tuple[str, ...]) -> bytes:
        (identity, state), now = self._mesh(), self._wall()
        issued = wall_ms_of(now)
        cert = MemberCert(identity.mesh_id, node_id, name or "member", roles, issued,
                          issued + round(self.cfg.cert_ttl_s * 1000), self.node_id)  # fmt: skip
        entry = state.local_write(self.key, Slot(SlotKind.MEMBER, node_id), cert, self._clock, now)
        self._replicator().queue([entry])
        self._queue_persist([entry])
        self._signal(state=True)
        return encode(entry)

    async def _on_join(self, stream: Stream) -> None:
        peer = stream.remote_id
        if self.is_banned(peer):  # bans hold on the one protocol open to non-members too
            self._desk.refuse(peer, "banned", "this node serves a ban")
            raise StreamRefused("banned")
        with self._strangers.joining(peer):
            await self._desk.serve(stream, self._get_admitter())

    async def _drop_stranger(self, peer: bytes) -> None:
        self._rejections["stranger_idle"] += 1
        await self._cut_off(peer, "not_joining")

    def _bounded(self, protocol: str, handler: StreamHandler) -> StreamHandler:
        """`handler` behind the stream slots: a peer over its share of concurrent streams on
        `protocol` (or a non-member over the strangers' pool) is refused, logged, counted."""

        async def bounded(stream: Stream) -> None:
            peer = stream.remote_id
            member = self._admits(peer)
            refused = self._slots.acquire(peer, protocol, member=member)
            if refused is not None:
                self._rejections[refused] += 1
                log.warning("stream_refused", peer=short_id(peer), protocol=protocol,
                            reason=refused)  # fmt: skip
                raise StreamRefused(refused)  # reset unread (frees what the peer sent)
            try:
                await handler(stream)
            finally:
                self._slots.release(peer, protocol, member=member)

        return bounded

    async def create_invite(self, ttl_s: float, uses: int = 1, name: str = "") -> str:
        """Issue an invite token (admins only); bootstrap = our listen addresses.

        Raises:
            AdminRequired: we are not an admin of a mesh.
            ValueError: ttl_s, uses or name out of range.
        """
        if self.identity is None or not self._is_admin():
            raise AdminRequired("create_invite: only an admin of the mesh may invite")
        return await self._desk.create(self.identity.mesh_id, ttl_s, uses, name)

    async def join(self, token: str, name: str) -> MeshIdentity:
        """Join a mesh with an invite token; the node must be running (`run`) and unjoined.

        Runs the handshake with the invite's issuer, stores our certificate, opens the
        mesh secret, reconnects as a member, pulls the state (anti-entropy) and starts
        the mesh services. The caller persists the returned identity.

        Raises:
            AlreadyJoined: we already have an identity.
            JoinRefused: refused by the issuer (`.reason`), or the invite expired.
            TransportBroken: the issuer is unreachable.
            PeerProtocolError: a malformed or forged token or reply.
        """
        if self.identity is not None:
            raise AlreadyJoined(f"join: already a member of mesh {self.identity.mesh_id.hex()}")
        if self._nursery is None:
            raise ClosedError("join: the node is not running (start MeshNode.run first)")
        # Until the first sync brought the issuer's certificate, it is a stranger to us: keep
        # its connection through the handshake and that sync (`StrangerWindow`).
        with self._strangers.joining(parse_invite(token).issuer):
            invite, result, state = await join_handshake(
                self.transport, self.key, token, name, wall=self._wall,
                timeout_s=self.cfg.read_timeout_s, clock=self._clock,
                max_drift_ms=round(self.cfg.max_clock_drift_s * 1000),
                max_lease_ms=round(self.cfg.max_lease_s * 1000),
            )  # fmt: skip
            self._state = state
            self.identity = MeshIdentity(result.mesh_id, result.founder, result.mesh_secret)
            self._addrs[invite.issuer] = result.bootstrap or invite.bootstrap
            self._replicator()
            with trio.move_on_after(self.cfg.read_timeout_s):  # reconnect as a member (above)
                await self.transport.disconnect(invite.issuer)
            try:
                await self._sync_with(invite.issuer)
            except (TransportBroken, ClosedError) as exc:  # the services' anti-entropy retries
                log.warning("join_sync_failed", peer=short_id(invite.issuer), error=str(exc))
        if not state.is_member(self.node_id, self._now_ms()):
            self.identity, self._state, self._repl = None, None, None
            raise JoinRefused(JoinRefusal.NOT_A_MEMBER,
                              "admitted, but our certificate does not verify in the mesh state")  # fmt: skip
        self._queue_persist(state.entries())
        log.info("mesh_joined", mesh=result.mesh_id.hex()[:8], founder=short_id(result.founder))
        await self._start_services()
        self._signal(state=True)
        return self.identity

    async def revoke(self, node_id: bytes, reason: str = "") -> None:
        """Revoke a member forever (admins only); every node then cuts it off.

        Raises:
            AdminRequired: we are not an admin.
            ForbiddenWrite: `node_id` is the founder.
        """
        if self.identity is None or not self._is_admin():
            raise AdminRequired("revoke: only an admin of the mesh may revoke")
        rev = Revocation(self.identity.mesh_id, node_id, reason, self._now_ms())
        await self._local_write(Slot(SlotKind.REVOKE, node_id), rev)

    async def publish_model(self, model_id: str, manifest: PublishedModel) -> None:
        """Write a model manifest slot (admins only).

        Raises:
            AdminRequired: we are not an admin.
        """
        if self.identity is None or not self._is_admin():
            raise AdminRequired("publish_model: only an admin of the mesh may publish models")
        await self._local_write(Slot.model(model_id), manifest)

    def certify_self(self, name: str) -> bool:
        """The founder gives itself a member certificate (roles admin, founder), so that
        peers know its name; False when we are not the founder or already certified."""
        if self.identity is None or self._state is None or self.node_id != self.identity.founder:
            return False
        if self.node_id in self._state.members(self._now_ms()):
            return False
        self._issue_cert(self.node_id, name, ("admin", "founder"))
        return True

    # -- adverts and load (the daemon's side) ---------------------------------------------

    def set_local_advert(
        self, spans: tuple[HostedSpan, ...], free_memory_bytes: int, free_kv_tokens: int,
        codecs: tuple[str, ...], state: NodeState = NodeState.ONLINE, direct_addr: str = "",
        profiles: tuple[SpanProfile, ...] = (), memory_bytes: int = 0,
    ) -> None:  # fmt: skip
        """Set what our advert says; it is re-signed and gossiped now and every refresh.

        Raises:
            ValueError: a value out of range (see `Advert`).
        """
        self._advert = Advert(tuple(spans), free_memory_bytes, free_kv_tokens, tuple(codecs),
                              (), state, 0, direct_addr, tuple(profiles), memory_bytes)  # fmt: skip
        self._advert_wake.set()

    def set_local_load(self, queue_depth: int, utilisation: float,
                       throughput: tuple[tuple[str, int, float], ...] = (),
                       kv_pages: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
        """Set our load; gossiped with the advert, with our measured RTTs merged in.

        Raises:
            ValueError: a value out of range (see `LoadReport`).
        """
        self._load = LoadReport(queue_depth, utilisation, tuple(throughput), (), *kv_pages)

    # -- app streams and misbehaviour -----------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve an application protocol (members only; handler failures are contained).

        A `PeerProtocolError` escaping `handler` also scores the remote peer.
        """
        if protocol in _RESERVED:
            raise ValueError(f"protocol {protocol!r} is reserved by the mesh node")

        async def guarded(stream: Stream) -> None:
            try:
                await handler(stream)
            except PeerProtocolError as exc:
                await self._reject(stream.remote_id, exc, protocol)
                raise

        self._app_handlers[protocol] = self._bounded(protocol, guarded)
        if self._nursery is not None:
            self.transport.set_stream_handler(protocol, self._app_handlers[protocol])

    async def open_stream(self, node_id: bytes, protocol: str) -> Stream:
        """Open an application stream to a member, dialling its advertised addresses.

        Raises:
            TransportBroken: unreachable, or no known address.
            ClosedError: the transport is closed.
        """
        await self._connect(node_id)
        return await self.transport.open_stream(node_id, protocol)

    async def report(self, peer: bytes, reason: str, weight: float | None = None) -> None:
        """Report misbehaviour by `peer` (e.g. "bad_output", "timeout"): scores it (a ban
        disconnects it) and adds a routing backoff penalty.

        A "timeout" (deadline, broken stream) is scored only when `peer` is not already in
        backoff: one outage (a crash, a freeze) fails every session on the host at once,
        and honest hosts have outages, so an outage counts once against the ban threshold;
        each report still counts and lengthens the backoff (docs/architecture.md §2).

        Raises:
            ValueError: a reason without a default weight (`scoring.DEFAULT_WEIGHTS`) and
                no `weight`.
        """
        now = trio.current_time()
        same_outage = reason == "timeout" and self._failures.penalty_s(peer, now) > 0
        if not same_outage:
            await self._penalise(peer, reason, weight)
        self._rejections[reason] += 1
        self._failures.failed(peer, now)

    def report_success(self, peer: bytes) -> None:
        """Clear the peer's routing backoff after a successful request."""
        self._failures.succeeded(peer)

    def is_banned(self, peer: bytes) -> bool:
        """True while `peer` serves a ban."""
        return self._scores.is_banned(peer, self._wall())

    def penalty_s(self, peer: bytes) -> float:
        """Routing penalty for `peer` after reported failures (0.0 when healthy)."""
        return self._failures.penalty_s(peer, trio.current_time())

    def counters(self) -> dict[str, int]:
        """Rejected peer messages and refused streams by reason, plus "ban" and join
        refusals ("join_<reason>", whether the admitter or the join shell refused)."""
        joins = Counter(self._desk.refusals)
        if self._desk.admitter is not None:
            joins.update(self._desk.admitter.counters)
        return dict(self._rejections) | {f"join_{r}": n for r, n in joins.items() if n}

    # -- views ----------------------------------------------------------------------------

    @property
    def state(self) -> MeshState | None:
        """The replicated state (None before joining). Read-only by convention."""
        return self._state

    def members(self) -> dict[bytes, MemberCert]:
        """Current members with a certificate (the founder only if certified)."""
        return {} if self._state is None else self._state.members(self._now_ms())

    def live_adverts(self) -> dict[bytes, Advert]:
        """Adverts of members whose lease has not expired."""
        return {} if self._state is None else self._state.live_adverts(self._now_ms())

    def loads(self) -> dict[bytes, LoadReport]:
        """Newest load report per node."""
        return {} if self._state is None else self._state.loads()

    def models(self) -> dict[str, PublishedModel]:
        """Model manifests by model id."""
        return {} if self._state is None else self._state.models()

    def rtts(self) -> dict[bytes, float]:
        """Smoothed ping RTT per connected peer, in seconds."""
        return self._rtt.rtts()

    def unresponsive(self) -> frozenset[bytes]:
        """Peers whose latest ping missed its deadline."""
        return frozenset(p for p, n in self._rtt.timeouts.items() if n)

    def connected(self) -> frozenset[bytes]:
        """Peers we have a connection to."""
        return self.transport.connected_peers()

    def fingerprint(self) -> bytes:
        """Hash of the state digest (equal on two nodes iff their states are equal)."""
        return b"" if self._state is None else self._state.fingerprint()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, re-checking after every state or peer change."""
        while True:
            changed = self._changed
            if predicate():
                return
            await changed.wait()

    async def wait_changed(self) -> None:
        """Wait for the next state or peer change."""
        await self._changed.wait()

    def status(self) -> NodeStatus:
        """A summary for the status API."""
        return NodeStatus(
            node_id=self.node_id, mesh_id=self.identity.mesh_id if self.identity else None,
            is_admin=self._is_admin(),
            revoked=self._state is not None and self._state.is_revoked(self.node_id),
            members=len(self.members()), live_adverts=len(self.live_adverts()),
            connected=len(self.connected()), sessions=len(self._sessions),
            banned=sum(1 for s in self._scores.snapshot(self._wall()) if s.banned_until),
            pending_gossip=0 if self._repl is None else len(self._repl.outbox),
            rejections=sum(self._rejections.values()),
        )  # fmt: skip

    def __repr__(self) -> str:
        mesh = "-" if self.identity is None else self.identity.mesh_id.hex()[:8]
        return (f"MeshNode(node={short_id(self.node_id)}, mesh={mesh}, "
                f"sessions={len(self._sessions)}, services={self._services})")  # fmt: skip
