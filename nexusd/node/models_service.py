"""The mesh's models: manifests published in the replicated state, files fetched from peers.

Rule 1: an admin publishes a model's manifest (`PublishedModel`: id, version, architecture,
per-atom weight digests, tokenizer and manifest digests, parent) when it imports, trains or
compresses one; the version goes up by one whenever the id's manifest digest changes.
Rule 2: a node that lacks a model the mesh has fetches its `manifest.json` (by the
published, admin-signed digest) and `tokenizer.json` (by the digest in that manifest) from
peers: enough to drive jobs. The weights of a span come only when it hosts one
(`fetch_span`, the one entry point: placement calls it too).
Rule 3: everything fetched is verified against a digest it was named by before it is used;
a peer that sent bytes that do not match is refused and scored ("bad_weights"). Weight
files land sealed at rest (`nexusd.model_files`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import trio

from atoms.errors import WeightsError
from atoms.model import MANIFEST_FILE, TOKENIZER_FILE, WEIGHTS_DIR
from atoms.partition import ModelManifest
from atoms.weights import SUFFIX
from mesh.blobs import BlobUnavailable, blob_size, download, piece_range, serve_blobs
from mesh.errors import AdminRequired, MeshError
from mesh.node import MeshNode
from mesh.state import HostedSpan, PublishedAtom, PublishedModel
from mesh.transport.base import Stream

from ..api.records import ModelRow, ModelsReply, ModelsRequest, OkReply, PublishModelRequest
from ..api.server import ApiServer, Emit
from ..config import Config
from ..errors import ApiError
from ..metrics import Metrics
from ..model_files import PartSink, WeightFiles, blake2b_hex, has_weights, resolve_blob
from ..model_registry import BUILTINS, ModelRegistry

if TYPE_CHECKING:
    from ..jobs.service import JobService
    from .mesh_service import MeshService

log = structlog.get_logger(__name__)

WEIGHTS_PROTOCOL = "/nexus/weights/1"
MAX_SMALL_BLOB = 64 << 20  # manifest and tokenizer files: refused above this
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True, slots=True)
class _MemorySink:
    """A small blob (manifest, tokenizer) downloaded into memory."""

    digest: str
    pieces: dict[int, bytes]
    out: list[bytes]

    def stored(self) -> set[int]:
        return set(self.pieces)

    def write(self, index: int, data: bytes) -> None:
        self.pieces[index] = data

    def _joined(self) -> bytes:
        return b"".join(self.pieces[i] for i in sorted(self.pieces))

    def verify(self) -> bool:
        return blake2b_hex(self._joined()) == self.digest

    def discard(self) -> None:
        self.pieces.clear()

    def commit(self) -> None:
        self.out.append(self._joined())


def published_of(m: ModelManifest, version: int) -> PublishedModel:
    """The mesh-state record of a local manifest."""
    config = dict(m.config)
    parent = config.get("head_of") or config.get("parent") or config.get("source_model") or ""
    return PublishedModel(
        family=m.family,
        config_json=json.dumps(config, sort_keys=True, separators=(",", ":")),
        atoms=tuple(
            PublishedAtom(e.index, e.kind.value, bytes.fromhex(e.digest), e.nbytes) for e in m.atoms
        ),
        model_id=m.model_id,
        version=version,
        manifest_digest=bytes.fromhex(m.digest),
        tokenizer_digest=bytes.fromhex(m.tokenizer.digest) if m.tokenizer else b"",
        parent=str(parent)[:128],
    )


class ModelsService:
    """Publishes this node's models and fetches the mesh's (see the module rules)."""

    def __init__(
        self,
        cfg: Config,
        registry: ModelRegistry,
        files: WeightFiles,
        metrics: Metrics,
        node: Callable[[], MeshNode | None],
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.files = files
        self.metrics = metrics
        self._node = node
        self._fetching: dict[str, trio.Lock] = {}

    def __repr__(self) -> str:
        return f"ModelsService({self.registry.models_dir})"

    def node(self) -> MeshNode:
        node = self._node()
        if node is None or node.state is None:
            raise ApiError("unavailable", "this node is in no mesh: it can fetch no model")
        return node

    # ---- serving ---------------------------------------------------------------------------

    async def serve(self, stream: Stream) -> None:
        """The /nexus/weights/1 handler: blobs by digest (`nexusd.model_files.resolve_blob`)."""

        def resolve(digest: bytes) -> object:
            source = resolve_blob(self.registry, self.files, digest)
            self.metrics.inc("blob_requests_total", outcome="ok" if source else "not_found")
            return source

        await serve_blobs(
            stream,
            resolve,  # type: ignore[arg-type]
            idle_timeout_s=self.cfg.mesh.read_timeout_s,
        )

    async def _open(self, peer: bytes) -> Stream:
        return await self.node().open_stream(peer, WEIGHTS_PROTOCOL)

    async def _blame(self, peer: bytes, reason: str) -> None:
        penalty = "bad_weights" if reason == "bad_content" else "malformed"
        log.warning("weights_peer_refused", peer=peer.hex()[:8], reason=penalty)
        self.metrics.inc("weights_refused_total", reason=penalty)
        await self.node().report(peer, penalty)

    # ---- publishing ------------------------------------------------------------------------

    async def publish(self, model_id: str) -> PublishedModel | None:
        """Publish the local model `model_id` (admins only; None when not an admin or
        already published with this digest)."""
        node = self.node()
        m = await trio.to_thread.run_sync(self.registry.manifest, model_id)
        old = node.models().get(model_id)
        if old is not None and old.manifest_digest == bytes.fromhex(m.digest):
            return None
        rec = published_of(m, (old.version if old else 0) + 1)
        try:
            await node.publish_model(model_id, rec)
        except AdminRequired as exc:
            log.info("model_not_published", model=model_id, reason=str(exc))
            return None
        log.info("model_published", model=model_id, version=rec.version, digest=m.digest[:12])
        return rec

    async def publish_all(self) -> None:
        """Publish every local model that is not built in (at start and after joining)."""
        for model_id in sorted(set(self.registry.available()) - set(BUILTINS)):
            try:
                if self.registry.manifest(model_id) and self._has_all(model_id):
                    await self.publish(model_id)
            except (ApiError, MeshError, OSError, ValueError) as exc:
                log.warning("model_publish_failed", model=model_id, reason=str(exc))

    def _has_all(self, model_id: str) -> bool:
        folder = self.registry.models_dir / model_id
        return all(has_weights(folder, e.digest) for e in self.registry.manifest(model_id).atoms)

    def mesh_models(self) -> dict[str, PublishedModel]:
        node = self._node()
        return {} if node is None or node.state is None else node.models()

    # ---- fetching --------------------------------------------------------------------------

    def _peers_for(self, model_id: str, manifest: bytes, atom: int | None) -> list[bytes]:
        """Members to ask: hosts advertising the atom (or the model) of this manifest first,
        then every other connected member."""
        node = self.node()
        me = node.node_id
        first: list[bytes] = []
        for peer, advert in sorted(node.live_adverts().items()):
            if peer == me or node.is_banned(peer) or not node.admits(peer):
                continue
            if any(_holds(s, model_id, manifest, atom) for s in advert.spans):
                first.append(peer)
        rest = [
            p
            for p in sorted(node.connected())
            if p != me and p not in first and node.admits(p) and not node.is_banned(p)
        ]
        return first + rest

    async def _small_blob(self, digest: bytes, peers: list[bytes]) -> bytes:
        timeout = self.cfg.mesh.read_timeout_s
        for peer in peers:
            size = await blob_size(self._open, peer, digest, timeout)
            if size is None:
                continue
            if size > MAX_SMALL_BLOB:
                await self._blame(peer, "malformed")
                continue
            out: list[bytes] = []
            sink = _MemorySink(digest.hex(), {}, out)
            try:
                await download(
                    digest, size, sink, [peer], self._open, timeout_s=timeout,
                    on_bad_peer=self._blame,
                )  # fmt: skip
            except BlobUnavailable:
                continue
            return out[0]
        raise ApiError("unavailable", f"no peer could send blob {digest.hex()[:16]}")

    async def ensure_model(self, model_id: str) -> None:
        """Make the mesh's model `model_id` known here (manifest and tokenizer, no weights)
        if this node lacks it, or holds only an older fetched manifest of it (no weights:
        it follows the mesh's newest version); a no-op for built-in models, models with
        weights here, or outside a mesh."""
        if model_id in BUILTINS:
            return
        node = self._node()
        pub = None if node is None or node.state is None else node.models().get(model_id)
        if pub is None or not pub.manifest_digest:
            return  # unknown in the mesh: the local folder (or the registry's not_found)
        if not self._stale(model_id, pub):
            return
        async with self._lock(model_id):
            if not self._stale(model_id, pub):
                return
            peers = self._peers_for(model_id, pub.manifest_digest, None)
            raw = await self._small_blob(pub.manifest_digest, peers)
            manifest = ModelManifest.from_json(raw.decode())
            if manifest.model_id != model_id:
                raise ApiError("failed", f"the mesh's manifest of {model_id} names another id")
            tokenizer = None
            if manifest.tokenizer is not None:
                tokenizer = await self._small_blob(bytes.fromhex(manifest.tokenizer.digest), peers)
            await trio.to_thread.run_sync(self._write_folder, model_id, raw, tokenizer)
            self.metrics.inc("models_fetched_total")
            log.info("model_fetched", model=model_id, version=pub.version, digest=manifest.digest)

    def _stale(self, model_id: str, pub: PublishedModel) -> bool:
        """True if we lack the model, or hold only a manifest (no weight file) of another
        version than the published one."""
        if model_id not in self.registry.available():
            return True
        folder = self.registry.models_dir / model_id
        if any((folder / WEIGHTS_DIR).glob(f"*{SUFFIX}")):
            return False  # weights here: our own version, hosted or imported
        return self.registry.manifest(model_id).digest != pub.manifest_digest.hex()

    def _write_folder(self, model_id: str, manifest: bytes, tokenizer: bytes | None) -> None:
        root = self.registry.models_dir
        tmp = root / f".{model_id}.fetch{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / MANIFEST_FILE).write_bytes(manifest)
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
        target = root / model_id
        if target.exists():  # an older fetched manifest, no weights: replaced
            old = root / f".{model_id}.old{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
        self.registry.forget(model_id)

    def _lock(self, key: str) -> trio.Lock:
        return self._fetching.setdefault(key, trio.Lock())

    def missing(self, model_id: str, start: int, end: int) -> list[tuple[str, int, int]]:
        """(digest, size, atom) of the weight files of atoms [start, end) not here."""
        m = self.registry.manifest(model_id)
        folder = self.registry.folder(model_id)
        return [
            (e.digest, e.nbytes, e.index)
            for e in m.entries(start, end)
            if not has_weights(folder, e.digest)
        ]

    async def fetch_span(
        self, model_id: str, start: int, end: int, on_progress: Progress | None = None
    ) -> int:
        """Make sure the weight files of atoms [start, end) of `model_id` are here, verified,
        fetching the missing ones from peers that have them (several at once, resumable);
        returns the bytes fetched (0 when nothing was missing).

        Raises:
            ApiError(unavailable): no peer could send a verified copy of some file.
        """
        await self.ensure_model(model_id)
        todo = await trio.to_thread.run_sync(self.missing, model_id, start, end)
        if not todo:
            return 0
        manifest = bytes.fromhex(self.registry.manifest(model_id).digest)
        folder = self.registry.folder(model_id)
        total = sum(size for _, size, _ in todo)
        done = 0
        log.info("weights_fetching", model=model_id, start=start, end=end, files=len(todo),
                 bytes=total)  # fmt: skip

        def progress(n: int) -> None:
            nonlocal done
            done += n
            self.metrics.inc("weights_fetched_bytes_total", n)
            if on_progress is not None:
                on_progress(done, total)

        for digest, size, atom in todo:
            async with self._lock(digest):
                target = folder / WEIGHTS_DIR / f"{digest}{SUFFIX}"
                if target.is_file():
                    progress(size)
                    continue
                sink = PartSink(target, digest, size, self.files)
                resumed = await trio.to_thread.run_sync(sink.stored)
                progress(sum(piece_range(size, i)[1] for i in resumed))
                peers = self._peers_for(model_id, manifest, atom)
                try:
                    await download(
                        bytes.fromhex(digest), size, sink, peers, self._open,
                        timeout_s=self.cfg.mesh.read_timeout_s,
                        on_progress=progress, on_bad_peer=self._blame,
                    )  # fmt: skip
                except BlobUnavailable as exc:
                    raise ApiError(
                        "unavailable",
                        f"cannot fetch atom {atom} of {model_id} ({size} bytes): {exc}",
                    ) from None
        log.info("weights_fetched", model=model_id, start=start, end=end, bytes=total)
        return total


def _holds(span: HostedSpan, model_id: str, manifest: bytes, atom: int | None) -> bool:
    if span.model_id != model_id or span.manifest != manifest:
        return False
    return atom is None or span.start <= atom < span.end


class ModelsDaemonSide:
    """What the daemon wires: the weights protocol, the digest we serve and route by,
    sealing and publishing in the background, and the API's model requests."""

    def __init__(self, svc: ModelsService, seal_new: bool) -> None:
        self.svc = svc
        self.seal_new = seal_new
        self._send, self._todo = trio.open_memory_channel[str](256)
        self._token: trio.lowlevel.TrioToken | None = None

    def __repr__(self) -> str:
        return f"ModelsDaemonSide({self.svc!r})"

    def attach(self, mesh: MeshService, api: ApiServer, jobs: JobService) -> None:
        mesh.stream_handlers[WEIGHTS_PROTOCOL] = self.svc.serve
        mesh.manifest_of = self.manifest_of
        jobs.prepare = self.svc.ensure_model
        self.svc.registry.on_saved = self.saved
        api.route(ModelsRequest, self._models)
        api.route(PublishModelRequest, self._publish)

    def manifest_of(self, model_id: str) -> bytes:
        """The digest of our manifest of `model_id` (b"" when we have none yet)."""
        if model_id not in self.svc.registry.available():
            return b""
        try:
            return bytes.fromhex(self.svc.registry.manifest(model_id).digest)
        except (ApiError, ValueError, OSError) as exc:
            log.warning("manifest_unreadable", model=model_id, reason=str(exc))
            return b""

    def saved(self, model_id: str) -> None:
        """A model was saved here (a training result, ...): seal it, then publish it.
        Called from the event loop or from a worker thread (`registry.save` runs in one)."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # a worker thread: hand it to the loop
            if self._token is not None:
                trio.from_thread.run_sync(self._queue, model_id, trio_token=self._token)
            return
        self._queue(model_id)

    def _queue(self, model_id: str) -> None:
        try:
            self._send.send_nowait(model_id)
        except trio.WouldBlock:
            log.warning("model_publish_queue_full", model=model_id)

    def joined(self, mesh_secret: bytes) -> None:
        """We joined a mesh: seal with its key from now on, publish what we have."""
        self.svc.files.set_secret(mesh_secret, seal_new=self.seal_new)
        self.saved("")  # "" = every local model

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Seal every local model and publish ours, then each saved model as it comes."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        await self._settle("")
        async for model_id in self._todo:
            await self._settle(model_id)

    async def _settle(self, model_id: str) -> None:
        registry = self.svc.registry
        ids = [model_id] if model_id else registry.available()
        for m in ids:
            try:
                await trio.to_thread.run_sync(self.svc.files.seal_folder, registry.models_dir / m)
            except (OSError, WeightsError) as exc:
                log.error("weights_seal_failed", model=m, reason=str(exc))
        node = self.svc._node()
        if node is None or node.state is None:
            return
        if model_id:
            try:
                await self.svc.publish(model_id)
            except (ApiError, MeshError) as exc:
                log.warning("model_publish_failed", model=model_id, reason=str(exc))
        else:
            await self.svc.publish_all()

    async def _models(self, _req: ModelsRequest, _emit: Emit) -> ModelsReply:
        return ModelsReply(tuple(model_rows(self.svc)))

    async def _publish(self, req: PublishModelRequest, _emit: Emit) -> OkReply:
        if req.model_id not in self.svc.registry.available():
            raise ApiError("not_found", f"no local model {req.model_id!r} to publish")
        self.svc.registry.forget(req.model_id)
        await trio.to_thread.run_sync(
            self.svc.files.seal_folder, self.svc.registry.models_dir / req.model_id
        )
        rec = await self.svc.publish(req.model_id)
        if rec is None:
            return OkReply(f"{req.model_id}: already published, or this node is no admin")
        return OkReply(f"published {req.model_id} version {rec.version}")


def model_rows(svc: ModelsService) -> list[ModelRow]:
    """This node's models and the mesh's, one row per id."""
    mesh = svc.mesh_models()
    rows = []
    for model_id in sorted(set(svc.registry.available()) | set(mesh)):
        pub = mesh.get(model_id)
        local = model_id in svc.registry.available()
        if local:
            m = svc.registry.manifest(model_id)
            family, n, digest = m.family, len(m.atoms), m.digest
            here = svc._has_all(model_id)
        else:
            assert pub is not None
            family, n, digest, here = pub.family, len(pub.atoms), pub.manifest_digest.hex(), False
        rows.append(
            ModelRow(
                model_id=model_id,
                family=family,
                atoms=n,
                version=pub.version if pub else 0,
                digest=digest,
                local=local,
                published=pub is not None and pub.manifest_digest.hex() == digest,
                weights_here=here,
                parent=pub.parent if pub else "",
            )
        )
    return rows
