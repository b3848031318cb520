"""The daemon's mesh: libp2p transport + MeshNode, and what the rest of the daemon needs of it.

Rule 1: this module is the only place in `nexusd` that knows the mesh's moving parts; the
job engine sees it through `MeshView` (`NodeView` below), the API through four handlers.
Rule 2: our advert always says what `SpanHost` really serves, and our load report what it
really carries (queue depth, KV use); both are refreshed whenever they change.
Rule 3: exec streams from members go to `SpanHost.serve`; a peer that breaks the protocol
is scored by the mesh node (bans included), never trusted further.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

import structlog
import trio

from mesh.closing import close_bounded
from mesh.errors import AdminRequired, AlreadyJoined, JoinRefused, MeshError, PeerProtocolError
from mesh.identity import MeshSecret
from mesh.liveness import BandwidthTable
from mesh.membership import parse_invite
from mesh.node import MeshIdentity, MeshNode
from mesh.routing import HostSpan, Link
from mesh.scoring import DEFAULT_WEIGHTS
from mesh.state import MeshState, NodeState
from mesh.store import StateStore
from mesh.sync import classify_rejection
from mesh.transport.base import Stream, TransportConfig, local_ipv4_addresses

from ..api.records import (
    BottleneckRow,
    InviteReply,
    InviteRequest,
    JoinedReply,
    JoinMeshRequest,
    OkReply,
    PeerRow,
    PeersReply,
    PeersRequest,
    RevokeRequest,
    WaitRequest,
)
from ..api.server import ApiServer, Emit
from ..config import MAX_PROBE_BYTES, Config, MeshConfig
from ..errors import ApiError
from ..exec.hosting import SpanHost, TrainHandler
from ..exec.planner import DEFAULT_COMPUTE_S_PER_ATOM, ExecStream, advertised_compute_s
from ..exec.train_wire import TRAIN_HOST_INBOUND
from ..exec.wire import EXEC_PROTOCOL, HOST_INBOUND, ExecChannel, Signer
from ..metrics import Metrics
from ..paths import NodePaths
from .files import MeshInfo, write_mesh_files
from .placement_service import profile_drifted, span_throughputs, weight_memory_budget

if TYPE_CHECKING:
    from mesh.transport.direct import DirectListener

log = structlog.get_logger(__name__)
CODECS = ("raw", "fp16", "bf16", "int8")
PROBE_PROTOCOL = "/nexus/probe/1"
UNPROBED_BANDWIDTH = 12.5e6  # bytes/s assumed until a probe measured it (100 Mbit/s)


def transport_config(cfg: Config) -> TransportConfig:
    m = cfg.mesh
    return TransportConfig(
        max_frame_bytes=m.max_frame_bytes,
        read_timeout_s=m.read_timeout_s,
        write_timeout_s=m.write_timeout_s,
        connect_timeout_s=m.connect_timeout_s,
        gossip_heartbeat_s=m.gossip_heartbeat_s,
    )


def advertise_hosts(m: MeshConfig) -> tuple[str, ...]:
    """The IPv4 addresses peers can dial us at: `listen_host`, or when that is 0.0.0.0,
    `advertise_host`, else this machine's interface addresses (warned: a multi-homed
    machine may prefer one). Never 0.0.0.0 itself: nobody can dial it."""
    if m.listen_host != "0.0.0.0":
        return (m.listen_host,)
    if m.advertise_host:
        return (m.advertise_host,)
    hosts = tuple(local_ipv4_addresses()) or ("127.0.0.1",)
    log.warning(
        "advertising_interface_addresses",
        listen_host=m.listen_host,
        advertised=list(hosts),
        hint="set mesh.advertise_host to pick the one peers should dial",
    )
    return hosts


class MeshService:
    """Owns the transport and the mesh node of the daemon."""

    def __init__(
        self,
        cfg: Config,
        paths: NodePaths,
        signer: Signer,
        host: SpanHost,
        metrics: Metrics,
        verifier_factory: object,
        name: str,
        trainer: TrainHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.paths = paths
        self.signer = signer
        self.host = host
        self.metrics = metrics
        self.name = name
        self.node: MeshNode | None = None
        self._verifier = verifier_factory
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self.direct_addr = ""  # "host:port" of our direct listener once it listens
        self.direct: DirectListener | None = None
        self.advertised: tuple[str, ...] = ()  # hosts in our addresses (never 0.0.0.0)
        self.tcfg: TransportConfig | None = None
        self.bandwidth = BandwidthTable()  # bytes/s per peer, from timed probes
        # peer -> the lease of the advert under which no exec stream could be opened to it:
        # routes leave it out until it advertises again (a new lease: it is back)
        self.unreachable: dict[bytes, int] = {}
        self.stream_handlers: dict[str, Callable[[Stream], Awaitable[None]]] = {}  # e.g. weights
        self.manifest_of: Callable[[str], bytes] = lambda _model: b""  # digest we serve/route
        self.swarm_report: Callable[[], tuple[BottleneckRow, ...]] = tuple  # set by the daemon
        self.auto_spans: set[tuple[str, int, int]] = set()  # placed by the placement service
        self._advertised: dict[str, float] = {}  # model -> s/atom in our advert

    def __repr__(self) -> str:
        return f"MeshService(node={self.node!r})"

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        from mesh.transport.libp2p import open_libp2p_transport  # import cost only in daemons

        key = self.signer.key
        m = self.cfg.mesh
        tcfg = transport_config(self.cfg)
        self.advertised = advertise_hosts(m)
        async with (
            open_libp2p_transport(
                key.seed,
                m.listen_port,
                tcfg,
                listen_host=m.listen_host,
                advertise_hosts=self.advertised,
            ) as transport,
            self._open_state() as (identity, state, store),
        ):
            node = MeshNode(
                key=key,
                transport=transport,
                identity=identity,
                state=state,
                store=store,
                cfg=self.cfg.mesh.node_config(),
                rng=random.Random(),
                invites_path=self.paths.data_dir / "invites.json",
            )
            node.set_stream_handler(EXEC_PROTOCOL, self._serve_exec)
            node.set_stream_handler(PROBE_PROTOCOL, self._serve_probe)
            for protocol, handler in self.stream_handlers.items():
                node.set_stream_handler(protocol, handler)
            self.node = node
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(node.run)
                if node.certify_self(self.name):
                    log.info("founder_certified", name=self.name)
                self.tcfg = tcfg
                if m.direct_enabled:
                    await nursery.start(self._run_direct, tcfg)
                for addr in m.bootstrap:
                    nursery.start_soon(self._dial_bootstrap, addr)
                self.refresh_advert()
                nursery.start_soon(self._publish_load)
                nursery.start_soon(self._probe_loop)
                log.info("mesh_listening", addrs=transport.listen_addrs())
                self._ready.set()
                task_status.started()
                await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def _open_state(
        self,
    ) -> AsyncIterator[tuple[MeshIdentity | None, MeshState | None, StateStore | None]]:
        info = MeshInfo.load(self.paths.mesh_file)
        store = StateStore(self.paths.state_db)
        try:
            if info is None:
                yield None, None, store
                return
            secret = MeshSecret.from_bytes(self.paths.mesh_secret.read_bytes())
            identity = MeshIdentity(
                bytes.fromhex(info.mesh_id), bytes.fromhex(info.founder), secret
            )
            state = MeshState(
                mesh_id=identity.mesh_id,
                founder=identity.founder,
                max_drift_ms=round(self.cfg.mesh.max_clock_drift_s * 1000),
                max_lease_ms=round(max(600.0, self.cfg.mesh.advert_lease_s) * 1000),
            )
            yield identity, state, store
        finally:
            store.close()

    async def _dial_bootstrap(self, addr: str) -> None:
        node = self.node
        assert node is not None
        try:
            node_id = peer_node_id(addr)
            node.add_peer_addrs(node_id, [addr])
            with trio.fail_after(self.cfg.mesh.connect_timeout_s):
                await node.transport.connect(node_id, [addr])
        except (MeshError, ValueError, trio.TooSlowError) as exc:
            log.warning("bootstrap_dial_failed", addr=addr, reason=str(exc))

    async def _run_direct(
        self,
        tcfg: TransportConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from mesh.transport.direct import open_direct_listener

        m = self.cfg.mesh
        # `is_member` is the listener's whole admission: members only, and not while banned
        # (or revoked); a peer cut off later loses its open streams too.
        async with open_direct_listener(
            self.signer.key,
            m.listen_host,
            m.direct_port,
            tcfg,
            self.is_member,
            self._serve_exec_direct,
        ) as listener:
            self.direct = listener
            if self.node is not None:
                self.node.on_peer_excluded(self._close_direct)
            self.direct_addr = f"{self.advertised[0]}:{listener.port}"
            log.info("direct_listening", addr=self.direct_addr)
            self.refresh_advert()
            task_status.started()
            await trio.sleep_forever()

    async def _close_direct(self, peer: bytes) -> None:
        if self.direct is not None:
            await self.direct.disconnect(peer)

    async def open_exec_stream(self, peer: bytes) -> Stream:
        """A stream for activations to `peer`: its direct channel if it advertises one and
        it answers, else a libp2p stream."""
        node = self.node
        if node is None:
            raise ApiError("unavailable", "the mesh is not running")
        advert = node.live_adverts().get(peer)
        if advert is not None and advert.direct_addr and self.tcfg is not None:
            from mesh.transport.direct import connect_direct

            host, _, port = advert.direct_addr.rpartition(":")
            try:
                return await connect_direct(
                    self.signer.key, (host, int(port)), peer, self.tcfg, is_member=self.is_member
                )
            except (MeshError, ValueError, OSError) as exc:
                log.warning("direct_dial_failed", peer=peer.hex()[:8], reason=str(exc))
                self.metrics.inc("direct_dial_failures_total")
        try:
            return await node.open_stream(peer, EXEC_PROTOCOL)
        except MeshError as exc:  # neither way in: routes skip it until it re-advertises
            if advert is not None:
                self.mark_unreachable(peer, advert.lease_expires_ms, str(exc))
            raise

    def mark_unreachable(self, peer: bytes, lease_ms: int, reason: str) -> None:
        """Leave `peer` out of routes while its advert is the one of lease `lease_ms`."""
        if self.unreachable.get(peer) != lease_ms:
            self.unreachable[peer] = lease_ms
            log.info("peer_unreachable", peer=peer.hex()[:8], reason=reason[:200])
            self.metrics.inc("exec_unreachable_peers_total")

    async def _serve_exec_direct(self, stream: Stream) -> None:
        """Exec over the direct channel; a peer breaking the protocol is scored, as on libp2p
        (where the mesh node's handler wrapper does it)."""
        try:
            await self._serve_exec(stream)
        except PeerProtocolError as exc:
            reason, penalty = classify_rejection(exc)
            log.warning(
                "exec_peer_misbehaved",
                peer=stream.remote_id.hex()[:8],
                error=type(exc).__name__,
                reason=reason,
                detail=str(exc),
            )
            self.metrics.inc("exec_rejections_total", reason=reason, channel="direct")
            if self.node is not None and penalty is not None:
                await self.node.report(stream.remote_id, penalty)

    async def _serve_exec(self, stream: Stream) -> None:
        node = self.node
        assert node is not None
        channel = ExecChannel(
            stream,
            self.signer,
            self._verifier,  # type: ignore[arg-type]
            self.is_member,
            (*HOST_INBOUND, *TRAIN_HOST_INBOUND),
        )
        try:
            await self.host.serve(
                channel, idle_timeout_s=self.cfg.atoms.session_idle_s, train=self.trainer
            )
        finally:
            self.refresh_load()
            await close_bounded(stream.aclose)

    # ---- bandwidth probes ------------------------------------------------------------------

    async def _serve_probe(self, stream: Stream) -> None:
        try:
            payload = await stream.receive(
                timeout_s=self.cfg.mesh.read_timeout_s, max_bytes=MAX_PROBE_BYTES
            )
            await stream.send(len(payload).to_bytes(8, "big"))
        finally:
            await close_bounded(stream.aclose)

    async def probe(self, peer: bytes) -> float | None:
        """Time one probe frame to `peer`; update and return its bandwidth (bytes/s)."""
        node = self.node
        if node is None:
            return None
        size = self.cfg.mesh.bandwidth_probe_bytes
        try:
            with trio.fail_after(self.cfg.mesh.read_timeout_s):
                stream = await node.open_stream(peer, PROBE_PROTOCOL)
                try:
                    t0 = time.perf_counter()
                    await stream.send(bytes(size))
                    ack = await stream.receive(max_bytes=8)
                    elapsed = time.perf_counter() - t0
                finally:
                    await close_bounded(stream.aclose)
        except (MeshError, trio.TooSlowError) as exc:
            log.debug("bandwidth_probe_failed", peer=peer.hex()[:8], reason=str(exc))
            return None
        if int.from_bytes(ack, "big") != size:
            return None
        bw = self.bandwidth.observe(peer, size=size, elapsed_s=elapsed, rtt_s=node.rtts().get(peer))
        self.metrics.set("peer_bandwidth_bytes_per_s", bw, peer=peer.hex()[:8])
        return bw

    async def _probe_loop(self) -> None:
        """Probe new members at once and every member each interval."""
        node = self.node
        assert node is not None
        last: dict[bytes, float] = {}
        interval = self.cfg.mesh.bandwidth_probe_interval_s
        while True:
            now = trio.current_time()
            for peer in sorted(node.connected()):
                if self.is_member(peer) and now - last.get(peer, -interval) >= interval:
                    last[peer] = now
                    await self.probe(peer)
            with trio.move_on_after(min(interval, 1.0)):  # re-check for new members
                await node.wait_changed()

    # ---- adverts and load ----------------------------------------------------------------

    def refresh_advert(self, state: NodeState = NodeState.ONLINE) -> None:
        if self.node is None:
            return
        spans = tuple(replace(h, manifest=self.manifest_of(h.model_id)) for h in self.host.hosted())
        free_kv = self.host.kv_free_bytes  # the KV pool's free pages
        profiles = tuple(self.host.profiles(frozenset(self.auto_spans)))
        self._advertised = {p.model_id: p.compute_s_per_atom for p in profiles}
        self.node.set_local_advert(
            spans,
            free_kv,
            free_kv_tokens(free_kv, self.host),
            CODECS,
            state,
            direct_addr=self.direct_addr,
            profiles=profiles,
            memory_bytes=weight_memory_budget(self.cfg.atoms),
        )
        self.refresh_load()

    def refresh_load(self) -> None:
        if self.node is None:
            return
        self.node.set_local_load(
            self.host.load.peak_queue(),
            self.host.load.utilisation(),
            span_throughputs(self.host.profiles()),
            kv_pages=self.host.kv_pages(),
        )
        self._export_mesh_metrics(self.node)

    def _export_mesh_metrics(self, node: MeshNode) -> None:
        for reason, n in node.counters().items():
            self.metrics.set_total("mesh_rejections_total", n, reason=reason)
        if self.direct is not None:
            for reason, n in self.direct.refusals.items():
                self.metrics.set_total("direct_refusals_total", n, reason=reason)
        st = node.status()
        self.metrics.set("mesh_members", st.members)
        self.metrics.set("mesh_peers_connected", st.connected)
        self.metrics.set("mesh_peers_banned", st.banned)
        self.metrics.set("mesh_live_adverts", st.live_adverts)

    async def _publish_load(self) -> None:
        while True:  # periodic: load changes continuously, adverts carry it every refresh
            if profile_drifted(self._advertised, self.host.profiles()):
                self.refresh_advert()  # the measured speed moved: re-advertise it now
            self.refresh_load()
            await trio.sleep(self.cfg.mesh.advert_refresh_s / 2)

    # ---- the view the job engine routes with -----------------------------------------------

    def is_member(self, node_id: bytes) -> bool:
        """Whether `node_id` may talk to us on any channel: a member (the founder included),
        not revoked, not serving a ban (`MeshNode.admits`); before joining, only ourselves."""
        node = self.node
        if node is None or node.state is None:
            return node_id == self.signer.key.node_id
        return node_id == self.signer.key.node_id or node.admits(node_id)

    async def wait_ready(self) -> None:
        await self._ready.wait()


class NodeView:
    """`MeshView` over the mesh service (our own spans included, from `SpanHost`)."""

    def __init__(self, service: MeshService) -> None:
        self._svc = service
        self.node_id: bytes = bytes(service.signer.key.node_id)

    def host_spans(self, model_id: str) -> list[HostSpan]:
        svc = self._svc
        want = svc.manifest_of(model_id)
        util = svc.host.load.utilisation()
        queue = svc.host.load.peak_queue()
        own_compute = svc.host.profile.get(model_id) or DEFAULT_COMPUTE_S_PER_ATOM
        out = [
            HostSpan(
                self.node_id,
                h.model_id,
                h.start,
                h.end,
                own_compute,
                queue,
                util,
                1 << 30,
            )
            for h in svc.host.hosted()
            if h.model_id == model_id
        ]
        node = svc.node
        if node is None:
            return out
        loads = node.loads()
        unreachable = self._svc.unreachable
        for peer, advert in sorted(node.live_adverts().items()):
            if peer == self.node_id or node.is_banned(peer) or not self._svc.is_member(peer):
                continue
            if advert.state is not NodeState.ONLINE:
                continue
            if peer in unreachable:  # could not be reached under this very advert
                if unreachable[peer] == advert.lease_expires_ms:
                    continue
                del unreachable[peer]  # it advertised since: try it again
            load = loads.get(peer)
            for s in advert.spans:  # only hosts of our manifest: versions never chain
                if s.model_id == model_id and s.manifest == want:
                    out.append(
                        HostSpan(
                            peer,
                            s.model_id,
                            s.start,
                            s.end,
                            advertised_compute_s(advert.profiles, model_id, s.start),
                            load.queue_depth if load else 0,
                            min(1.0, load.utilisation) if load else 0.0,
                            advert.free_kv_tokens,
                            node.penalty_s(peer),
                        )
                    )
        return out

    def links(self) -> list[Link]:
        node = self._svc.node
        if node is None:
            return []
        bandwidth = self._svc.bandwidth
        return [
            Link(self.node_id, peer, rtt, bandwidth.get(peer, UNPROBED_BANDWIDTH))
            for peer, rtt in sorted(node.rtts().items())
            if peer != self.node_id
        ]

    def name_of(self, node_id: bytes) -> str:
        if node_id == self.node_id:
            return self._svc.name
        node = self._svc.node
        cert = node.members().get(node_id) if node is not None else None
        return cert.name if cert is not None else node_id.hex()[:8]

    def is_member(self, node_id: bytes) -> bool:
        return self._svc.is_member(node_id)

    async def open_exec_stream(self, node_id: bytes) -> ExecStream:
        return await self._svc.open_exec_stream(node_id)

    def report(self, node_id: bytes, penalty: str) -> None:
        """Score a host that failed a hop: `penalty` is the session's verdict ("bad_output",
        "malformed", "timeout", ...; anything without a weight counts as "timeout").
        "unreachable" (its stream broke) also leaves it out of routes until it advertises
        again, as a failed open does."""
        svc = self._svc
        if penalty == "unreachable" and svc.node is not None:
            advert = svc.node.live_adverts().get(node_id)
            if advert is not None:
                svc.mark_unreachable(node_id, advert.lease_expires_ms, "its exec stream broke")
        if svc.node is not None and svc._nursery is not None:
            known = penalty in DEFAULT_WEIGHTS
            svc._nursery.start_soon(svc.node.report, node_id, penalty if known else "timeout")


#: Advertised free KV tokens of a node whose spans keep no KV cache (no token costs memory).
UNBOUNDED_KV_TOKENS = 2**31 - 1


def free_kv_tokens(free_bytes: int, host: SpanHost) -> int:
    """How many tokens of KV cache one session can still get here: free bytes over what a
    token costs across the most demanding hosted span (from its atoms' KV layouts)."""
    per_token = host.kv_bytes_per_token()
    return free_bytes // per_token if per_token else UNBOUNDED_KV_TOKENS


def _util(node: MeshNode, target: bytes) -> float:
    load = node.loads().get(target)
    return load.utilisation if load is not None else 0.0


def peer_node_id(addr: str) -> bytes:
    from mesh.transport.libp2p import node_id_of

    if "/p2p/" not in addr:
        raise ValueError(f"bootstrap address {addr!r} lacks /p2p/<peer id>")
    return node_id_of(addr.rsplit("/p2p/", 1)[1])


# ---- API handlers --------------------------------------------------------------------------


class MeshApi:
    """invite / join / revoke / peers on the local socket."""

    def __init__(self, svc: MeshService, paths: NodePaths, on_joined: object) -> None:
        self._svc = svc
        self._paths = paths
        self._on_joined = on_joined

    def register(self, api: ApiServer) -> None:
        api.route(InviteRequest, self._invite)
        api.route(JoinMeshRequest, self._join)
        api.route(RevokeRequest, self._revoke)
        api.route(PeersRequest, self._peers)
        api.route(WaitRequest, self._wait)

    def _node(self) -> MeshNode:
        node = self._svc.node
        if node is None:
            raise ApiError("unavailable", "the mesh transport is not running yet")
        return node

    async def _invite(self, req: InviteRequest, _emit: Emit) -> InviteReply:
        node = self._node()
        if not 60 <= req.ttl_s <= 30 * 86400 or not 1 <= req.uses <= 1000:
            raise ApiError(
                "bad_request",
                f"ttl 60 s..30 days and uses 1..1000 expected, got {req.ttl_s} s and {req.uses}",
            )
        try:
            token = await node.create_invite(req.ttl_s, req.uses, req.name)
        except AdminRequired as exc:
            raise ApiError("refused", str(exc)) from None
        except ValueError as exc:
            raise ApiError("bad_request", str(exc)) from None
        invite = parse_invite(token)
        return InviteReply(token, req.ttl_s, req.uses, invite.bootstrap)

    async def _join(self, req: JoinMeshRequest, _emit: Emit) -> JoinedReply:
        node = self._node()
        try:
            identity = await node.join(req.token.strip(), req.name or self._svc.name)
        except AlreadyJoined as exc:
            raise ApiError("conflict", str(exc)) from None
        except JoinRefused as exc:
            raise ApiError("refused", f"join refused: {exc.reason.value}: {exc.detail}") from None
        except (PeerProtocolError, ValueError) as exc:  # a bad token, or addresses in it
            raise ApiError("bad_request", f"invalid invite: {exc}") from None
        except (MeshError, trio.TooSlowError) as exc:
            raise ApiError("unavailable", f"cannot reach the inviting node: {exc}") from None
        write_mesh_files(
            self._paths, identity.mesh_id.hex(), identity.founder.hex(), identity.secret.raw
        )
        self._svc.refresh_advert()
        self._on_joined()  # type: ignore[operator]
        return JoinedReply(identity.mesh_id.hex(), identity.founder.hex(), len(node.members()))

    async def _revoke(self, req: RevokeRequest, _emit: Emit) -> OkReply:
        node = self._node()
        target = self._resolve(node, req.node)
        try:
            await node.revoke(target, req.reason)
        except AdminRequired as exc:
            raise ApiError("refused", str(exc)) from None
        except PeerProtocolError as exc:
            raise ApiError("refused", str(exc)) from None
        return OkReply(f"revoked {target.hex()[:16]}")

    def _resolve(self, node: MeshNode, text: str) -> bytes:
        text = text.lower().strip()
        if len(text) < 8:
            raise ApiError("bad_request", f"node id: give at least 8 hex chars, got {text!r}")
        known = set(node.members()) | set(node.live_adverts())
        matches = [n for n in known if n.hex().startswith(text)]
        if len(matches) != 1:
            raise ApiError(
                "not_found" if not matches else "bad_request",
                f"node id prefix {text!r} matches {len(matches)} members",
            )
        return matches[0]

    async def _peers(self, req: PeersRequest, _emit: Emit) -> PeersReply:
        node = self._node()
        if req.wait_hosts > 0:

            def enough() -> bool:
                adverts = node.live_adverts()
                hosting = [
                    a
                    for a in adverts.values()
                    if any(not req.model or s.model_id == req.model for s in a.spans)
                ]
                return len(hosting) >= req.wait_hosts

            with trio.move_on_after(max(0.0, min(req.timeout_s, 600.0))):
                await node.wait_for(enough)
        return PeersReply(
            node.identity.mesh_id.hex() if node.identity else "",
            self._rows(node),
            tuple(sorted(node.counters().items())),
            self._svc.swarm_report(),
        )

    async def _wait(self, req: WaitRequest, _emit: Emit) -> PeersReply:
        node = self._node()
        try:
            target = (
                bytes.fromhex(req.node) if len(req.node) == 64 else self._resolve(node, req.node)
            )
        except ValueError:
            raise ApiError(
                "bad_request", f"node: expected a hex node id, got {req.node!r}"
            ) from None
        now_ms = lambda: int(time.time() * 1000)  # noqa: E731
        probes_before = self._svc.bandwidth.probes.get(target, 0)
        checks = {
            "busy": lambda: _util(node, target) >= req.threshold,
            "idle": lambda: _util(node, target) < req.threshold,
            "no_advert": lambda: target not in node.live_adverts(),
            "advert": lambda: target in node.live_adverts(),
            "member": lambda: node.state is not None and node.state.is_member(target, now_ms()),
            "not_member": lambda: node.state is None or not node.state.is_member(target, now_ms()),
            "connected": lambda: target in node.connected(),
            "disconnected": lambda: target not in node.connected(),
            "probed": lambda: self._svc.bandwidth.probes.get(target, 0) > probes_before,
        }
        if req.condition not in checks:
            raise ApiError(
                "bad_request", f"condition: expected one of {sorted(checks)}, got {req.condition!r}"
            )
        predicate = checks[req.condition]
        with trio.move_on_after(max(0.0, min(req.timeout_s, 600.0))) as scope:
            while not predicate():  # lease expiry changes nothing: re-check at least each second
                with trio.move_on_after(1.0):
                    await node.wait_changed()
        if scope.cancelled_caught:
            raise ApiError(
                "unavailable",
                f"condition {req.condition} on {target.hex()[:8]} "
                f"did not hold within {req.timeout_s} s",
            )
        return PeersReply(
            node.identity.mesh_id.hex() if node.identity else "",
            self._rows(node),
            tuple(sorted(node.counters().items())),
        )

    def _rows(self, node: MeshNode) -> tuple[PeerRow, ...]:
        now_ms = int(time.time() * 1000)
        members = node.members()
        adverts = node.live_adverts()
        loads = node.loads()
        rtts = node.rtts()
        connected = node.connected()
        rows = []
        for nid in sorted(set(members) | set(adverts)):
            cert, adv, load = members.get(nid), adverts.get(nid), loads.get(nid)
            rows.append(
                PeerRow(
                    node_id=nid.hex(),
                    name=cert.name if cert else "",
                    roles=tuple(cert.roles) if cert else (),
                    is_self=nid == node.node_id,
                    connected=nid in connected,
                    state=adv.state.name.lower() if adv else "no-advert",
                    rtt_ms=round(rtts[nid] * 1000, 3) if nid in rtts else -1.0,
                    hosted=tuple(f"{s.model_id}:{s.start}-{s.end}" for s in adv.spans)
                    if adv
                    else (),
                    lease_left_s=round(max(0.0, (adv.lease_expires_ms - now_ms) / 1000), 1)
                    if adv
                    else 0.0,
                    queue_depth=load.queue_depth if load else 0,
                    banned=node.is_banned(nid),
                    utilisation=round(load.utilisation, 3) if load else 0.0,
                    bandwidth_mb_per_s=round(self._svc.bandwidth[nid] / 1e6, 3)
                    if nid in self._svc.bandwidth
                    else -1.0,
                    kv_pages_used=load.kv_pages_used if load else -1,
                    kv_pages_total=load.kv_pages_total if load else -1,
                )
            )
        return tuple(rows)
